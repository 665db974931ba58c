// Internal: the bookkeeping shared by the collectives that overlap the backward pass, GradientSync's
// bucketed all-reduce (parallel/dp.h) and ZeroShards' bucketed reduce-scatter (parallel/zero.h).
// Gradients are reported one per parameter and step as backward produces them; bucket b is started
// once every gradient of b has arrived and buckets 0 .. b-1 have started, so every rank starts the same
// collectives in the same order (as PyTorch DDP's reducer).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace titanax::detail {

class OverlappedBuckets {
 public:
  /// Starts bucket b's collective and returns its request; reads grad(i) of the bucket's parameters
  /// (undefined: not reported, counts as zeros).
  using Start = std::function<std::unique_ptr<CollectiveRequest>(size_t bucket)>;

  /// `who` names the owner in errors ("GradientSync"); `paths` / `shapes`: the parameters; `buckets`:
  /// parameter indices per bucket, in launch order (parameters in no bucket are only stored).
  OverlappedBuckets(std::string who, std::vector<std::string> paths, std::vector<Shape> shapes,
                    std::vector<std::vector<size_t>> buckets, Start start);
  ~OverlappedBuckets();
  OverlappedBuckets(const OverlappedBuckets&) = delete;
  OverlappedBuckets& operator=(const OverlappedBuckets&) = delete;

  /// Stores parameter i's gradient (detached), starts every bucket that became ready (and then lets go
  /// of its gradients: `start` has packed them) and drives the buckets in flight, completing those that
  /// are done (MPI advances non-blocking collectives only inside MPI calls; a completed request releases
  /// the buffers it kept). ValueError
  /// for an index out of range, a second report of i in one step or an undefined gradient; ShapeError
  /// for another shape than the parameter's.
  void report(size_t i, const Tensor& grad);
  /// Collective: starts the buckets not started yet (missing gradients count as zeros) and waits for
  /// every bucket. CollectiveError when a collective failed.
  void complete();
  /// Parameter i's gradient as reported this step: undefined when it was not, or once its bucket started.
  const Tensor& grad(size_t i) const { return grads_.at(i); }
  /// Whether a gradient has been reported since the last reset().
  bool in_step() const;
  /// The parameters' paths, in order.
  const std::vector<std::string>& paths() const { return paths_; }
  /// Waits for the buckets started (ignoring their errors) and drops the gradients: the next step starts
  /// afresh. Not collective by itself: the ranks must agree on abandoning a step.
  void reset();

 private:
  void start_ready();
  std::string who_;
  std::vector<std::string> paths_;
  std::vector<Shape> shapes_;
  std::vector<std::vector<size_t>> buckets_;
  Start start_;
  std::vector<int> bucket_of_;  // -1: in no bucket
  std::vector<size_t> pending_;
  std::vector<std::unique_ptr<CollectiveRequest>> reqs_;
  std::vector<Tensor> grads_;
  std::vector<bool> reported_;
  size_t next_ = 0;  // the next bucket to start
};

}  // namespace titanax::detail
