// Optimizer-state sharding over the data-parallel axis: ZeRO stage 1 (Rajbhandari et al. 2020, "ZeRO:
// Memory Optimizations Toward Training Trillion Parameter Models", arXiv:1910.02054; Megatron-LM's
// distributed optimizer, PyTorch's ZeroRedundancyOptimizer). Plan: DP::shard_optimizer.
//
// Every rank of the axis keeps the whole parameters, but each owns one contiguous 1 / n of every
// parameter's flattened elements and keeps the optimizer state (Adam's moments, SGD's momentum) for that
// part only. A step:
//   ZeroShards z(mesh, "data", params);          // collective: the same parameters on every rank
//   z.load_masters(params);                      // this rank's part of each parameter, copied
//   ParamTree g = z.reduce_scatter_mean(grads);  // the mean over the axis, this rank's part only
//   opt->step(z.masters(), g);                   // the optimizer state is 1 / n of the model's
//   z.all_gather_into(params);                   // every rank's updated part, into the whole parameters
// The reduce-scatter and the all-gather together move as many bytes as the all-reduce they replace.
// Eager steps overlap the reduce-scatter with backward instead (as GradientSync does the all-reduce):
//   BackwardOptions o;
//   o.on_grad_ready = z.hook();                  // a bucket's reduce-scatter starts when its gradients are in
//   auto [loss, grads] = value_and_grad(loss_fn, params, o);
//   ParamTree g = z.finish();                    // == reduce_scatter_mean(grads)
//
// Partition: parameter i with N elements is cut into n chunks of C = ceil(N / n) elements (the last ones
// shorter, or empty when N < n); rank r owns elements [r C, min(N, (r + 1) C)). Parameters are packed
// into buckets in reverse order (the order backward produces their gradients): a first bucket of up to
// `first_bucket_bytes`, then up to `bucket_bytes` each (padded bytes over all ranks; one dtype per
// bucket; a larger parameter alone), each bucket laid out rank by rank with every chunk padded to C, so
// one reduce-scatter or all-gather moves a whole bucket.
//
// The collectives of reduce_scatter_mean and all_gather are the ops of parallel/collectives.h, so a
// traced training step (jit/graph.h) records them and the graph replays them; masters() are tensors
// that exist before a trace (written in place by the optimizer, read by all_gather_into). The
// overlapped path calls the communicator directly (eager only).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tree.h"
#include "parallel/mesh.h"
#include "parallel/sharding.h"

namespace titanax {
namespace detail {
class OverlappedBuckets;
}

class ZeroShards {
 public:
  /// Collective over `axis`: every rank passes the same paths, shapes and dtypes (else every rank throws
  /// the same PlanError naming the first difference). Parameters must be floating, contiguous and on
  /// one device (ValueError otherwise); PlanError when `axis` is not in the mesh.
  ZeroShards(const Mesh& mesh, const std::string& axis, const ParamTree& params, size_t bucket_bytes = 25u << 20,
             size_t first_bucket_bytes = 1u << 20, Loc loc = Loc::current());
  ~ZeroShards();
  ZeroShards(const ZeroShards&) = delete;
  ZeroShards& operator=(const ZeroShards&) = delete;

  /// The paths of the parameters, in the order given.
  std::vector<std::string> paths() const;
  /// [begin, end) of parameter i's flattened elements that this rank owns (empty when begin == end).
  std::pair<int64_t, int64_t> range(size_t i) const;

  /// This rank's part of every parameter: 1-d tensors of range(i)'s length (possibly 0), the parameters'
  /// dtypes and device, by path. The optimizer steps these in place.
  ParamTree& masters() { return masters_; }
  /// Copies this rank's part of each of `params` (the tensors it was made for, by position) into
  /// masters(). ShapeError when a shape differs.
  void load_masters(const ParamTree& params);
  /// The mean over the axis of `grads` (by position the parameters' shapes), this rank's part of each:
  /// one reduce-scatter per bucket. Collective; written with ops (traceable). ValueError for another
  /// number of tensors than parameters, ShapeError for another shape (the same for the functions below).
  ParamTree reduce_scatter_mean(const ParamTree& grads) const;
  /// Overlapped reduce_scatter_mean: reports the gradient of parameter i (its shape; any floating dtype,
  /// converted to the parameter's) and starts the reduce-scatter of every bucket that is complete and
  /// whose predecessors have started (ireduce_scatter). Plug into BackwardOptions::on_grad_ready (see
  /// hook()). ValueError for an index out of range, a second report in one step or an undefined
  /// gradient; ShapeError for another shape.
  void on_grad_ready(size_t i, const Tensor& grad);
  /// [this](size_t i, const Tensor& g) { on_grad_ready(i, g); } (the object must outlive the callback).
  std::function<void(size_t, const Tensor&)> hook();
  /// Collective: completes the overlapped step. Gradients never reported count as zeros. Returns what
  /// reduce_scatter_mean would of the reported gradients (bitwise with OpenMPI, as tested; an MPI whose
  /// non-blocking reduce-scatter adds the ranks in another order may differ in the last bits) and resets
  /// for the next step.
  ParamTree finish();
  /// Abandons an overlapped step (e.g. after an exception in backward): waits for the buckets started
  /// and drops the reported gradients. Not collective by itself; ranks must agree on abandoning it.
  void reset();

  /// The buckets, in launch order: each a list of parameter indices (descending).
  const std::vector<std::vector<size_t>>& buckets() const { return buckets_; }

  /// The whole tensors (the parameters' shapes, by path) whose parts are every rank's `parts` (by
  /// position range(i)-long 1-d tensors on each rank, e.g. masters() or a moment of the optimizer): one
  /// all-gather per bucket. Collective; written with ops (traceable).
  ParamTree all_gather(const ParamTree& parts) const;
  /// all_gather(masters()) written into `params` in place (copy_), one bucket at a time (so only one
  /// bucket's gathered copy exists at once).
  void all_gather_into(ParamTree& params) const;
  /// This rank's part of each of `whole` (by position the parameters' shapes; ShapeError otherwise), as
  /// 1-d views, by path (what load_masters copies).
  ParamTree parts_of(const ParamTree& whole) const;

  /// For the gradient norm of the parts (optim::global_norm with specs): each parameter's spec in
  /// `specs` (absent: replicated) with the axis added, so the squares of the parts are summed over it.
  std::map<std::string, PartitionSpec> norm_specs(const std::map<std::string, PartitionSpec>& specs) const;

 private:
  struct Param {
    std::string path;
    Shape shape;
    DType dtype;
    int64_t numel = 0, chunk = 0;  // N, C
  };
  Mesh mesh_;
  std::string axis_;
  int n_ = 1, rank_ = 0;
  std::vector<Param> params_;
  std::vector<std::vector<size_t>> buckets_;  // parameter indices, descending
  ParamTree masters_;
  // The overlapped step: this rank's reduced part [S] of each bucket (the packed gradients [n S] are
  // kept by the request until it completes).
  std::vector<Tensor> reduced_;
  std::unique_ptr<detail::OverlappedBuckets> overlap_;

  Tensor part_of(size_t i, const Tensor& whole) const;
  void check_count(const ParamTree& t, const char* what) const;
  /// ValueError / ShapeError unless `parts` are one range(i)-long 1-d tensor per parameter.
  void check_parts(const ParamTree& parts) const;
  /// S: bucket b's elements per rank (the sum of its parameters' chunks).
  int64_t bucket_elems(size_t b) const;
  /// Bucket b's all-gather of `parts`: whole[i] for each parameter i of b.
  void gather_bucket(size_t b, const ParamTree& parts, std::vector<Tensor>& whole) const;
  /// Parameter i's gradient in its dtype, zero-padded to n C and viewed as [n, C]: row r is rank r's chunk.
  Tensor chunk_rows(size_t i, const Tensor& grad) const;
  /// Parameter i's part of bucket b's reduced [S] (the mean's chunks side by side), for each i of b.
  void unpack_parts(size_t b, const Tensor& mine, std::vector<Tensor>& parts) const;
  std::unique_ptr<CollectiveRequest> launch(size_t b);
};

}  // namespace titanax
