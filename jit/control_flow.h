// Structured control flow for traced code: cond, while_loop and scan (the semantics of jax.lax.cond,
// jax.lax.while_loop and jax.lax.scan).
//
//   tx::TensorList y = tx::jit::cond(sum(x) > 0.0,                      // a scalar predicate
//       [](const tx::TensorList& in) { return tx::TensorList{in[0] * 2.0}; },
//       [](const tx::TensorList& in) { return tx::TensorList{-in[0]}; }, {x});
//
// A C++ `if` on a tensor's value needs a host read, which a trace refuses (the branch taken at trace
// time would be baked into the graph). These functions take the branches / bodies as functions instead:
// each is traced (jit::trace) into a sub-graph, and ONE op applies them, choosing or repeating at run
// time. Eagerly they compute what the plain C++ control flow computes; under an outer jit::trace or
// jit() they are recorded as one node ("cond", "while_loop", "scan"), so a replay decides on the
// replay's values.
//
// Tracing runs each function once on the actual operands (both branches of a cond, one iteration of a
// loop body): that is how the sub-graphs are captured, and it costs one extra evaluation per function
// at each eager call. The functions must be pure: an in-place write to a tensor that outlives the call
// is a TraceError, and a host read of an operand (item(), to_vector()) is refused as in any trace.
//
// Captures. A function may read tensors other than its arguments (closures: weights, or an intermediate
// computed before the cond). Each one whose storage existed before the function's trace is "lifted":
// it becomes an extra input of the node, read at every run. So a captured parameter is read live, and
// under an outer trace a captured traced intermediate is wired into the outer graph (not frozen at its
// trace-time value). Tensors made inside the function (literals like the 2.0 above) stay constants of
// the sub-graph.
#pragma once

#include <functional>
#include <utility>

#include "jit/graph.h"

namespace titanax::jit {

/// A traced function: arguments in, results out.
using Fn = std::function<TensorList(const TensorList&)>;
/// A scan body: (carry, x_t) -> (new carry, y_t).
using ScanFn = std::function<std::pair<TensorList, TensorList>(const TensorList& carry, const TensorList& x)>;

/// jax.lax.cond: true_fn(operands) when pred is nonzero, else false_fn(operands).
/// pred: a 0-d tensor of any dtype (bool, u8, an integer or a float; nonzero means true) on the
/// operands' device. Both branches are traced on `operands` and must return the same number of
/// tensors with the same shapes and dtypes (the results' specs). Differentiable with respect to the
/// operands and to tensors the branches capture (not pred): the gradient is that of the branch taken,
/// computed by a cond over the two branches' vjps, so under an outer trace the backward pass also
/// chooses at replay time.
/// Throws ValueError when pred is undefined, ShapeError when pred is not 0-d or the branches' results
/// differ in number or shape, DTypeError when they differ in dtype (both name the branch and the
/// result), DeviceError when pred and the operands are on different devices, TraceError when a branch
/// writes in place into a tensor from outside, what the branches throw while being traced.
TensorList cond(const Tensor& pred, const Fn& true_fn, const Fn& false_fn, const TensorList& operands);

/// jax.lax.while_loop: carry = init; while (cond_fn(carry) is nonzero) carry = body_fn(carry); returns
/// carry. cond_fn returns one 0-d tensor (any dtype, nonzero means continue); body_fn returns a carry
/// with init's shapes and dtypes. The loop may run zero times (the result is then init's values). Not
/// differentiable (as JAX's reverse mode): its vjp throws AutodiffError; use scan for a fixed number
/// of steps. Throws ShapeError / DTypeError naming the function and result when cond_fn does not
/// return one 0-d tensor or body_fn's results differ from init; TraceError as cond(); what the
/// functions throw while being traced.
TensorList while_loop(const Fn& cond_fn, const Fn& body_fn, const TensorList& init);

/// jax.lax.scan: for t in [0, T): (carry, y_t) = f(carry, {x[t] for x in xs}); returns the final carry
/// followed by the ys stacked along a new leading axis ([T, ...y_t's shape] each). With `reverse` the
/// steps run for t = T-1 down to 0 (y_t still lands at index t), as jax.lax.scan(..., reverse=True).
/// Every xs[i] has the same leading extent T >= 0 (x[t] drops that axis); f's carry must keep init's
/// shapes and dtypes and its y_t the same specs at every step (they are fixed by tracing f once on init
/// and x[0], or on zeros when T == 0). Differentiable with respect to init, xs and tensors f captures:
/// the vjp is a scan in the same direction that recomputes the carry entering each step, then a scan in
/// the other direction that pulls the cotangents back through f step by step (JAX's scan transpose,
/// recomputing instead of saving the carries: memory of one step's tape at a time, twice the forward
/// work); integer carries, xs and results take no cotangent. Throws ValueError for an undefined xs,
/// ShapeError when xs is empty, a x is 0-d or the leading extents differ, ShapeError / DTypeError naming
/// the result when f's carry differs from init, TraceError as cond(); what f throws while being traced.
TensorList scan(const ScanFn& f, const TensorList& init, const TensorList& xs, bool reverse = false);

}  // namespace titanax::jit
