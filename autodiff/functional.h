// Function transformations: Jacobian-vector and vector-Jacobian products, Hessian-vector products,
// whole Jacobians and Hessians. The names and contracts follow JAX (jax.jvp, jax.vjp,
// jax.jacrev, jax.hessian) and torch.autograd.functional (jvp, vjp, hvp, jacobian, hessian).
//
// jvp is forward mode; the rest is reverse mode over the tape (autodiff/autodiff.h). Both differentiate
// whatever grad() differentiates, from the same vjps (forward mode where an op has no rule of its own):
//   * vjp: one backward pass per call of the pullback.
//   * jvp: forward mode (jax.jvp's), no tape: fn runs once while an ApplyObserver (detail::ForwardMode)
//     carries a tangent beside every value that depends on the tangents' primals. Each op's tangents
//     come from its rule: the op itself applied to the tangents for linear ops (Op::linear: views,
//     copies, add, sum, concat, gathers, ...), Op::jvp where an op has one (elementwise, matmul, linear,
//     softmax, log_softmax),
//     else the op's own vjp, linearised: g(u) = J^T u is linear in the cotangent u, so the gradient of
//     <g(u), t> with respect to u is J t (the "double-vjp trick" of J. Townsend, 2017, applied per op,
//     so its tape covers one op at a time). A jvp costs about two forward passes, and keeps no
//     activations of fn alive beyond what fn itself keeps; an op on the path whose vjp has no
//     derivative throws AutodiffError naming it. In-place writes (copy_, fill_) that touch a value with
//     a tangent are refused (AutodiffError): forward mode follows values through ops.
//   * hvp: reverse over reverse (Pearlmutter 1994, "Fast exact multiplication by the Hessian"): the
//     gradient of <grad f(x), v>.
//   * jacobian / hessian: a backward pass per element of the differentiated output (rows of the
//     Jacobian), batched by jit::vmap (FunctionalOptions::vectorize), so they suit small outputs; the
//     Hessian's rows are the Jacobian of the recorded gradient.
//
// Common rules:
//   * fn runs once, with grad mode on (also under NoGradGuard), on fresh handles that share the primals'
//     storage (leaves requiring grad, except for jvp's, which need no tape): the primals' own
//     requires_grad flags and .grad() are never touched. detach() inside fn stops tangents as it stops
//     gradients (jax.lax.stop_gradient).
//   * Non-floating primals (ids, labels) pass through to fn and are not differentiated; their tangents /
//     Hessian and Jacobian entries are undefined Tensors. Non-floating outputs likewise get undefined
//     tangents and Jacobian entries, and take no cotangent.
//   * FunctionalOptions::create_graph = false (the default): every result is detached. With true, the
//     results are recorded, so they can be differentiated again with respect to the primals, tangents,
//     cotangents and whatever those were computed from (e.g. a meta-learning outer loop).
//   * Works under jit::jit and jit::vmap like grad() does (the backward passes, and jvp's tangent ops,
//     are traced into the graph), and the transforms nest (jvp of jvp, jvp of a vjp: forward over reverse).
#pragma once

#include <functional>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

#include "autodiff/autodiff.h"

namespace titanax {

namespace detail {
/// Counts of how the ops under jvp got their tangents on this thread: by a rule (Op::linear or
/// Op::jvp) or by linearising the op's vjp.
struct JvpStats {
  int64_t by_rule = 0;
  int64_t by_vjp = 0;
};
const JvpStats& jvp_stats();
void reset_jvp_stats();
/// t.detach() (a fresh handle on t's memory, cut from the tape) that keeps the tangents active jvps give
/// t: the functional transforms' detach, so that a jvp of them (nesting, forward over reverse) sees
/// through their fresh leaves and detached results.
Tensor detach(const Tensor& t);

/// jvp's forward mode: while alive (one per jvp, nested jvps nest), every op applied on the calling
/// thread whose inputs carry tangents gets its outputs' tangents (see the file comment). Forwards every
/// event to the observer installed before it (a trace, an outer jvp), which also sees the ops that
/// compute the tangents. Tangents are keyed by the primal's TensorImpl, held weakly.
class ForwardMode final : public ApplyObserver {
 public:
  ForwardMode();
  ~ForwardMode() override;
  ForwardMode(const ForwardMode&) = delete;
  ForwardMode& operator=(const ForwardMode&) = delete;
  void set_tangent(const Tensor& primal, const Tensor& tangent);
  /// The tangent carried by `primal`, or undefined (zero).
  Tensor tangent(const Tensor& primal) const;
  void on_apply(const OpPtr& op, const TensorList& inputs, const TensorList& outputs) override;
  /// Throws AutodiffError for a write that involves a value with a tangent.
  void on_write(const Tensor& dst, const Tensor& src) override;
  void on_host_read(const Tensor& t) override;
  void on_alias(const Tensor& from, const Tensor& to) override;

 private:
  struct Entry {
    std::weak_ptr<TensorImpl> primal;
    Tensor tangent;
  };
  ApplyObserver* prev_;
  std::unordered_map<const TensorImpl*, Entry> tangents_;
  size_t swept_size_ = 0;
};
}  // namespace detail

struct FunctionalOptions {
  /// Record the computation of the results, so that they can be differentiated again.
  bool create_graph = false;
  /// jacobian / hessian: compute the rows by one backward pass batched over up to 128 one-hot seeds
  /// with jit::vmap (jax.jacrev's way; torch.autograd.functional's vectorize=True), else one backward
  /// pass per row (torch's default). The same values either way; with create_graph the rows are
  /// always computed one by one (recorded). The Hessian of a 16-32-10 tanh MLP's loss (832 x 832, f32,
  /// 2-core EPYC): 8 ms vectorized, 24 ms row by row.
  bool vectorize = true;
};

/// A function from a list of tensors to a list of tensors (the type jit::jit and jit::vmap take).
using VectorFn = std::function<TensorList(const TensorList&)>;
/// A function from a list of tensors to a scalar (one element), e.g. a loss.
using ScalarFn = std::function<Tensor(const TensorList&)>;

/// Jacobian-vector product in forward mode (jax.jvp): returns (fn(primals), J tangents), where J is fn's Jacobian at primals; the
/// second list has one tensor per output of fn, of that output's shape and dtype: sum over j of
/// d out_i / d primal_j contracted with tangents[j]. tangents: one per primal, of its shape (cast to its
/// dtype); an undefined Tensor() is a zero tangent, and the only one a non-floating primal takes.
/// Algorithm: forward mode, each op by its rule or its linearised vjp (see the file comment).
/// Throws AutodiffError for a tangent list of another length, a tangent of another shape, a tangent
/// given for a non-floating primal, an op on the path without a rule whose vjp has no derivative, or an
/// in-place write into a value with a tangent; whatever fn throws.
std::pair<TensorList, TensorList> jvp(const VectorFn& fn, const TensorList& primals, const TensorList& tangents,
                                      const FunctionalOptions& opts = {}, Loc loc = Loc::current());

/// The result of vjp(): fn's outputs and the pullback u -> J^T u.
struct VjpResult {
  TensorList outputs;
  /// cotangents: one per output, of its shape (cast to its dtype); undefined for a non-floating output
  /// or one that should contribute nothing. Returns one tensor per primal, of its shape and dtype
  /// (zeros where the outputs do not depend on it; undefined for a non-floating primal). May be called
  /// any number of times. Throws AutodiffError for a cotangent list of another length, a cotangent of
  /// another shape, or one given for a non-floating output.
  std::function<TensorList(const TensorList& cotangents)> pullback;
};

/// Reverse-mode product, as jax.vjp: runs fn once and returns its outputs and a pullback computing
/// J^T u (one backward pass per call). The pullback keeps fn's recorded graph alive.
VjpResult vjp(const VectorFn& fn, const TensorList& primals, const FunctionalOptions& opts = {},
              Loc loc = Loc::current());

/// Hessian-vector product of a scalar function: returns (fn(primals), H v) where H is the Hessian of fn
/// at primals with respect to all floating primals together: result j = sum over k of
/// d^2 fn / d primal_j d primal_k contracted with v[k]. v: one per primal, as jvp's tangents. Two backward passes (reverse over reverse). Throws AutodiffError for fn
/// returning more than one element or a non-floating value, and for v as jvp's tangents.
std::pair<Tensor, TensorList> hvp(const ScalarFn& fn, const TensorList& primals, const TensorList& v,
                                  const FunctionalOptions& opts = {}, Loc loc = Loc::current());

/// Jacobian of fn at primals (jax.jacrev, torch.autograd.functional.jacobian): result[i][j] has shape
/// outputs[i].shape ++ primals[j].shape and primal j's dtype: element (a, b) is d out_i[a] / d
/// primal_j[b]. Undefined entries for non-floating outputs or primals. One backward pass per element of
/// the floating outputs (batched: FunctionalOptions::vectorize).
std::vector<TensorList> jacobian(const VectorFn& fn, const TensorList& primals, const FunctionalOptions& opts = {},
                                 Loc loc = Loc::current());

/// Hessian of a scalar fn at primals (jax.hessian, torch.autograd.functional.hessian): result[i][j] has
/// shape primals[i].shape ++ primals[j].shape and primal j's dtype: element (a, b) is
/// d^2 fn / d primal_i[a] d primal_j[b]. Undefined entries where primal i or j is not floating. One
/// backward pass for the gradient, then one per element of the floating primals (batched:
/// FunctionalOptions::vectorize). Throws AutodiffError as hvp does.
std::vector<TensorList> hessian(const ScalarFn& fn, const TensorList& primals, const FunctionalOptions& opts = {},
                                Loc loc = Loc::current());

}  // namespace titanax
