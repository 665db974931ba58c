// Tensor parallelism (Megatron-LM: Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter
// Language Models Using Model Parallelism", arXiv:1909.08053, section 3): the conjugate collectives that
// make column- and row-parallel layers differentiable, vocabulary-parallel embedding and cross-entropy,
// and the layers' functional forms.
//
// Gradient convention (Megatron's, NOT the JAX sum convention of parallel/collectives.h): every rank of
// the TP axis computes the same (replicated) loss, and differentiating gives each rank the gradient of
// that one loss with respect to its own tensors. With it:
//   f = copy_to_tensor_parallel_region:      forward identity,             backward psum over the axis
//   g = reduce_from_tensor_parallel_region:  forward psum over the axis,   backward identity
//   scatter_to_tensor_parallel_region:       forward this rank's block,    backward all_gather
//   gather_from_tensor_parallel_region:      forward all_gather,           backward this rank's block
// A column-parallel layer is f then a local matmul; a row-parallel layer is a local matmul then g, so a
// transformer block has one all-reduce in the forward (after attention's and the MLP's row-parallel
// layer) and one in the backward (at f) per sub-layer (Megatron figure 3).
//
// Every function is collective over the ranks of `axis` (each rank calls it in the same order with the
// same shapes), validates the axis against the mesh (MeshError naming the known axes) and reports errors
// at the caller's line. On an axis of size 1 each one is the identity (no op is recorded).
// Which mesh: the overloads without a Mesh use Mesh::current().
#pragma once

#include <string>

#include "ops/ops.h"
#include "parallel/mesh.h"
#include "parallel/sharding.h"

namespace titanax {

/// Where a tensor-parallel layer runs: an axis of a mesh, or nowhere (the default: size 1, index 0,
/// no mesh; every TP function then acts as the identity and tensors are whole). Cheap to copy.
class TPGroup {
 public:
  TPGroup() = default;
  /// Throws MeshError (with "did you mean") when `axis` is not an axis of `mesh`.
  TPGroup(const Mesh& mesh, std::string axis, Loc loc = Loc::current());
  int size() const { return size_; }
  int index() const { return index_; }
  const std::string& axis() const { return axis_; }
  bool has_mesh() const { return has_mesh_; }
  /// The mesh; MeshError for a default-constructed group.
  const Mesh& mesh(Loc loc = Loc::current()) const;
  /// The shape this rank holds of a tensor of `global` shape split by `spec`: each dimension whose entry
  /// names axis() divided by size() (without a mesh: `global`, whatever the spec names). PlanError for an
  /// entry naming another axis or a spec longer than the shape, ShapeError for a dimension that does not
  /// divide; `what` names the tensor.
  Shape local_shape(const Shape& global, const PartitionSpec& spec, const std::string& what = "tensor",
                    Loc loc = Loc::current()) const;
  /// This rank's block (a view) of a full tensor split by `spec` (block index() along each split dim).
  Tensor shard(const Tensor& global, const PartitionSpec& spec, Loc loc = Loc::current()) const;

 private:
  Mesh mesh_;
  std::string axis_;
  bool has_mesh_ = false;
  int size_ = 1, index_ = 0;
};

/// Megatron's f: returns x (same shape, dtype; no copy); the backward pass sums the cotangent over
/// the ranks of `axis`. Put it in front of a column-parallel layer whose input is replicated.
Tensor copy_to_tensor_parallel_region(const Mesh& mesh, const Tensor& x, const std::string& axis,
                                      Loc loc = Loc::current());
Tensor copy_to_tensor_parallel_region(const Tensor& x, const std::string& axis, Loc loc = Loc::current());

/// Megatron's g: the sum of x over the ranks of `axis` (same shape on every rank); the backward pass
/// passes the cotangent through unchanged. Put it after a row-parallel layer. Reducible dtypes (as psum).
Tensor reduce_from_tensor_parallel_region(const Mesh& mesh, const Tensor& x, const std::string& axis,
                                          Loc loc = Loc::current());
Tensor reduce_from_tensor_parallel_region(const Tensor& x, const std::string& axis, Loc loc = Loc::current());

/// This rank's block of x along `dim` (x.shape[dim] / axis size elements, block i on axis rank i); the
/// backward pass all-gathers the cotangent. ShapeError unless x.shape[dim] divides by the axis size.
Tensor scatter_to_tensor_parallel_region(const Mesh& mesh, const Tensor& x, const std::string& axis, int dim = -1,
                                         Loc loc = Loc::current());

/// The concatenation of every rank's x along `dim` in axis-rank order; the backward pass keeps this
/// rank's block of the cotangent (no communication).
Tensor gather_from_tensor_parallel_region(const Mesh& mesh, const Tensor& x, const std::string& axis, int dim = -1,
                                          Loc loc = Loc::current());

/// Column-parallel linear (Megatron's ColumnParallelLinear, gather_output = false):
/// linear(f(x), w, b) with x [..., in] replicated, w [out / n, in] this rank's rows of the global weight,
/// b [out / n] (or undefined); returns this rank's output columns [..., out / n].
Tensor column_parallel_linear(const Mesh& mesh, const Tensor& x, const Tensor& w, const Tensor& b,
                              const std::string& axis, Loc loc = Loc::current());

/// Row-parallel linear (Megatron's RowParallelLinear, input_is_parallel = true):
/// g(linear(x, w)) + b with x [..., in / n] this rank's input columns, w [out, in / n] this rank's columns
/// of the global weight and b [out] replicated (added once, after the all-reduce; may be undefined).
Tensor row_parallel_linear(const Mesh& mesh, const Tensor& x, const Tensor& w, const Tensor& b,
                           const std::string& axis, Loc loc = Loc::current());

/// Vocabulary-parallel embedding (Megatron's VocabParallelEmbedding): weight [V / n, D] holds rows
/// [i * V / n, (i + 1) * V / n) of the global table on axis rank i; ids [...] (i32 / i64) index the
/// global table. Ids outside this rank's rows give zeros, then g (psum) assembles [..., D] on every rank.
/// Throws ValueError naming the first id outside [0, V) (V = n * weight.shape[0]), ShapeError for a
/// weight that is not 2-D.
Tensor vocab_parallel_embedding(const Mesh& mesh, const Tensor& weight, const Tensor& ids, const std::string& axis,
                                Loc loc = Loc::current());

/// Vocabulary-parallel cross-entropy (Megatron's vocab_parallel_cross_entropy): logits [..., V / n] are
/// this rank's block of classes [i * V / n, (i + 1) * V / n); labels [...] are global class ids.
/// Computes the same loss as cross_entropy() on the gathered logits without gathering them: the row
/// maximum over the full vocabulary with an all-reduce(max), the sum of exp(logit - max) with an
/// all-reduce(sum), and the target logit by a masked local pick (0 off this rank) summed with the same
/// all-reduce; loss_r = log(sum) + max - target. Reductions and ignore_index as cross_entropy (mean over
/// non-ignored labels). Backward (no communication): dlogits = (softmax - onehot(label on this rank))
/// * scale, the gradient of the replicated loss. Differentiable to any order (the backward's vjp is
/// written with ops and Megatron's f / g around its vocabulary-wide sums). Errors: ShapeError for labels
/// not matching logits' leading shape, DTypeError (logits f32 / f64, labels i32 / i64), ValueError for a
/// label outside [0, V) that is not ignore_index.
Tensor vocab_parallel_cross_entropy(const Mesh& mesh, const Tensor& logits, const Tensor& labels,
                                    const std::string& axis, Reduction reduction = Reduction::mean,
                                    int64_t ignore_index = -100, Loc loc = Loc::current());

}  // namespace titanax
