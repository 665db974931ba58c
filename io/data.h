// Datasets and the batch loader.
//
// Order is global and deterministic: epoch e visits the examples in the permutation drawn from
// Philox(fold_in(seed, e)) (DataLoader::epoch_permutation gives the exact algorithm); global batch s
// of the run is positions [s*B, (s+1)*B) of that order
// (epochs wrap, the last partial batch of an epoch is dropped). Rank r of `world` gets the contiguous
// slice [r*B/world, (r+1)*B/world) of every global batch, so any rank count sees the same global batch
// and a run resumed at step s reads exactly what the uninterrupted run would have.
#pragma once

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"

namespace titanax {

/// Named tensors of one batch: "x" (inputs) and "y" (labels) by convention.
struct Batch {
  std::map<std::string, Tensor> items;
  /// Throws ValueError naming the keys present.
  const Tensor& operator[](const std::string& key) const;
  /// Number of examples (leading dimension of the first item).
  int64_t size() const;
  /// Rows [start, stop) of every item (views).
  Batch slice(int64_t start, int64_t stop) const;
  /// Every item on `device` (items already there are shared, not copied). Throws DeviceError for a
  /// device the build or the machine does not have.
  Batch to(Device device) const;
};

class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual int64_t size() const = 0;
  /// Gathers the examples at `indices` into one batch (copies).
  virtual Batch get(const std::vector<int64_t>& indices) const = 0;
};

/// A dataset held in memory as tensors sharing their leading dimension.
class TensorDataset final : public Dataset {
 public:
  /// Throws ShapeError when the leading dimensions differ.
  explicit TensorDataset(std::map<std::string, Tensor> items);
  int64_t size() const override;
  Batch get(const std::vector<int64_t>& indices) const override;
  const std::map<std::string, Tensor>& items() const { return items_; }

 private:
  std::map<std::string, Tensor> items_;
  int64_t n_ = 0;
};

struct LoaderOptions {
  int64_t batch_size = 128;  ///< global batch (over all ranks)
  bool shuffle = true;
  uint64_t seed = 0;
  int rank = 0;              ///< this rank's slice of each global batch
  int world = 1;             ///< ranks sharing the global batch; must divide batch_size
  int prefetch = 2;          ///< batches prepared ahead on a background thread (0 = synchronous)
};

/// Endless iterator over global batches (epochs wrap). Thread-safe to destroy while prefetching.
///
/// Prefetch (opts.prefetch > 0): a background thread builds the next `prefetch` batches of this rank
/// in order; next() hands them out. An exception thrown by the dataset while building batch s is
/// rethrown by the next() call that would have returned batch s (and by every later next() until
/// seek() restarts the worker). The destructor stops and joins the worker. next() and seek() must be
/// called from one thread at a time.
class DataLoader {
 public:
  /// Throws ValueError when batch_size does not divide by world, or exceeds the dataset size.
  DataLoader(std::shared_ptr<const Dataset> data, LoaderOptions opts);
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  /// This rank's part of the next global batch (opts.batch_size / opts.world examples), then advances.
  /// Rethrows what the dataset threw while building that batch.
  Batch next();
  /// Positions the loader so the next batch is global batch `step` (for resume); restarts the
  /// prefetch worker (dropping batches prepared ahead). Throws ValueError for step < 0.
  void seek(int64_t step);
  /// Global batch index the next call to next() returns.
  int64_t step() const { return step_; }
  /// floor(dataset size / batch_size): global batches per epoch (the partial last one is dropped).
  int64_t steps_per_epoch() const;
  const LoaderOptions& options() const { return opts_; }
  /// Dataset indices of global batch `step` for this rank's slice (what next() would read).
  /// Throws ValueError for step < 0.
  std::vector<int64_t> indices(int64_t step) const;

  /// The order in which epoch `epoch` visits the examples 0..n-1 when shuffling:
  /// key = fold_in(RngKey::from_seed(seed), epoch); start from the identity p = [0, 1, ..., n-1] and
  /// for i = n-1 down to 1 (draw number d = n-1-i = 0, 1, ...) swap p[i] with p[j], j = u % (i + 1),
  /// where u is the 64-bit word (w0 << 32 | w1) of block philox4x32({d, d >> 32, 0x7065726d, 0}, key)
  /// (Fisher-Yates; the modulo bias is below n / 2^64). Without shuffling the order is the identity
  /// (computed per batch, so a large lazy dataset costs no O(n) memory).
  static std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch);

 private:
  void start_worker();
  void stop_worker();
  std::shared_ptr<const Dataset> data_;
  LoaderOptions opts_;
  int64_t step_ = 0;
  // prefetch
  std::thread worker_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<int64_t, Batch>> ready_;
  int64_t next_to_make_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
  // Permutations of recent epochs, shared with the worker thread (entries are immutable once made).
  mutable std::mutex perm_mu_;
  mutable std::map<int64_t, std::shared_ptr<const std::vector<int64_t>>> perm_cache_;
  std::shared_ptr<const std::vector<int64_t>> permutation(int64_t epoch) const;
};

}  // namespace titanax
