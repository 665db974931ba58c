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
// single place ops run): each op's outputs become new SSA values. A tensor the function reads that
// neither is an input nor was produced by a recorded op becomes
//   * a state value when it is live state: a tensor that requires grad (a parameter being
//     differentiated) or one the function writes in place (optimizer moments, the step counter). The
//     graph holds the tensor and reads its current contents at every replay; passes never fold it;
//   * otherwise a constant of the graph (its value at trace time; passes may fold it).
// In-place writes (copy_, fill_) into tensors that existed before the trace become the graph's
// `updates`: after the last node, each update writes its value into its target, so a replay has the
// effect of the eager call (a training step updates the weights). Reads of a written tensor later in the
// trace see the written value. Nodes hold the ops themselves (OpPtr), so the graph runs by calling each
// op's forward, and passes can evaluate ops (constant folding).
//
// What a graph cannot replay is refused while tracing with a TraceError: reading a traced value on the
// host (item(), to_vector(): a C++ branch on it would be baked into the graph; use jit::cond /
// jit::while_loop from jit/control_flow.h to branch or loop on it, where() for a per-element choice), an in-place write into a tensor the function computed or was given as input, a
// dtype-changing copy_, and a read through another view of a tensor after it was written. Effects that
// bypass both apply() and copy_/fill_ (writing through data<T>() by hand) are invisible to the tracer.
//
// Scope of the JIT so far (issue "JIT"): tracing of functions including the tape's backward and the
// optimizer update (one graph per training step), the IR with text and Graphviz DOT printing, replay,
// the passes dead-code elimination, common-subexpression elimination, algebraic simplification and
// constant folding, and a cache of compiled graphs by input signature with static arguments (jit()).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/op.h"

namespace titanax::jit {

/// One SSA value: the output `index` of node `producer`, or a graph input (producer -1, kind input),
/// or a constant (producer -1, kind constant; `constant` holds the tensor), or live state (kind state:
/// `constant` holds the tensor whose current contents each replay reads).
struct Value {
  enum class Kind : uint8_t { input, constant, node_output, state };
  Kind kind = Kind::node_output;
  TensorSpec spec;
  int producer = -1;  ///< node index for node outputs
  int index = 0;      ///< output index in the producer, or the input / constant position
  Tensor constant;    ///< the value of a constant, or the state tensor
};

/// An in-place write done at the end of each replay: `value`'s contents are copied into `target` (a
/// tensor that existed before the trace: a parameter, an optimizer moment).
struct Update {
  Tensor target;
  int value = -1;
};

struct MemoryPlan;      // jit/memory_plan.h
class CapturedReplay;   // jit/capture.h
struct CaptureStats;    // jit/capture.h

/// One op application: the op (its kernels, attributes and shape rule) on input values, giving outputs.
struct Node {
  OpPtr op;
  std::vector<int> inputs;   ///< value ids
  std::vector<int> outputs;  ///< value ids
  /// Empty, or one entry per output: the position in `inputs` of the state value whose tensor the
  /// output is written into (update_in_place), -1 for an output in memory of its own.
  std::vector<int> in_place;
  /// The module path the op ran in while traced (autodiff/anomaly.h current_scope()), for anomaly reports.
  /// A fused node has its GEMM's or reduction's path, an elementwise group the longest its members share.
  std::string scope;
  /// 0, or the recomputation the op belongs to (checkpoint() traced: its vjp runs the function again, and
  /// each such run is numbered from 1). eliminate_common_subexpressions merges only nodes with the same
  /// number, so a recomputed value is made again in the backward pass instead of kept from the forward.
  int remat = 0;
};

class Graph {
 public:
  /// Values by id (ids index this vector; passes never renumber, removed values stay unreferenced).
  std::vector<Value> values;
  /// Nodes in execution order (a topological order).
  std::vector<Node> nodes;
  /// Value ids of the graph's inputs and outputs, in order.
  std::vector<int> inputs, outputs;
  /// In-place writes, in the order the function did them (a later write to the same target wins).
  std::vector<Update> updates;
  /// When set (plan_memory_pass in jit/memory_plan.h), run() places the planned intermediate values in
  /// one arena per run instead of allocating each.
  std::shared_ptr<const MemoryPlan> plan;

  /// Runs the graph on `args` (one per input; each must match the traced input's shape, dtype and
  /// device: ShapeError / DTypeError / DeviceError naming the input otherwise) without recording a tape;
  /// then performs the updates; returns the outputs. Each node's outputs are released after their last
  /// use. With a plan, also throws ValueError when the graph changed since it was planned.
  TensorList run(const TensorList& args) const;
  /// Throws what run() throws for `args` that do not match the traced inputs (count, shape, dtype, device).
  void check_inputs(const TensorList& args) const;
  /// The values a run starts from, by value id: `args` at the inputs (checked as check_inputs does),
  /// constants and state tensors at theirs, undefined tensors elsewhere.
  std::vector<Tensor> environment(const TensorList& args) const;
  /// Per value id: the index of the last node that reads it (nodes.size() for graph outputs and values
  /// updates write; -1 when unused).
  std::vector<int> last_uses() const;
  /// Performs the updates from the values in `env` (indexed by value id), skipping those written in place.
  void write_updates(const std::vector<Tensor>& env) const;

  /// One line per input, constant, node and output:
  ///   graph(%0: f32[4, 3]) {
  ///     %1 = const f32[] 2
  ///     %2 = exp(%0) : f32[4, 3]
  ///     %3 = mul(%2, %1) : f32[4, 3]   # head     (the node's module path, when it has one)
  ///     %4 = state f32[4, 3]             (live state, read at each replay)
  ///     %4 <- %3                         (an in-place update)
  ///     return %3
  ///   }
  std::string str() const;
  /// Graphviz DOT: one box per node (op name and attributes), one ellipse per input / constant, edges
  /// labelled with shapes.
  std::string dot() const;
  /// Nodes currently in the graph.
  size_t num_nodes() const { return nodes.size(); }
  /// How str() and dot() name an update's target: "%<id>" of its state value, else its spec.
  std::string target_name(const Tensor& t) const;
};

/// Traces fn on `args` (see the header comment). The function runs eagerly once, with its effects (its
/// in-place updates happen). `static_inputs` lists the positions of arguments traced as constants (their
/// values are baked into the graph and they are not graph inputs; a host read of them is allowed).
/// `eager_outputs`, when given, receives fn's outputs of this eager run (detached). Throws what fn
/// throws; TraceError for what a graph cannot replay (above); ValueError when an output is undefined.
Graph trace(const std::function<TensorList(const TensorList&)>& fn, const TensorList& args,
            const std::vector<int>& static_inputs = {}, TensorList* eager_outputs = nullptr);

/// Removes nodes none of whose outputs reaches a graph output or an update. Returns the number removed.
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

/// The passes jit() runs, to a fixed point: constant folding, algebraic simplification, common
/// subexpressions, dead code.
void optimize(Graph& g);

/// Buffer donation for in-place updates (XLA's input/output aliasing, JAX's donate_argnums, applied to
/// live state): where an update writes value v into target T, and v is output k of a node whose op
/// allows writing output k into its input j (Op::in_place_input) and input j is T's state value, the
/// node is marked to write v into T itself (Node::in_place), and the update's copy becomes a no-op. An
/// optimizer step then updates the parameters and moments where they are instead of updating copies
/// and copying them back (per parameter and state tensor: one read and one write of it saved, and no
/// temporary). Only where it cannot change a result: T is contiguous, covers its storage's only state
/// value (no other view of it is read), has no other update, v is not a graph output, and no later
/// node, graph output or update reads T's value or a view of it. Run it after the other passes (a pass
/// that reorders nodes afterwards could move a read of T past the write). Returns the number of
/// outputs made in place.
int update_in_place(Graph& g);
/// The longest module path both `a` and `b` lie in ("blocks/1/attn" and "blocks/1/mlp" share "blocks/1").
std::string common_scope(const std::string& a, const std::string& b);
/// Whether a and b are the same elements: one storage, offset, shape, strides and dtype (undefined
/// tensors never are).
bool same_memory(const Tensor& a, const Tensor& b);

/// Counters of a jit-compiled function.
struct JitStats {
  int64_t hits = 0;             ///< calls served by a cached graph
  int64_t misses = 0;           ///< calls that traced and optimised a new graph
  double compile_seconds = 0;   ///< total time spent tracing and optimising
  int64_t eager_for_grad = 0;   ///< calls run eagerly because an input requires grad (see Compiled)
};

/// Options of jit().
struct JitOptions {
  /// Positions of static arguments: traced as constants, and their values (not only their specs) are
  /// part of the cache key, so a new value compiles a new graph (the C++ form of JAX's static_argnums:
  /// pass a flag or a small count as a tensor and branch on it with item()). Keep them small: the key
  /// holds their bytes.
  std::vector<int> static_inputs;
  /// Plan the intermediates' memory into one arena (jit/memory_plan.h), reused by every replay: CPU values
  /// only (on a GPU the caching allocator, and under CUDA graphs the capture's pool, hold them). A
  /// replay then takes no allocation; the GPT reference step's intermediates take 273 MB instead of 409
  /// MB at the same step time (bench/jit's unplanned_* figures, docs/jit.md).
  bool memory_plan = true;
  /// On a GPU, replay through captured CUDA graphs (jit/capture.h: the runs of capturable nodes
  /// recorded once, then one launch each per call; the rest op by op between them). The environment
  /// variable TITANAX_CUDA_GRAPHS=0 turns it off too. No effect on CPU graphs.
  bool cuda_graphs = true;
};

/// What jit() does to a newly traced graph, in order: optimize(), fuse() (jit/fusion.h; optimize again
/// when it fused something), update_in_place(), and plan_memory_pass() (jit/memory_plan.h) when
/// opts.memory_plan. The result is the graph a replay runs (`titanax describe --graph` prints it).
/// Throws what the passes throw.
void optimize_for_replay(Graph& g, const JitOptions& opts = {});

/// A function compiled per input signature (each input's shape, dtype and device, and the values of
/// static inputs): the first call with a new signature traces fn (that call runs eagerly, as tracing
/// does), runs the passes (dead code, common subexpressions, algebraic simplification, constant folding,
/// to a fixed point), fuses elementwise work (jit/fusion.h), makes updates in place (update_in_place),
/// with JitOptions::memory_plan plans the intermediates' memory (jit/memory_plan.h), and caches the
/// graph; later calls with that signature replay it (on a GPU through CUDA graphs: JitOptions::cuda_graphs).
/// With the environment variable TITANAX_LOG_COMPILES=1 every compile logs why it happened (the first
/// call, or which input differs from the signatures seen, e.g. "input 0: f32[8, 3] (cached: f32[4, 3])").
/// Tensors the function reads from outside are constants captured at trace time unless they are live
/// state (they require grad, or the function writes them in place): a training step's parameters and
/// optimizer state are read and written live at every replay; other tensors that change between calls
/// must be inputs. Called while another function is being traced, it runs fn directly (inlined into the
/// outer trace). A replay is not recorded on the tape, so when grad mode is on and an input requires
/// grad, fn runs eagerly instead, recorded, and its results carry gradients as without jit (JAX's jit is
/// transparent to grad likewise; JitStats::eager_for_grad counts these calls, and TITANAX_LOG_COMPILES=1
/// logs the first): to compile the backward pass too, take the gradient inside fn.
class Compiled {
 public:
  explicit Compiled(std::function<TensorList(const TensorList&)> fn, JitOptions opts = {})
      : fn_(std::move(fn)), opts_(std::move(opts)) {}
  Compiled(Compiled&&) = default;
  Compiled& operator=(Compiled&&) = default;
  Compiled(const Compiled&) = delete;  // a captured replay refers to its own graph
  Compiled& operator=(const Compiled&) = delete;
  /// Runs the cached graph for args' signature (tracing it first on a miss). Throws what the function
  /// throws while tracing, ValueError for a static input position out of range.
  TensorList operator()(const TensorList& args);
  const JitStats& stats() const { return stats_; }
  /// The cached graph for a signature, if any (for describe / tests).
  const Graph* graph_for(const TensorList& args) const;
  /// What the captured replay of a signature's graph did (jit/capture.h), or nullptr when that graph
  /// is not replayed through CUDA graphs (not cached or not replayed yet, a CPU graph, none capturable,
  /// JitOptions::cuda_graphs off).
  const CaptureStats* capture_stats_for(const TensorList& args) const;

 private:
  struct Entry {
    Graph graph;
    bool replay_made = false;                // make_cuda_graph_replay was asked (at the first replay)
    std::shared_ptr<CapturedReplay> replay;  // null: Graph::run
  };
  std::string signature(const TensorList& args) const;
  TensorList graph_args(const TensorList& args) const;
  std::function<TensorList(const TensorList&)> fn_;
  JitOptions opts_;
  std::map<std::string, Entry> cache_;
  JitStats stats_;
};

/// Compiled(fn, opts) (see above).
Compiled jit(std::function<TensorList(const TensorList&)> fn, JitOptions opts = {});

}  // namespace titanax::jit
