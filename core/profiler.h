// Per-op time of an eager program, grouped by op name: what torch.profiler's key_averages() table gives a
// PyTorch user, for finding the ops a step spends its time in before tuning any of them.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace titanax {

class Op;

/// While alive, times every op the calling thread applies at the top level (titanax::apply: ops an op runs
/// inside itself count toward it), by name. With `synchronize` (the default) it waits for the CUDA devices
/// of an op's inputs before the op and for those of its inputs and outputs after it, so that an op's time
/// is its kernels' device time plus its host work (and the waits cost their latency: a profiled step runs
/// slower than an unprofiled one, and the table's shares are what to read). Without it, an op's time is its
/// host time only (kernel launches are asynchronous). A jit-compiled function's replays run their nodes
/// without apply(), so they are not broken down: profile the eager step.
/// One profiler per thread at a time: constructing a second throws ValueError. Not copyable or movable.
class OpProfiler {
 public:
  struct Entry {
    std::string op;            ///< Op::name()
    int64_t calls = 0;         ///< top-level applications
    double seconds = 0;        ///< wall time of those, in seconds
    int64_t output_bytes = 0;  ///< bytes of the outputs they produced (views included)
  };
  explicit OpProfiler(bool synchronize = true);
  ~OpProfiler();
  OpProfiler(const OpProfiler&) = delete;
  OpProfiler& operator=(const OpProfiler&) = delete;

  /// The entries, the most time first.
  std::vector<Entry> entries() const;
  /// Seconds over every entry.
  double total_seconds() const;
  /// A table of the `top` entries with the most time: per op its calls, milliseconds and share of the total,
  /// and output megabytes; `steps` > 1 divides calls, times and bytes by it (a profile of several steps
  /// read per step). Throws ValueError for steps < 1.
  std::string table(size_t top = 20, int64_t steps = 1) const;
  /// Forgets every entry (e.g. after warm-up steps).
  void reset();

  /// The calling thread's profiler, or nullptr.
  static OpProfiler* current();
  /// Called by apply() around an op's forward: start() before it (returns the start time), stop() after.
  double start(const TensorList& in);
  void stop(const Op& op, double t0, const TensorList& in, const TensorList& out);
  /// Adds one call of `seconds` and `output_bytes` under `name` (ProfileRange's record).
  void record(const std::string& name, double seconds, int64_t output_bytes = 0);
  /// Whether it waits for the devices around what it times.
  bool synchronizes() const { return synchronize_; }

 private:
  bool synchronize_;
  std::map<std::string, Entry> entries_;
};

/// Times a region of host code that queues work without apply() (an optimizer's fused multi-tensor
/// update) into the calling thread's OpProfiler under `name`, as one call, waiting for `device` at both
/// ends when the profiler synchronizes; does nothing when no profiler is installed. PyTorch's
/// torch.profiler.record_function. Not copyable.
class ProfileRange {
 public:
  ProfileRange(std::string name, Device device);
  ~ProfileRange();
  ProfileRange(const ProfileRange&) = delete;
  ProfileRange& operator=(const ProfileRange&) = delete;

 private:
  OpProfiler* prof_;
  std::string name_;
  Device device_;
  double t0_ = 0;
};

}  // namespace titanax
