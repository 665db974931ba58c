// The CUDA side of core/cuda_runtime.h (device count, copies, synchronisation) and the CUDA caching
// allocator behind core/allocator.h's Allocator interface.
//
// Allocator: stream-ordered caching pool, one per device. Requests are rounded up to 512 B (below 1 MiB)
// or 2 MiB (above); a freed block goes back to the free list of (its stream, its size class) and is handed
// out again only to an allocation on that same stream, so the stream's own ordering guarantees that
// earlier kernels reading or writing the block are done before later ones touch it (no synchronisation,
// no events). Statistics: current / peak / reserved bytes, allocate() calls and cudaMalloc calls. When
// cudaMalloc fails, the cache is freed (after a device synchronisation) and cudaMalloc retried once;
// then OutOfMemoryError carries the request and the statistics. With TITANAX_CUDA_POISON=1 in the
// environment every allocation is filled with 0xFF bytes (NaN) first, so kernels that leave output
// elements unwritten fail the CUDA tests.
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/allocator.h"
#include "core/cuda_runtime.h"
#include "kernels/cpu/nn.h"
#include "kernels/cuda/check.h"

namespace titanax {

namespace kernels::cuda {

void throw_cuda_error(int err, const char* call, const char* file, int line) {
  throw DeviceError(std::string("CUDA call failed: ") + call + " at " + file + ":" + std::to_string(line),
                    "cudaSuccess", std::string(cudaGetErrorName(cudaError_t(err))) + ": " +
                                       cudaGetErrorString(cudaError_t(err)),
                    "check that the GPU is visible (nvidia-smi, CUDA_VISIBLE_DEVICES) and that the build's "
                    "CMAKE_CUDA_ARCHITECTURES covers it");
}

void throw_cublas_error(int status, const char* call, const char* file, int line) {
  throw DeviceError(std::string("cuBLASLt call failed: ") + call + " at " + file + ":" + std::to_string(line),
                    "CUBLAS_STATUS_SUCCESS", "cublasStatus_t " + std::to_string(status),
                    "check the operand shapes and that the GPU supports the requested compute type");
}

}  // namespace kernels::cuda

namespace {

class DeviceGuard {
 public:
  explicit DeviceGuard(int d) {
    TX_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != d) TX_CUDA_CHECK(cudaSetDevice(d));
    cur_ = d;
  }
  ~DeviceGuard() {
    if (prev_ != cur_) cudaSetDevice(prev_);
  }

 private:
  int prev_ = 0, cur_ = 0;
};

// The calling thread's current stream per device (set_current_stream) and the memory pool its
// allocations use while it captures a CUDA graph (begin_capture .. end_capture).
thread_local std::vector<void*> t_streams;
thread_local const void* t_pool = nullptr;
thread_local int t_pool_device = -1;

// cudaMalloc is not queued on a stream, so it may run while a stream captures; CUDA refuses it in the
// strict capture modes, so it runs in relaxed mode (as PyTorch's caching allocator does).
cudaError_t malloc_relaxed(void** p, size_t bytes) {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
  const cudaError_t err = cudaMalloc(p, bytes);
  cudaThreadExchangeStreamCaptureMode(&mode);
  return err;
}

class CudaAllocator final : public StatsAllocator {
 public:
  explicit CudaAllocator(int index) : index_(index) {
    const char* e = std::getenv("TITANAX_CUDA_POISON");
    poison_ = e && *e && *e != '0';
    // The device's report slot (kernels/cuda/launch.h), made here: before any kernel, so never while a
    // stream captures.
    DeviceGuard dg(index);
    void *flag = nullptr, *host = nullptr, *mapped = nullptr;
    TX_CUDA_CHECK(cudaMalloc(&flag, sizeof(int)));
    TX_CUDA_CHECK(cudaMemset(flag, 0, sizeof(int)));
    TX_CUDA_CHECK(cudaHostAlloc(&host, sizeof(kernels::cuda::DeviceReport), cudaHostAllocMapped));
    report = new (host) kernels::cuda::DeviceReport{};
    TX_CUDA_CHECK(cudaHostGetDevicePointer(&mapped, host, 0));
    slot.flag = static_cast<int*>(flag);
    slot.host = static_cast<kernels::cuda::DeviceReport*>(mapped);
  }

  kernels::cuda::ReportSlot slot;                // what kernels write: the flag, the record's device address
  kernels::cuda::DeviceReport* report = nullptr;  // the record, as the host reads it

  static size_t round(size_t b) {
    if (b == 0) b = 1;
    const size_t g = b < (size_t(1) << 20) ? 512 : (size_t(2) << 20);
    return (b + g - 1) / g * g;
  }

  void* allocate(size_t bytes) override {
    const size_t sz = round(bytes);
    void* stream = cuda_rt::current_stream(index_);
    // The free-list key: the capture's pool while this thread captures on this device, else the stream.
    void* key = t_pool && t_pool_device == index_ ? const_cast<void*>(t_pool) : stream;
    {
      std::lock_guard<std::mutex> g(mu_);
      ++stats_.num_allocs;
      auto it = free_.find({key, sz});
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        live_[p] = {key, sz};
        note_alloc(sz);
        if (poison_) fill_nan(p, sz, stream);
        return p;
      }
      ++stats_.num_system_allocs;
    }
    DeviceGuard dg(index_);
    void* p = nullptr;
    cudaError_t err = malloc_relaxed(&p, sz);
    if (err == cudaErrorMemoryAllocation && !t_pool) {  // (emptying the cache synchronises: not while capturing)
      cudaGetLastError();  // clear the sticky-free error state of this failure
      empty_cache();
      err = malloc_relaxed(&p, sz);
    }
    if (err == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      throw OutOfMemoryError("CUDA out of memory on cuda:" + std::to_string(index_),
                             std::to_string(bytes) + " bytes (" + std::to_string(sz) + " rounded)",
                             stats().str() + "; device free " + std::to_string(free_b) + "B of " +
                                 std::to_string(total_b) + "B",
                             "reduce the batch size or sequence length, or free tensors held across steps");
    }
    TX_CUDA_CHECK(err);
    std::lock_guard<std::mutex> g(mu_);
    stats_.reserved_bytes += int64_t(sz);
    live_[p] = {key, sz};
    note_alloc(sz);
    if (poison_) fill_nan(p, sz, stream);
    return p;
  }

  void deallocate(void* p, size_t) override {
    if (!p) return;
    std::lock_guard<std::mutex> g(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return;  // not ours: ignore rather than corrupt the pool
    const auto [key, sz] = it->second;
    live_.erase(it);
    note_free(sz);
    free_[{key, sz}].push_back(p);
  }

  Device device() const override { return Device::cuda(index_); }
  // Frees the cached blocks, except those of the pools of captured graphs (their graphs still write
  // them at every launch) unless `pool` names one: then only that pool's.
  void empty_cache() override { free_cached(nullptr); }
  void free_cached(const void* pool) {
    std::lock_guard<std::mutex> g(mu_);
    if (pool) pools_.erase(pool);  // its blocks still in use are freed by a later empty_cache
    bool any = false;
    for (auto& kv : free_) any = any || (!kv.second.empty() && !keep(kv.first.first, pool));
    if (!any) return;
    DeviceGuard dg(index_);
    cudaDeviceSynchronize();  // cached blocks may still be read by queued work of their stream
    for (auto it = free_.begin(); it != free_.end();) {
      if (keep(it->first.first, pool)) {
        ++it;
        continue;
      }
      for (void* p : it->second) cudaFree(p);
      stats_.reserved_bytes -= int64_t(it->first.second * it->second.size());
      it = free_.erase(it);
    }
  }
  void add_pool(const void* pool) {
    std::lock_guard<std::mutex> g(mu_);
    pools_.insert(pool);
  }

 private:
  // Every byte 0xFF: a NaN in f32 and f64, -1 in integers (tests: unwritten outputs show up).
  void fill_nan(void* p, size_t sz, void* stream) {
    DeviceGuard dg(index_);
    TX_CUDA_CHECK(cudaMemsetAsync(p, 0xFF, sz, static_cast<cudaStream_t>(stream)));
  }

  // Whether free list `key` stays when freeing for `pool` (nullptr: all but the live capture pools).
  bool keep(const void* key, const void* pool) const { return pool ? key != pool : pools_.count(key) > 0; }

  int index_;
  std::set<const void*> pools_;  // capture pools (begin_capture) not yet released
  bool poison_ = false;  // TITANAX_CUDA_POISON=1: fill every allocation with NaN bytes
  std::map<std::pair<void*, size_t>, std::vector<void*>> free_;
  std::unordered_map<void*, std::pair<void*, size_t>> live_;
};

void check_index(int index) {
  const int n = cuda_rt::device_count();
  if (index < 0 || index >= n)
    throw DeviceError("no such CUDA device", "an index in [0, " + std::to_string(n) + ")",
                      "cuda:" + std::to_string(index),
                      n == 0 ? "this machine has no visible GPU: run on the CPU" : "check CUDA_VISIBLE_DEVICES");
}

// The caching allocator of device `index` (made on first use).
CudaAllocator& pool_of(int index) {
  check_index(index);
  static std::mutex mu;
  static std::vector<CudaAllocator*> pools;  // never destroyed: tensors may outlive statics
  std::lock_guard<std::mutex> g(mu);
  if (pools.empty()) pools.resize(size_t(cuda_rt::device_count()), nullptr);
  if (!pools[size_t(index)]) pools[size_t(index)] = new CudaAllocator(index);
  return *pools[size_t(index)];
}

}  // namespace

Allocator& cuda_allocator(int index) { return pool_of(index); }

namespace kernels::cuda {
ReportSlot report_slot(int device) { return pool_of(device).slot; }
}  // namespace kernels::cuda

namespace {
// Throws the report a kernel left on `device` (and clears it for the next one); called after the host
// waited for the device, when every queued kernel's report is visible.
void check_reports(int device) {
  CudaAllocator& a = pool_of(device);
  volatile kernels::cuda::DeviceReport* h = a.report;
  if (h->code == kernels::cuda::kNoReport) return;
  const int code = h->code;
  const int64_t index = h->index, value = h->value, bound = h->bound, aux = h->aux;
  h->code = kernels::cuda::kNoReport;
  TX_CUDA_CHECK(cudaMemsetAsync(a.slot.flag, 0, sizeof(int), static_cast<cudaStream_t>(cuda_rt::current_stream(device))));
  const std::string checked = " (checked on " + Device::cuda(device).str() + ", reported at the host's next wait for it)";
  if (code == kernels::cuda::kLabelOutOfRange)  // the CPU checks' errors, found later
    kernels::cpu::throw_label_out_of_range("cross_entropy" + checked, bound, aux, value, std::to_string(index) + " (flat)");
  if (code == kernels::cuda::kIndexOutOfRange)
    kernels::cpu::throw_index_out_of_range(kernels::cuda::index_op_name(int(aux)) + checked, bound, value,
                                           std::to_string(index) + " (flat)");
  throw InternalError("a CUDA kernel reported an unknown problem", "a known report code", std::to_string(code));
}
}  // namespace

int cuda_device_count() { return cuda_rt::device_count(); }

namespace cuda_rt {

bool built_with_cuda() { return true; }

int device_count() {
  static const int n = [] {
    int c = 0;
    if (cudaGetDeviceCount(&c) != cudaSuccess) {  // no driver / no device: report none, clear the error
      cudaGetLastError();
      return 0;
    }
    return c;
  }();
  return n;
}

void* current_stream(int device) {
  return device >= 0 && size_t(device) < t_streams.size() ? t_streams[size_t(device)] : nullptr;
}

void* create_stream(int device) {
  check_index(device);
  DeviceGuard dg(device);
  cudaStream_t st = nullptr;
  TX_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamDefault));
  return st;
}

void destroy_stream(int device, void* stream) noexcept {
  if (!stream) return;
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device);
  cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
  cudaStreamDestroy(static_cast<cudaStream_t>(stream));
  cudaSetDevice(prev);
}

void set_current_stream(int device, void* stream) {
  check_index(device);
  if (t_streams.size() <= size_t(device)) t_streams.resize(size_t(device) + 1, nullptr);
  t_streams[size_t(device)] = stream;
}

void begin_capture(int device, const void* pool) {
  check_index(device);
  auto st = static_cast<cudaStream_t>(current_stream(device));
  if (!st || !pool || t_pool)
    throw DeviceError("cuda graph capture: cannot begin here", "a stream of create_stream made current, a pool tag, no capture running",
                      st ? (t_pool ? "a capture already running on this thread" : "no pool") : "the legacy default stream",
                      "call set_current_stream(device, create_stream(device)) first");
  DeviceGuard dg(device);
  pool_of(device).add_pool(pool);
  TX_CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  t_pool = pool;
  t_pool_device = device;
}

void* end_capture(int device, std::string* why) noexcept {
  t_pool = nullptr;
  t_pool_device = -1;
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device);
  auto st = static_cast<cudaStream_t>(current_stream(device));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  cudaError_t err = cudaStreamEndCapture(st, &graph);
  if (err == cudaSuccess && graph) err = cudaGraphInstantiate(&exec, graph, 0);
  if (graph) cudaGraphDestroy(graph);
  if (err != cudaSuccess || !exec) {
    if (why) *why = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // capture errors are not sticky: clear the last one
    exec = nullptr;
  }
  cudaSetDevice(prev);
  return exec;
}

void launch_graph(int device, void* exec) {
  check_index(device);
  DeviceGuard dg(device);
  TX_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec), static_cast<cudaStream_t>(current_stream(device))));
}

void destroy_graph(void* exec) noexcept {
  if (exec) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec));
}

void release_pool(int device, const void* pool) noexcept {
  try {
    pool_of(device).free_cached(pool);
  } catch (...) {  // no device: nothing was cached
  }
}

namespace {
void copy(void* dst, const void* src, size_t bytes, int device, cudaMemcpyKind kind) {
  if (bytes == 0) return;
  check_index(device);
  DeviceGuard dg(device);
  auto st = static_cast<cudaStream_t>(current_stream(device));
  TX_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, st));
  // The host waits for copies that touch host memory; a device-to-device copy is ordered on the stream
  // like a kernel (so a CUDA graph capture can record it).
  if (kind != cudaMemcpyDeviceToDevice) TX_CUDA_CHECK(cudaStreamSynchronize(st));
  if (kind == cudaMemcpyDeviceToHost) check_reports(device);
}
}  // namespace

void memcpy_h2d(void* dst, const void* src, size_t bytes, int device) {
  copy(dst, src, bytes, device, cudaMemcpyHostToDevice);
}
void memcpy_d2h(void* dst, const void* src, size_t bytes, int device) {
  copy(dst, src, bytes, device, cudaMemcpyDeviceToHost);
}
void memcpy_d2d(void* dst, const void* src, size_t bytes, int device) {
  copy(dst, src, bytes, device, cudaMemcpyDeviceToDevice);
}

void memset_zero(void* dst, size_t bytes, int device) {
  if (bytes == 0) return;
  check_index(device);
  DeviceGuard dg(device);
  TX_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, static_cast<cudaStream_t>(current_stream(device))));
}

void synchronize(int device) {
  check_index(device);
  DeviceGuard dg(device);
  TX_CUDA_CHECK(cudaDeviceSynchronize());
  check_reports(device);
}

}  // namespace cuda_rt
}  // namespace titanax
