#include "core/allocator.h"

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/error.h"

namespace titanax {

std::string AllocatorStats::str() const {
  return "current=" + std::to_string(current_bytes) + "B peak=" + std::to_string(peak_bytes) +
         "B reserved=" + std::to_string(reserved_bytes) + "B allocs=" + std::to_string(num_allocs) +
         " system_allocs=" + std::to_string(num_system_allocs);
}

AllocatorStats StatsAllocator::stats() const {
  std::lock_guard<std::mutex> g(mu_);
  return stats_;
}

void StatsAllocator::reset_peak() {
  std::lock_guard<std::mutex> g(mu_);
  stats_.peak_bytes = stats_.current_bytes;
}

void StatsAllocator::note_alloc(size_t bytes) {
  stats_.current_bytes += int64_t(bytes);
  if (stats_.current_bytes > stats_.peak_bytes) stats_.peak_bytes = stats_.current_bytes;
}

namespace {

// Caching CPU allocator. Blocks are rounded to 64 bytes (small) or 4 KiB (large) and kept on a per-size
// free list when freed, so a training loop that allocates the same shapes every step stops calling
// malloc after the first step (and stops paying for page faults on fresh mmap'd memory).
class CpuAllocator final : public StatsAllocator {
 public:
  static constexpr size_t kAlign = 64;
  static constexpr int64_t kMaxCachedBytes = int64_t(2) << 30;

  void* allocate(size_t bytes) override {
    size_t sz = round(bytes);
    {
      std::lock_guard<std::mutex> g(mu_);
      ++stats_.num_allocs;
      auto it = free_.find(sz);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= int64_t(sz);
        note_alloc(sz);
        return p;
      }
      ++stats_.num_system_allocs;
    }
    void* p = std::aligned_alloc(kAlign, sz);
    if (!p) {
      empty_cache();
      p = std::aligned_alloc(kAlign, sz);
    }
    if (!p)
      throw OutOfMemoryError("CPU allocation failed", std::to_string(bytes) + " bytes", stats().str(),
                             "reduce the batch size or model size");
    std::lock_guard<std::mutex> g(mu_);
    stats_.reserved_bytes += int64_t(sz);
    note_alloc(sz);
    return p;
  }

  void deallocate(void* p, size_t bytes) override {
    if (!p) return;
    size_t sz = round(bytes);
    std::lock_guard<std::mutex> g(mu_);
    note_free(sz);
    if (cached_ + int64_t(sz) <= kMaxCachedBytes) {
      free_[sz].push_back(p);
      cached_ += int64_t(sz);
    } else {
      stats_.reserved_bytes -= int64_t(sz);
      std::free(p);
    }
  }

  Device device() const override { return Device::cpu(); }
  void empty_cache() override {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& [sz, list] : free_) {
      for (void* p : list) std::free(p);
      stats_.reserved_bytes -= int64_t(sz * list.size());
    }
    free_.clear();
    cached_ = 0;
  }

 private:
  static size_t round(size_t b) {
    if (b == 0) b = 1;
    size_t g = b <= 4096 ? kAlign : 4096;
    return (b + g - 1) / g * g;
  }
  int64_t cached_ = 0;
  std::unordered_map<size_t, std::vector<void*>> free_;
};

}  // namespace

Allocator& allocator_for(Device d) {
  if (d.is_cpu()) {
    static CpuAllocator* cpu = new CpuAllocator();  // never destroyed: tensors may outlive statics
    return *cpu;
  }
  return cuda_allocator(d.index);
}

}  // namespace titanax
