// Differentiable collectives over a named mesh axis.
//
// Each function is an Op (core/op.h): it runs eagerly over the axis's communicator and, when its input
// requires grad, records a tape node whose vjp is itself built from collectives. The collectives are
// SPMD: every rank of the axis group calls the same function, in the same order, with a tensor of the
// same shape and dtype (the MPI backend checks this and throws CollectiveError on every rank on a
// mismatch instead of hanging).
//
// Which mesh: the overloads without a Mesh use Mesh::current() (the last mesh built; MeshError if none).
// Every function validates the axis against the mesh (MeshError "axis 'dat' is not in the mesh; did you
// mean 'data'?") and reports errors at the caller's line (the Loc default argument).
//
// Gradient convention (JAX's SPMD semantics): differentiating on each rank computes the gradient of the
// SUM over all ranks of every rank's scalar output, L = sum_r loss_r. With that convention:
//   psum^T = psum                         pmean^T = pmean
//   all_gather^T = reduce_scatter (sum)   reduce_scatter^T = all_gather
//   broadcast^T = psum of the cotangents, delivered to root (zeros on the other ranks)
//   ppermute^T = ppermute with every (src, dst) pair reversed
//   all_to_all^T = all_to_all with split_dim and concat_dim swapped
//   pmax^T = psum of the cotangents, delivered to the ranks holding the maximum (split evenly on ties)
// So a data-parallel loss written as pmean(local_loss, "data") gives every rank the gradient of the
// mean loss (each rank's gradient already summed over ranks by pmean's vjp).
//
// Dtypes: psum / pmax / broadcast / all_gather / ppermute / all_to_all accept any dtype the communicator
// moves (reductions: f32, f64, f16, bf16, i32, i64, u8; bf16 / f16 reduce in f32); pmean needs a floating
// dtype; reduce_scatter needs a reducible dtype. Only floating tensors carry gradients.
// Errors: MeshError (unknown axis, no mesh), ShapeError (bad dim, a size that does not divide),
// DTypeError, CollectiveError (bad root / permutation, ranks disagreeing, a failed MPI call).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "parallel/mesh.h"

namespace titanax {

/// Sum of x over the ranks of `axis`; same shape and dtype as x on every rank.
Tensor psum(const Tensor& x, const std::string& axis, Loc loc = Loc::current());
Tensor psum(const Mesh& mesh, const Tensor& x, const std::string& axis, Loc loc = Loc::current());

/// Mean of x over the ranks of `axis` (psum / axis size). Floating dtypes only (DTypeError otherwise).
Tensor pmean(const Tensor& x, const std::string& axis, Loc loc = Loc::current());
Tensor pmean(const Mesh& mesh, const Tensor& x, const std::string& axis, Loc loc = Loc::current());

/// Elementwise maximum of x over the ranks of `axis`. Differentiable: the cotangents of all ranks are
/// summed and go to the ranks whose x equals the maximum, split evenly between tied ranks.
Tensor pmax(const Tensor& x, const std::string& axis, Loc loc = Loc::current());
Tensor pmax(const Mesh& mesh, const Tensor& x, const std::string& axis, Loc loc = Loc::current());

/// Concatenation of every rank's x along `dim`, in axis-rank order: out.shape[dim] = size * x.shape[dim].
/// x needs at least one dimension (ShapeError for a 0-d x or an out-of-range dim).
Tensor all_gather(const Tensor& x, const std::string& axis, int dim = 0, Loc loc = Loc::current());
Tensor all_gather(const Mesh& mesh, const Tensor& x, const std::string& axis, int dim = 0, Loc loc = Loc::current());

/// Sum over the ranks of `axis`, then this rank's block along `dim`: block i (of size x.shape[dim] / size)
/// goes to axis rank i. ShapeError unless x.shape[dim] divides by the axis size.
Tensor reduce_scatter(const Tensor& x, const std::string& axis, int dim = 0, Loc loc = Loc::current());
Tensor reduce_scatter(const Mesh& mesh, const Tensor& x, const std::string& axis, int dim = 0,
                      Loc loc = Loc::current());

/// Axis rank `root`'s x, on every rank of `axis`. CollectiveError unless 0 <= root < axis size.
Tensor broadcast(const Tensor& x, const std::string& axis, int root = 0, Loc loc = Loc::current());
Tensor broadcast(const Mesh& mesh, const Tensor& x, const std::string& axis, int root = 0, Loc loc = Loc::current());

/// Sends x along the (src, dst) pairs of axis indices: the rank at dst receives src's x; a rank that is
/// no pair's dst gets zeros. Every src and every dst may appear at most once and must be in
/// [0, axis size) (CollectiveError otherwise). All ranks of the axis must pass the same pairs.
/// E.g. a ring shift on an axis of size n: {(0,1), (1,2), ..., (n-1,0)}.
Tensor ppermute(const Tensor& x, const std::string& axis, const std::vector<std::pair<int, int>>& perm,
                Loc loc = Loc::current());
Tensor ppermute(const Mesh& mesh, const Tensor& x, const std::string& axis,
                const std::vector<std::pair<int, int>>& perm, Loc loc = Loc::current());

/// Splits x along `split_dim` into size chunks, sends chunk j to axis rank j, and concatenates the chunks
/// received along `concat_dim` in source-rank order: out.shape[split_dim] /= size, then
/// out.shape[concat_dim] *= size. ShapeError unless x.shape[split_dim] divides by the axis size.
Tensor all_to_all(const Tensor& x, const std::string& axis, int split_dim, int concat_dim, Loc loc = Loc::current());
Tensor all_to_all(const Mesh& mesh, const Tensor& x, const std::string& axis, int split_dim, int concat_dim,
                  Loc loc = Loc::current());

/// This rank's index on `axis`, and the axis size (not collective).
int axis_index(const std::string& axis, Loc loc = Loc::current());
int axis_size(const std::string& axis, Loc loc = Loc::current());

}  // namespace titanax
