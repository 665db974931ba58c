// Allocators: one per device, with statistics the profiler, the OOM handler and tests read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>

#include "core/device.h"

namespace titanax {

/// Byte counts are of the sizes handed out (rounded up to the allocator's granularity).
struct AllocatorStats {
  int64_t current_bytes = 0;   ///< bytes in live allocations now
  int64_t peak_bytes = 0;      ///< highest current_bytes since start or reset_peak()
  int64_t reserved_bytes = 0;  ///< bytes held from the system: live + cached for reuse
  int64_t num_allocs = 0;      ///< allocate() calls
  int64_t num_system_allocs = 0;  ///< allocations that went to the system (malloc / cudaMalloc): cache misses
  std::string str() const;
};

class Allocator {
 public:
  virtual ~Allocator() = default;
  /// Returns at least `bytes` bytes aligned to 64 bytes (never nullptr; 0 bytes gives a valid pointer).
  /// Throws OutOfMemoryError with the request and the current statistics when it cannot.
  virtual void* allocate(size_t bytes) = 0;
  /// Returns memory from allocate(ptr, same bytes).
  virtual void deallocate(void* ptr, size_t bytes) = 0;
  virtual Device device() const = 0;
  virtual AllocatorStats stats() const = 0;
  /// Sets peak_bytes to current_bytes.
  virtual void reset_peak() = 0;
  /// Gives cached, unused blocks back to the system.
  virtual void empty_cache() = 0;
};

/// What the caching allocators (CPU, CUDA) share: the statistics, the lock that guards them and the
/// allocator's own pools, and their bookkeeping. Derived classes take mu_ around pool and stats updates.
class StatsAllocator : public Allocator {
 public:
  AllocatorStats stats() const override;
  void reset_peak() override;

 protected:
  /// A block of `bytes` handed out (call with mu_ held): current and peak bytes.
  void note_alloc(size_t bytes);
  /// A block of `bytes` given back by its user (call with mu_ held).
  void note_free(size_t bytes) { stats_.current_bytes -= int64_t(bytes); }
  mutable std::mutex mu_;
  AllocatorStats stats_;
};

/// The allocator for a device. The CPU one is a caching, thread-safe pool of 64-byte-aligned blocks.
/// For a CUDA device in a build without CUDA, throws DeviceError.
Allocator& allocator_for(Device d);

/// The CUDA allocator, provided by the CUDA backend (a build without CUDA links a stub that throws).
Allocator& cuda_allocator(int index);

}  // namespace titanax
