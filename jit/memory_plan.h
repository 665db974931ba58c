// The JIT's static memory plan: liveness intervals of a graph's intermediate values and their
// placement at offsets of one arena, so that a replay reuses memory between values that are never live
// at the same time instead of allocating each one.
//
//   tx::jit::Graph g = tx::jit::trace(step, args);
//   tx::jit::plan_memory_pass(g);            // g.plan: Graph::run now writes intermediates into one arena
//   std::cout << g.plan->str();              // arena 8.0 KiB for 12.0 KiB of values in 3 buffers (peak live 8.0 KiB)
//   tx::TensorList out = g.run(args2);       // bitwise the same results as without the plan
//
// Which values are planned: outputs of nodes whose op uses the default Op::forward (infer, allocate,
// kernel: Op::custom_forward() is false) with all inputs and outputs on the CPU and a nonzero size, that
// are neither graph outputs nor storage a graph output may share (outputs are handed to the caller, so
// they get memory of their own). An op with custom_forward() (views: reshape, permute, slice, expand;
// device copies; collectives; checkpoint) keeps its own forward and its outputs are taken to share storage
// with its inputs: a value read through such a view stays live until the view's last use.
//
// Outputs written in place into state tensors (update_in_place in jit/graph.h) are not planned.
// Liveness: a planned value is live from the node that produces it to its last use, counted in node
// indices (graph outputs and values written by updates count as used at index nodes.size(), after the
// last node). A node's inputs and outputs are live at the same time (kernels never run in place).
//
// Placement follows TensorFlow Lite's arena planner (tensorflow/lite/arena_planner.cc orders the tensors
// by size, largest first; tensorflow/lite/simple_memory_arena.cc places each at the best-fitting gap
// among the allocations live at the same time, else past their end), the "greedy by size" strategy of
// Pisarchyk & Lee, "Efficient Memory Management for Deep Neural Net Inference" (2020). Every offset and
// size is rounded up to MemoryPlan::alignment bytes, the alignment the CPU allocator gives.
#pragma once

#include <mutex>

#include <cstdint>
#include <string>
#include <vector>

#include "jit/graph.h"

namespace titanax::jit {

/// The placement of one planned value.
struct PlannedValue {
  int value = -1;     ///< value id in the graph
  int first = 0;      ///< index of the node that produces it
  int last = 0;       ///< index of its last use, through views included (nodes.size(): used after the last node)
  size_t bytes = 0;   ///< its size rounded up to MemoryPlan::alignment
  size_t offset = 0;  ///< byte offset in the arena (a multiple of MemoryPlan::alignment)
};

/// A graph's memory plan (see the header comment). Only valid for the graph it was made for, as that
/// graph was: Graph::run refuses it once the graph changed.
struct MemoryPlan {
  static constexpr size_t alignment = 64;  ///< bytes; offsets and sizes are multiples of it
  std::vector<PlannedValue> planned;       ///< in order of value id
  std::vector<int> slot;                   ///< per value id: index into `planned`, or -1 when not planned
  size_t arena_bytes = 0;                  ///< the arena's size: the end of the highest placed value
  size_t total_bytes = 0;                  ///< sum of the planned values' sizes: the memory without reuse
  size_t peak_live_bytes = 0;              ///< largest sum of sizes live at one node: a lower bound of arena_bytes
  uint64_t graph_hash = 0;                 ///< structure_hash() of the graph planned
  /// The arena kept between runs (make_arena): shared by copies of the plan.
  struct Spare {
    std::mutex mu;
    std::shared_ptr<Storage> arena;
  };
  std::shared_ptr<Spare> spare = std::make_shared<Spare>();

  /// One line: "arena 8.0 KiB for 12.0 KiB of values in 3 buffers (peak live 8.0 KiB)".
  std::string str() const;
};

/// A hash of what a memory plan depends on: the nodes (op identity, input and output ids), the value
/// count and kinds, the graph outputs and the values updates write.
uint64_t structure_hash(const Graph& g);

/// Plans g's intermediate values (see the header comment). Does not modify g. Throws nothing beyond
/// std::bad_alloc.
MemoryPlan plan_memory(const Graph& g);

/// Sets g.plan to plan_memory(g), so Graph::run executes with it. Run it after the other passes: a pass
/// that changes g afterwards makes Graph::run throw ValueError until this is run again. Returns the plan.
const MemoryPlan& plan_memory_pass(Graph& g);

/// The arena one planned run of g writes into: a CPU storage of plan.arena_bytes, the plan's spare one when
/// no other run holds it (a training loop reuses one arena: no allocation and no page faults per step),
/// else a fresh one, so concurrent runs of one graph never share an arena (the outputs a run returns are
/// not planned and never point into it). Throws ValueError when the plan was made for another graph or g
/// changed since (structure_hash differs).
std::shared_ptr<Storage> make_arena(const Graph& g, const MemoryPlan& plan);

/// Runs node `node` of g on `in` as Graph::run does: a node with a planned output (plan may be null: none)
/// or an output written in place (Node::in_place) runs infer, then its kernel with its planned outputs
/// as views of `arena` (from make_arena) at their offsets, its in-place outputs as the inputs they are
/// written into, and fresh tensors for the others; any other node runs op->forward. With `into` (per
/// value id; undefined where not given), an output whose entry is defined, of the inferred spec and
/// contiguous is written there instead (the buffers a CUDA-graph replay holds: jit/capture.h), unless
/// the op has its own forward (Op::custom_forward), which allocates its outputs. Throws what the op
/// throws; InternalError when an inferred output differs in size from the size planned or from the
/// input it is written into.
TensorList run_node(const Graph& g, const MemoryPlan* plan, const std::shared_ptr<Storage>& arena, size_t node,
                    const TensorList& in, const std::vector<Tensor>* into = nullptr);

}  // namespace titanax::jit
