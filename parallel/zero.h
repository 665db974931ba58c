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
//
// Partition: parameter i with N elements is cut into n chunks of C = ceil(N / n) elements (the last ones
// shorter, or empty when N < n); rank r owns elements [r C, min(N, (r + 1) C)). Parameters are packed
// into buckets of up to `bucket_bytes` (one dtype per bucket), each bucket laid out rank by rank with
// every chunk padded to C, so one reduce-scatter or all-gather moves a whole bucket.
//
// The collectives are the ops of parallel/collectives.h, so a traced training step (jit/graph.h)
// records them and the graph replays them; masters() are tensors that exist before a trace (written in
// place by the optimizer, read by all_gather_into).
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/tree.h"
#include "parallel/mesh.h"
#include "parallel/sharding.h"

namespace titanax {

class ZeroShards {
 public:
  /// Collective over `axis`: every rank passes the same paths, shapes and dtypes (else every rank throws
  /// the same PlanError naming the first difference). Parameters must be floating, contiguous and on
  /// one device (ValueError otherwise); PlanError when `axis` is not in the mesh.
  ZeroShards(const Mesh& mesh, const std::string& axis, const ParamTree& params, size_t bucket_bytes = 25u << 20,
             Loc loc = Loc::current());

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
  /// The whole tensors (the parameters' shapes, by path) whose parts are every rank's `parts` (by
  /// position range(i)-long 1-d tensors on each rank, e.g. masters() or a moment of the optimizer): one
  /// all-gather per bucket. Collective; written with ops (traceable).
  ParamTree all_gather(const ParamTree& parts) const;
  /// all_gather(masters()) written into `params` in place (copy_).
  void all_gather_into(ParamTree& params) const;
  /// This rank's part of each of `whole` (by position the parameters' shapes; ShapeError otherwise), as
  /// 1-d views, by path: what the optimizer state of a checkpoint's whole tensors is loaded from.
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
  std::vector<std::vector<size_t>> buckets_;  // parameter indices, in order
  ParamTree masters_;
  Tensor part_of(size_t i, const Tensor& whole) const;
  void check_count(const ParamTree& t, const char* what) const;
};

}  // namespace titanax
