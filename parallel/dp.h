// Data parallelism: gradient averaging over a mesh axis in buckets that overlap the backward pass, and
// the per-rank data shard and RNG stream helpers.
//
//   GradientSync gs(mesh, "data", params);            // collective: checks every rank has the same params
//   BackwardOptions o;
//   o.on_grad_ready = gs.hook();                      // buckets start all-reducing during backward
//   auto [loss, grads] = value_and_grad(loss_fn, params, o);
//   ParamTree avg = gs.finish();                      // mean over the axis, in params order
//
// Buckets (as in PyTorch DDP): the floating parameters in REVERSE order (the order backward produces
// their gradients), grouped up to `bucket_bytes` (a first, smaller bucket of `first_bucket_bytes` so
// communication starts early); a parameter larger than the limit gets a bucket of its own, and a bucket
// never mixes dtypes (bf16 / f16 gradients are packed and averaged in f32) or devices. When every gradient
// of a bucket has arrived it is packed into one flat buffer and all-reduced with iall_reduce, and the
// reported gradients are let go (with BackwardOptions::release_reported the step then holds one copy of
// the gradients, not two). Buckets are started strictly in bucket order on every rank, so the ranks'
// collectives always match (parallel/overlap.h).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/tree.h"
#include "parallel/mesh.h"
#include "parallel/plan.h"

namespace titanax {

class GradientSync {
 public:
  /// Collective over `axis`: every rank must construct it at the same point with the same parameter
  /// paths, shapes and dtypes and the same bucket sizes; otherwise every rank throws the same PlanError
  /// naming the first differing parameter and the ranks (an error at start, not a hang). Also PlanError
  /// when `axis` is not an axis of the mesh.
  GradientSync(const Mesh& mesh, const std::string& axis, const ParamTree& params, size_t bucket_bytes = 25 << 20,
               size_t first_bucket_bytes = 1 << 20, Loc loc = Loc::current());
  ~GradientSync();
  GradientSync(const GradientSync&) = delete;
  GradientSync& operator=(const GradientSync&) = delete;

  /// Reports the gradient of params[index] (same shape as the parameter; any floating dtype is
  /// converted to the bucket's). Plug into BackwardOptions::on_grad_ready (see hook()). Starts the
  /// all-reduce of every bucket that is complete and whose predecessors have started. Throws ValueError
  /// for an index out of range or a gradient reported twice in one step, ShapeError for a wrong shape.
  void on_grad_ready(size_t index, const Tensor& grad);
  /// [this](size_t i, const Tensor& g) { on_grad_ready(i, g); } (the object must outlive the callback).
  std::function<void(size_t, const Tensor&)> hook();

  /// Collective: completes the step. Gradients never reported count as zeros (so a parameter that did
  /// not take part in the loss on some rank still averages correctly and nothing hangs). Waits for every
  /// bucket, divides by the axis size and returns the averaged gradients in params order (paths of
  /// params; dtypes of params). Resets for the next step.
  ParamTree finish();
  /// The paths of the parameters it was made for, in order.
  std::vector<std::string> paths() const;

  /// The same without overlap: reports every gradient of `grads` (looked up by path; ValueError for a
  /// missing or extra path) in reverse order, then finish(). Collective.
  ParamTree sync(const ParamTree& grads);

  /// Abandons a step (e.g. after an exception in backward): waits for the buckets already started and
  /// drops the reported gradients. Not collective by itself; ranks must agree on abandoning the step.
  void reset();

  /// Number of ranks gradients are averaged over.
  int axis_size() const;
  /// The buckets, in launch order: each a list of parameter indices (descending).
  const std::vector<std::vector<size_t>>& buckets() const { return bucket_params_; }

 private:
  struct State;
  std::unique_ptr<CollectiveRequest> launch(size_t b);  // packs bucket b and starts its all-reduce

  std::unique_ptr<State> s_;
  std::vector<std::vector<size_t>> bucket_params_;
};

/// The mean of every gradient over `axis`, written with ops (reshape, concat, pmean, slice) so that it can
/// be traced into a graph (the JIT-compiled data-parallel step, engine/engine.cpp) and replayed: the
/// gradients, in reverse order, are packed into flat buckets of up to `bucket_bytes` (a larger gradient
/// alone; one dtype per bucket), each bucket is averaged with one pmean (one all-reduce), and the
/// results are unpacked into the shapes of `grads`, in its order. Collective over `axis`: every rank
/// passes the same paths, shapes and dtypes (the communicator's cross-rank check raises CollectiveError
/// otherwise). Non-floating entries are returned unchanged. MeshError for an axis not in the mesh.
ParamTree bucketed_pmean(const Mesh& mesh, const ParamTree& grads, const std::string& axis, size_t bucket_bytes,
                         Loc loc = Loc::current());

/// Collective over `comm` (the ranks of mesh axis `axis`): throws the same PlanError on every rank unless
/// every rank passes the same `header` line (e.g. bucket sizes) and the same parameter paths, dtypes and
/// shapes in the same order, naming the first difference and the ranks that differ from rank 0 (an error
/// at start instead of collectives that hang or mix tensors later). Used by GradientSync and ZeroShards.
void check_same_parameters(Communicator& comm, const std::string& axis, const ParamTree& params,
                           const std::string& header, Loc loc = Loc::current());

/// Which shard of the data this rank reads: `index` of `count` equal shards.
struct DataShard {
  int index = 0;
  int count = 1;
};
/// The DP axis's coordinate and size when the plan has DP (ranks that differ only in other axes, e.g.
/// tensor-parallel peers, read the same shard); {0, 1} otherwise. Throws PlanError via plan.validate().
DataShard data_shard(const Mesh& mesh, const Plan& plan, Loc loc = Loc::current());

/// A key for this rank's own random stream: fold_in(base, world rank).
RngKey rank_key(RngKey base, const Mesh& mesh);

}  // namespace titanax
