#include "parallel/overlap.h"

#include <algorithm>

#include "core/error.h"

namespace titanax::detail {

OverlappedBuckets::OverlappedBuckets(std::string who, std::vector<std::string> paths, std::vector<Shape> shapes,
                                     std::vector<std::vector<size_t>> buckets, Start start)
    : who_(std::move(who)), paths_(std::move(paths)), shapes_(std::move(shapes)), buckets_(std::move(buckets)),
      start_(std::move(start)), bucket_of_(paths_.size(), -1), reqs_(buckets_.size()), grads_(paths_.size()),
      reported_(paths_.size()) {
  for (size_t b = 0; b < buckets_.size(); ++b)
    for (size_t i : buckets_[b]) bucket_of_.at(i) = int(b);
  reset();
}

OverlappedBuckets::~OverlappedBuckets() { reset(); }

void OverlappedBuckets::report(size_t i, const Tensor& grad) {
  if (i >= paths_.size())
    throw ValueError(who_ + ": gradient index out of range", "< " + std::to_string(paths_.size()), std::to_string(i));
  if (reported_[i])
    throw ValueError(who_ + ": gradient of '" + paths_[i] + "' reported twice in one step", "one report per step",
                     "a second report", "call finish() (or reset()) between steps");
  if (!grad.defined())
    throw ValueError(who_ + ": undefined gradient for '" + paths_[i] + "'", "a tensor", "Tensor()");
  if (grad.shape() != shapes_[i])
    throw ShapeError(who_ + ": gradient of '" + paths_[i] + "' has the wrong shape", shapes_[i].str(), grad.shape().str());
  reported_[i] = true;
  grads_[i] = grad.detach();
  if (bucket_of_[i] >= 0 && --pending_[size_t(bucket_of_[i])] == 0) start_ready();
  for (size_t b = 0; b < next_; ++b)
    if (reqs_[b]->test()) reqs_[b]->wait();  // idempotent; frees what the request kept
}

void OverlappedBuckets::start_ready() {
  while (next_ < buckets_.size() && pending_[next_] == 0) {
    reqs_[next_] = start_(next_);
    for (size_t i : buckets_[next_]) grads_[i] = Tensor();  // packed: the bucket's buffer holds them now
    ++next_;
  }
}

void OverlappedBuckets::complete() {
  for (auto& p : pending_) p = 0;  // missing gradients count as zeros
  start_ready();
  for (auto& r : reqs_) r->wait();
}

void OverlappedBuckets::reset() {
  for (auto& r : reqs_) {
    if (!r) continue;
    try {
      r->wait();
    } catch (...) {  // the step is abandoned; its error was raised where it happened
    }
    r.reset();
  }
  pending_.assign(buckets_.size(), 0);
  for (size_t b = 0; b < buckets_.size(); ++b) pending_[b] = buckets_[b].size();
  for (auto& g : grads_) g = Tensor();
  reported_.assign(paths_.size(), false);
  next_ = 0;
}

bool OverlappedBuckets::in_step() const { return std::find(reported_.begin(), reported_.end(), true) != reported_.end(); }

}  // namespace titanax::detail
