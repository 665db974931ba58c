// Reverse-mode automatic differentiation over the tape (autodiff/tape.h).
//
// Two styles, both over the same engine:
//   PyTorch style: x.set_requires_grad(); auto y = f(x); y.backward(); x.grad();
//   JAX style:     auto [loss, grads] = value_and_grad([&] { return loss_fn(model, batch); }, params);
// Gradients are computed by visiting recorded nodes in reverse recording order and calling each op's
// vjp. vjps are written with ops, so with create_graph = true the backward pass is itself recorded and
// can be differentiated again.
#pragma once

#include <functional>
#include <utility>

#include "autodiff/tape.h"
#include "core/tree.h"

namespace titanax {

struct BackwardOptions {
  /// Cotangent of the root; required when the root has more than one element, else ones.
  Tensor seed;
  /// Record the backward pass (for higher-order derivatives).
  bool create_graph = false;
  /// Treat the intermediate tensors of wrt as inputs: the gradient with respect to each wrt tensor is
  /// then the partial derivative with the intermediate ones held fixed (no path through an intermediate
  /// wrt tensor is followed). By default it is the total derivative.
  bool stop_at_wrt = false;
  /// Called once per requested leaf (by its index in `wrt`) as soon as its gradient is final, while the
  /// rest of the backward pass still runs: data parallelism starts all-reducing buckets here.
  std::function<void(size_t index, const Tensor& grad)> on_grad_ready;
  /// With on_grad_ready: drop each gradient once it has been handed over, so that the pass does not hold
  /// a second reference to every gradient until it returns (the callback keeps what it needs; the memory
  /// of a gradient is freed as soon as the callback lets go of it). The gradients returned are then
  /// undefined tensors. Data parallelism's buckets use it (PyTorch DDP's gradients as bucket views serve
  /// the same end).
  bool release_reported = false;
};

/// d(root)/d(wrt[i]) for each i (same shape and dtype as wrt[i]; zeros where root does not depend on
/// it). wrt may hold leaves or intermediate tensors. Only the part of the recorded graph between root
/// and wrt runs, as in torch.autograd.grad: the vjp of an op none of whose inputs leads to a wrt tensor
/// is skipped (so is the history behind an intermediate wrt), and each vjp is asked (Op::vjp's `needs`)
/// only for the cotangents that lead to one. Throws AutodiffError for a non-scalar root without a seed,
/// a seed of the wrong shape, or a saved tensor on that part modified in place since it was recorded.
TensorList grad(const Tensor& root, const TensorList& wrt, const BackwardOptions& opts = {});

/// Accumulates d(root)/d(leaf) into leaf.grad() for every leaf that requires grad and reaches root.
void backward(const Tensor& root, const Tensor& seed = {});

namespace detail {
/// What a gradient hook returns in place of `grad` must be like it (shape, dtype, device): AutodiffError
/// otherwise, naming the hook by `what`. Shared by Tensor::register_hook's and nn's backward hooks.
void check_hook_result(const Tensor& grad, const Tensor& returned, const std::string& what);
}  // namespace detail

/// Runs fn with every tensor of `params` marked as requiring grad and returns fn's (scalar) value and
/// the gradient with respect to each parameter, as a tree with the same paths. The params' own
/// requires_grad flags are restored afterwards. Throws AutodiffError if a param is not a leaf.
std::pair<Tensor, ParamTree> value_and_grad(const std::function<Tensor()>& fn, const ParamTree& params,
                                            const BackwardOptions& opts = {});

/// Activation checkpointing (gradient checkpointing: Chen et al. 2016, "Training Deep Nets with
/// Sublinear Memory Cost", arXiv:1604.06174; PyTorch's torch.utils.checkpoint). Returns fn(x) computed
/// without recording fn's inside: the tape holds one node whose inputs are x and `params`, so only x
/// (not fn's intermediates) stays alive until backward. The node's vjp runs fn again with recording on
/// and takes d fn / d(x, params) of the recomputed graph with the incoming cotangent: the gradients are
/// those of recording fn directly (the same ops; equal up to the order in which a parameter's
/// contributions are summed).
/// `params`: every tensor fn reads besides x whose gradient is wanted (a module's parameters); a
/// requires-grad tensor fn reads but that is not listed gets no gradient through this node.
/// fn must compute the same thing twice (no fresh randomness per call; collectives inside fn run again,
/// so every rank of their group must checkpoint the same way). x may be integer (token ids; then only
/// `params` get gradients) or undefined (fn reads its input elsewhere; it is called with Tensor()).
/// Without grad mode, or when neither x nor a param requires grad, it is just fn(x). Under jit::trace
/// (jit(), vmap) fn's ops are recorded into the graph but not on the tape, and the tape gets the
/// checkpoint node alone: its vjp, traced in the backward pass, runs fn again inside a recomputation
/// (ApplyObserver::on_recompute), which the JIT's passes keep apart from the forward's ops (Node::remat),
/// so a compiled step recomputes too (docs/jit.md). Differentiable to any order: under create_graph
/// the vjp recomputes fn from a recorded copy of x, so the gradients it returns depend on x, params and
/// the cotangent through recorded ops (as PyTorch's non-reentrant checkpoint). Throws what fn throws;
/// AutodiffError when fn returns an undefined tensor.
Tensor checkpoint(const std::function<Tensor(const Tensor&)>& fn, const Tensor& x, const TensorList& params = {});

/// Result of gradcheck.
struct GradcheckResult {
  bool ok = true;
  double max_abs_error = 0;   ///< largest |analytic - numeric| over all checked elements
  double max_rel_error = 0;   ///< largest |analytic - numeric| / max(|numeric|, 1e-3)
  std::string report;         ///< first failing element per input, when !ok
};

/// Checks the vjp of fn against central finite differences in float64. Every floating input must be
/// f64. Uses L = sum(fn(x) * v) with a fixed random cotangent v, so each element of each output
/// contributes. An element passes when |analytic - numeric| <= atol + rtol * |numeric|.
/// Integer inputs (labels, indices) are passed through and not differentiated.
GradcheckResult gradcheck(const std::function<Tensor(const TensorList&)>& fn, const TensorList& inputs,
                          double eps = 1e-6, double atol = 1e-6, double rtol = 1e-5);

}  // namespace titanax
