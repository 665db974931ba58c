// Internal to jit/: the interface between vmap's batching interpreter (jit/vmap.cpp) and the batching
// rules that need an op's internals, namely the control-flow ops' sub-graphs (jit/control_flow.cpp).
#pragma once

#include <functional>
#include <optional>
#include <vector>

#include "jit/graph.h"

namespace titanax::jit::detail {

/// A value of vmap's interpreter: a batched one holds the whole batch on axis 0 ([B, per-example
/// shape...]); an unbatched one is shared by every example (its per-example shape).
struct BatchedValue {
  Tensor t;
  bool batched = false;
};

/// Runs graph g through vmap's interpreter on `args` (one per graph input, with their flags) at batch
/// size B; returns the graph's outputs with their flags. Ops are issued with apply(), so the run is
/// recorded by an enclosing trace or tape.
using RunBatched = std::function<std::vector<BatchedValue>(const Graph& g, const std::vector<BatchedValue>& args)>;

/// Which outputs of g the interpreter makes batched when the inputs flagged in `in` are (one flag per
/// graph input): a node's outputs are batched when any of its inputs is; constants and state are not.
/// No tensor is touched. Throws InternalError when `in` has another size than g.inputs.
std::vector<bool> batched_outputs(const Graph& g, const std::vector<bool>& in);

/// The batching rule of a cond, while_loop or scan node (jax.lax's batching rules for the same ops):
/// `in` are the node's inputs, at least one batched, B the batch size. Returns the node's outputs, every
/// one batched ([B, per-example shape...]), computed by new control-flow ops whose sub-graphs are the
/// old ones run through `run`; nullopt when op is not one of the three.
///  - cond with a shared predicate: a cond over the batched branches; with a per-example predicate:
///    both branches batched, then where(pred, true result, false result) per example.
///  - while_loop: the carries that a batched input reaches (the least fixpoint over the body) are
///    batched. A shared predicate: a while_loop over the batched body. A per-example predicate: every
///    carry batched, the loop runs while any example's predicate holds, and an example whose predicate
///    is false keeps its carry (where).
///  - scan: carries batched as in while_loop; batched xs are scanned with the batch on their second
///    axis; the stacked ys get the batch moved back to axis 0 (a shared y is broadcast).
std::optional<TensorList> batch_control_flow(const Op& op, const std::vector<BatchedValue>& in, int64_t B, const RunBatched& run);

}  // namespace titanax::jit::detail
