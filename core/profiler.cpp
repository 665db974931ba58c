#include "core/profiler.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <set>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "core/op.h"

namespace titanax {
namespace {

thread_local OpProfiler* t_profiler = nullptr;

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Waits for every CUDA device the tensors live on.
void synchronize_devices(std::initializer_list<const TensorList*> lists) {
  std::set<int> devices;
  for (const TensorList* l : lists)
    for (const Tensor& t : *l)
      if (t.defined() && t.device().is_cuda()) devices.insert(t.device().index);
  for (int d : devices) cuda_rt::synchronize(d);
}

}  // namespace

OpProfiler::OpProfiler(bool synchronize) : synchronize_(synchronize) {
  if (t_profiler)
    throw ValueError("OpProfiler: this thread already has a profiler", "one OpProfiler per thread at a time",
                     "a second one constructed while the first is alive", "read the first one's table instead");
  t_profiler = this;
}

OpProfiler::~OpProfiler() { t_profiler = nullptr; }

OpProfiler* OpProfiler::current() { return t_profiler; }

double OpProfiler::start(const TensorList& in) {
  if (synchronize_) synchronize_devices({&in});
  return now_seconds();
}

void OpProfiler::stop(const Op& op, double t0, const TensorList& in, const TensorList& out) {
  if (synchronize_) synchronize_devices({&in, &out});
  const double t = now_seconds() - t0;
  int64_t bytes = 0;
  for (const Tensor& o : out)
    if (o.defined()) bytes += o.numel() * int64_t(itemsize(o.dtype()));
  record(op.name(), t, bytes);
}

void OpProfiler::record(const std::string& name, double seconds, int64_t output_bytes) {
  Entry& e = entries_[name];
  e.op = name;
  ++e.calls;
  e.seconds += seconds;
  e.output_bytes += output_bytes;
}

ProfileRange::ProfileRange(std::string name, Device device)
    : prof_(OpProfiler::current()), name_(std::move(name)), device_(device) {
  if (!prof_) return;
  if (prof_->synchronizes() && device_.is_cuda()) cuda_rt::synchronize(device_.index);
  t0_ = now_seconds();
}

ProfileRange::~ProfileRange() {
  if (!prof_ || OpProfiler::current() != prof_) return;  // no profiler, or it ended inside the range
  if (prof_->synchronizes() && device_.is_cuda()) cuda_rt::synchronize(device_.index);
  prof_->record(name_, now_seconds() - t0_);
}

std::vector<OpProfiler::Entry> OpProfiler::entries() const {
  std::vector<Entry> v;
  for (const auto& [name, e] : entries_) v.push_back(e);
  std::stable_sort(v.begin(), v.end(), [](const Entry& a, const Entry& b) { return a.seconds > b.seconds; });
  return v;
}

double OpProfiler::total_seconds() const {
  double s = 0;
  for (const auto& [name, e] : entries_) s += e.seconds;
  return s;
}

std::string OpProfiler::table(size_t top, int64_t steps) const {
  if (steps < 1) throw ValueError("OpProfiler::table: steps must be >= 1", ">= 1", std::to_string(steps));
  const double total = total_seconds(), per = 1.0 / double(steps);
  std::string s = fmt::format("{:<40} {:>10} {:>12} {:>7} {:>12}\n", "op", "calls", "ms", "share", "out MB");
  const std::vector<Entry> es = entries();
  for (size_t i = 0; i < es.size() && i < top; ++i) {
    const Entry& e = es[i];
    s += fmt::format("{:<40} {:>10.1f} {:>12.3f} {:>6.1f}% {:>12.1f}\n", e.op, double(e.calls) * per, e.seconds * per * 1e3,
                     total > 0 ? 100.0 * e.seconds / total : 0.0, double(e.output_bytes) * per / 1e6);
  }
  if (es.size() > top) s += fmt::format("({} more ops)\n", es.size() - top);
  s += fmt::format("{:<40} {:>10} {:>12.3f}\n", "total", "", total * per * 1e3);
  return s;
}

void OpProfiler::reset() { entries_.clear(); }

}  // namespace titanax
