// The JIT's IR: a typed SSA graph of ops, captured by tracing, printable, optimisable and replayable.
//
//   tx::jit::Graph g = tx::jit::trace([](const tx::TensorList& in) {
//     return tx::TensorList{tx::exp(in[0]) + tx::exp(in[0])};
//   }, {x});
//   tx::jit::eliminate_common_subexpressions(g);   // one exp
//   std::cout << g.str();                          // %2 = exp(%0) ...
//   tx::TensorList y = g.run({x2});                // replay on new inputs of the same signature
//
// Tracing runs the function eagerly once and records every op it applies (core/op.h apply(), the
// single place ops run): each op's outputs become new SSA values; a tensor the function reads that
// neither is an input nor was produced by a recorded op (weights, scalars it creates) becomes a
// constant of the graph, holding that tensor. Nodes hold the ops themselves (OpPtr), so the graph runs
// by calling each op's forward, and passes can evaluate ops (constant folding).
//
// Scope of this first slice of the JIT (issue "JIT"): tracing of pure tensor functions (no autodiff tape
// or in-place updates inside the trace), the IR with text and Graphviz DOT printing, replay, and the
// passes dead-code elimination, common-subexpression elimination, algebraic simplification and constant
// folding, and a cache of
// compiled graphs by input signature (jit()). Not yet: control-flow ops, tracing whole training steps
// (tape and optimizer), fusion and memory planning.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/op.h"

namespace titanax::jit {

/// One SSA value: the output `index` of node `producer`, or a graph input (producer -1, kind input),
/// or a constant (producer -1, kind constant; `constant` holds the tensor).
struct Value {
  enum class Kind : uint8_t { input, constant, node_output };
  Kind kind = Kind::node_output;
  TensorSpec spec;
  int producer = -1;  ///< node index for node outputs
  int index = 0;      ///< output index in the producer, or the input / constant position
  Tensor constant;    ///< the value of a constant
};

/// One op application: the op (its kernels, attributes and shape rule) on input values, giving outputs.
struct Node {
  OpPtr op;
  std::vector<int> inputs;   ///< value ids
  std::vector<int> outputs;  ///< value ids
};

class Graph {
 public:
  /// Values by id (ids index this vector; passes never renumber, removed values stay unreferenced).
  std::vector<Value> values;
  /// Nodes in execution order (a topological order).
  std::vector<Node> nodes;
  /// Value ids of the graph's inputs and outputs, in order.
  std::vector<int> inputs, outputs;

  /// Runs the graph on `args` (one per input; each must match the traced input's shape, dtype and
  /// device: ShapeError / DTypeError / DeviceError naming the input otherwise) without recording a tape;
  /// returns the outputs. Each node's outputs are released after their last use.
  TensorList run(const TensorList& args) const;

  /// One line per input, constant, node and output:
  ///   graph(%0: f32[4, 3]) {
  ///     %1 = const f32[] 2
  ///     %2 = exp(%0) : f32[4, 3]
  ///     %3 = mul(%2, %1) : f32[4, 3]
  ///     return %3
  ///   }
  std::string str() const;
  /// Graphviz DOT: one box per node (op name and attributes), one ellipse per input / constant, edges
  /// labelled with shapes.
  std::string dot() const;
  /// Nodes currently in the graph.
  size_t num_nodes() const { return nodes.size(); }
};

/// Traces fn on `args` (see the header comment). The function runs eagerly once (its result is not
/// returned). Throws what fn throws; ValueError when an output is undefined.
Graph trace(const std::function<TensorList(const TensorList&)>& fn, const TensorList& args);

/// Removes nodes none of whose outputs reaches a graph output. Returns the number removed.
int eliminate_dead_code(Graph& g);
/// Merges nodes with the same op (name and attributes) on the same input values, keeping the first;
/// uses of the later one's outputs are redirected. Constants with equal dtype, shape and bytes are
/// merged first. Returns the number of nodes merged away.
int eliminate_common_subexpressions(Graph& g);
/// Algebraic simplification: removes nodes that return one of their inputs unchanged, redirecting
/// uses to that input: x * 1, 1 * x, x + 0, 0 + x, x - 0, x / 1 (the constant all ones / zeros, and the
/// result of the same shape, dtype and device as x), and permute(permute(x, p), q) when q undoes p.
/// Nodes left unused are removed by eliminate_dead_code. Returns the number of nodes bypassed.
int simplify_algebra(Graph& g);
/// Evaluates nodes whose inputs are all constants (running their op now) and replaces their outputs by
/// constants. Returns the number of nodes folded.
int fold_constants(Graph& g);

/// Counters of a jit-compiled function.
struct JitStats {
  int64_t hits = 0;             ///< calls served by a cached graph
  int64_t misses = 0;           ///< calls that traced and optimised a new graph
  double compile_seconds = 0;   ///< total time spent tracing and optimising
};

/// A function compiled per input signature (each input's shape, dtype and device): the first call
/// with a new signature traces fn, runs the passes (dead code, common subexpressions, constant
/// folding, to a fixed point) and caches the graph; later calls with that signature replay it.
/// With the environment variable TITANAX_LOG_COMPILES=1 every compile logs why it happened (the first
/// call, or which input differs from the signatures seen, e.g. "input 0: f32[8, 3] (cached: f32[4, 3])").
/// Constants are captured at trace time: a function reading tensors that change between calls (weights
/// being trained) must take them as inputs.
class Compiled {
 public:
  explicit Compiled(std::function<TensorList(const TensorList&)> fn) : fn_(std::move(fn)) {}
  /// Runs the cached graph for args' signature (tracing it first on a miss). Throws what the function
  /// throws while tracing.
  TensorList operator()(const TensorList& args);
  const JitStats& stats() const { return stats_; }
  /// The cached graph for a signature, if any (for describe / tests).
  const Graph* graph_for(const TensorList& args) const;

 private:
  std::function<TensorList(const TensorList&)> fn_;
  std::map<std::string, Graph> cache_;
  JitStats stats_;
};

/// Compiled(fn) (see above).
Compiled jit(std::function<TensorList(const TensorList&)> fn);

}  // namespace titanax::jit
