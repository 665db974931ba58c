#include "io/data.h"

#include <cstring>
#include <exception>
#include <numeric>

namespace titanax {

// ---------------------------------------------------------------- Batch

const Tensor& Batch::operator[](const std::string& key) const {
  auto it = items.find(key);
  if (it == items.end()) {
    std::vector<std::string> keys;
    for (const auto& [k, v] : items) keys.push_back(k);
    throw ValueError("batch has no item '" + key + "'", "one of [" + join(keys) + "]", "'" + key + "'",
                     did_you_mean(key, keys));
  }
  return it->second;
}

int64_t Batch::size() const {
  if (items.empty()) return 0;
  const Tensor& t = items.begin()->second;
  return t.dim() == 0 ? 1 : t.shape()[0];
}

Batch Batch::slice(int64_t start, int64_t stop) const {
  Batch out;
  for (const auto& [k, t] : items) out.items.emplace(k, t.slice(0, start, stop));
  return out;
}

Batch Batch::to(Device device) const {
  Batch out;
  for (const auto& [k, t] : items) out.items.emplace(k, t.to(device));
  return out;
}

// ---------------------------------------------------------------- TensorDataset

TensorDataset::TensorDataset(std::map<std::string, Tensor> items) {
  bool first = true;
  std::string first_key;
  for (auto& [k, t] : items) {
    if (!t.defined()) throw ValueError("TensorDataset item '" + k + "' is an undefined tensor");
    if (t.dim() == 0)
      throw ShapeError("TensorDataset item '" + k + "' has no leading (example) dimension",
                       "a tensor of rank >= 1", t.str());
    if (first) {
      n_ = t.shape()[0];
      first_key = k;
      first = false;
    } else if (t.shape()[0] != n_) {
      throw ShapeError("TensorDataset items differ in their leading dimension",
                       "'" + k + "' with " + std::to_string(n_) + " rows (as '" + first_key + "')",
                       "'" + k + "': " + t.str());
    }
    // Rows are gathered with memcpy: keep a contiguous host copy.
    Tensor c = t.detach();
    if (!c.device().is_cpu()) c = c.to(Device::cpu());
    if (!c.is_contiguous()) c = c.contiguous();
    items_.emplace(k, c);
  }
}

int64_t TensorDataset::size() const { return n_; }

Batch TensorDataset::get(const std::vector<int64_t>& indices) const {
  for (int64_t i : indices)
    if (i < 0 || i >= n_)
      throw ValueError("dataset index out of range", "0 <= index < " + std::to_string(n_), std::to_string(i));
  Batch b;
  const int64_t m = int64_t(indices.size());
  for (const auto& [k, t] : items_) {
    Shape s = t.shape();
    s[0] = m;
    Tensor out = empty(s, t.dtype());
    const size_t row = n_ ? t.nbytes() / size_t(n_) : 0;
    const char* src = static_cast<const char*>(t.raw_data());
    char* dst = static_cast<char*>(out.raw_data());
    for (int64_t j = 0; j < m; ++j) std::memcpy(dst + size_t(j) * row, src + size_t(indices[size_t(j)]) * row, row);
    b.items.emplace(k, out);
  }
  return b;
}

// ---------------------------------------------------------------- DataLoader

DataLoader::DataLoader(std::shared_ptr<const Dataset> data, LoaderOptions opts)
    : data_(std::move(data)), opts_(opts) {
  if (!data_) throw ValueError("DataLoader needs a dataset", "a non-null dataset", "nullptr");
  if (opts_.world < 1)
    throw ValueError("DataLoader world size must be positive", "world >= 1", std::to_string(opts_.world));
  if (opts_.rank < 0 || opts_.rank >= opts_.world)
    throw ValueError("DataLoader rank out of range", "0 <= rank < " + std::to_string(opts_.world),
                     std::to_string(opts_.rank));
  if (opts_.batch_size < 1)
    throw ValueError("DataLoader batch size must be positive", "batch_size >= 1", std::to_string(opts_.batch_size));
  if (opts_.batch_size % opts_.world != 0)
    throw ValueError("global batch size does not divide by the number of ranks",
                     "a batch_size divisible by world = " + std::to_string(opts_.world),
                     "batch_size = " + std::to_string(opts_.batch_size),
                     "use a batch size that is a multiple of " + std::to_string(opts_.world));
  if (opts_.batch_size > data_->size())
    throw ValueError("batch size exceeds the dataset size",
                     "batch_size <= " + std::to_string(data_->size()) + " examples",
                     "batch_size = " + std::to_string(opts_.batch_size));
  if (opts_.prefetch < 0)
    throw ValueError("DataLoader prefetch must be >= 0", "prefetch >= 0", std::to_string(opts_.prefetch));
  start_worker();
}

DataLoader::~DataLoader() { stop_worker(); }

int64_t DataLoader::steps_per_epoch() const { return data_->size() / opts_.batch_size; }

std::vector<int64_t> DataLoader::epoch_permutation(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> p(size_t(std::max<int64_t>(n, 0)));
  std::iota(p.begin(), p.end(), int64_t(0));
  const RngKey key = fold_in(RngKey::from_seed(seed), uint64_t(epoch));
  for (int64_t i = n - 1; i >= 1; --i) {
    const uint64_t d = uint64_t(n - 1 - i);
    auto w = philox4x32({uint32_t(d), uint32_t(d >> 32), 0x7065726du /* "perm" */, 0u}, key);
    const uint64_t u = (uint64_t(w[0]) << 32) | w[1];
    const int64_t j = int64_t(u % uint64_t(i + 1));
    std::swap(p[size_t(i)], p[size_t(j)]);
  }
  return p;
}

std::shared_ptr<const std::vector<int64_t>> DataLoader::permutation(int64_t epoch) const {
  std::lock_guard<std::mutex> lock(perm_mu_);
  auto it = perm_cache_.find(epoch);
  if (it != perm_cache_.end()) return it->second;
  std::shared_ptr<const std::vector<int64_t>> p;
  if (opts_.shuffle) {
    p = std::make_shared<const std::vector<int64_t>>(epoch_permutation(data_->size(), opts_.seed, epoch));
  } else {
    auto v = std::make_shared<std::vector<int64_t>>(size_t(data_->size()));
    std::iota(v->begin(), v->end(), int64_t(0));
    p = std::move(v);
  }
  // A handful of epochs is enough (the consumer and the worker are at most one epoch apart).
  while (perm_cache_.size() >= 4) perm_cache_.erase(perm_cache_.begin());
  perm_cache_.emplace(epoch, p);
  return p;
}

std::vector<int64_t> DataLoader::indices(int64_t step) const {
  if (step < 0) throw ValueError("negative loader step", "step >= 0", std::to_string(step));
  const int64_t spe = steps_per_epoch();
  const int64_t epoch = step / spe, pos = step % spe;
  const int64_t B = opts_.batch_size, per_rank = B / opts_.world;
  const int64_t begin = pos * B + int64_t(opts_.rank) * per_rank;
  if (!opts_.shuffle) {  // the identity order: no permutation to build (datasets may be large and lazy)
    std::vector<int64_t> out(static_cast<size_t>(per_rank));
    std::iota(out.begin(), out.end(), begin);
    return out;
  }
  auto perm = permutation(epoch);
  return std::vector<int64_t>(perm->begin() + begin, perm->begin() + begin + per_rank);
}

Batch DataLoader::next() {
  if (opts_.prefetch == 0) {
    Batch b = data_->get(indices(step_));
    ++step_;
    return b;
  }
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return !ready_.empty() || error_ != nullptr; });
  if (ready_.empty()) std::rethrow_exception(error_);
  // The worker builds batches in order starting at step_, so the front is always the one wanted.
  auto item = std::move(ready_.front());
  ready_.pop_front();
  lock.unlock();
  cv_.notify_all();
  if (item.first != step_)
    throw InternalError("DataLoader prefetch out of order", "batch " + std::to_string(step_),
                        "batch " + std::to_string(item.first));
  ++step_;
  return std::move(item.second);
}

void DataLoader::seek(int64_t step) {
  if (step < 0) throw ValueError("negative loader step", "step >= 0", std::to_string(step));
  stop_worker();
  step_ = step;
  start_worker();
}

void DataLoader::start_worker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ready_.clear();
    error_ = nullptr;
    stop_ = false;
    next_to_make_ = step_;
  }
  if (opts_.prefetch == 0) return;
  worker_ = std::thread([this] {
    for (;;) {
      int64_t s;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || int64_t(ready_.size()) < opts_.prefetch; });
        if (stop_) return;
        s = next_to_make_++;
      }
      try {
        Batch b = data_->get(indices(s));
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_) return;
        ready_.emplace_back(s, std::move(b));
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        error_ = std::current_exception();
        cv_.notify_all();
        return;
      }
      cv_.notify_all();
    }
  });
}

void DataLoader::stop_worker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  std::lock_guard<std::mutex> lock(mu_);
  ready_.clear();
}

}  // namespace titanax
