// NVRTC compilation of generated kernels, their loading (cudaLibraryLoadData: no link dependency on the
// driver library) and launching. CUDA builds only (jit/no_cuda.cpp otherwise); see jit/codegen.h.
#include <cuda_runtime_api.h>
#include <nvrtc.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "jit/codegen.h"
#include "jit/codegen_detail.h"
#include "kernels/cuda/check.h"

namespace titanax::jit {
namespace detail {

// kernels/cuda/ew_math.cuh, embedded at build time (cmake/cuda.cmake writes it into a generated .cpp).
extern const char* const kEwMathSource;

namespace {

// Options of every compile: FMA contraction off, as elementwise.cu (bitwise equal to the eager kernels).
std::vector<std::string> options(int arch) {
  return {"--gpu-architecture=sm_" + std::to_string(arch), "--fmad=false", "-std=c++17", "-default-device"};
}

[[noreturn]] void nvrtc_fail(nvrtcResult r, const char* call, const std::string& log = {}) {
  throw DeviceError(std::string("NVRTC: ") + call + " failed: " + nvrtcGetErrorString(r), "a generated kernel that compiles",
                    log.empty() ? std::string(nvrtcGetErrorString(r)) : log,
                    "this is a bug in the JIT's CUDA code generator: please report it with this log");
}

#define TX_NVRTC_CHECK(call)                                  \
  do {                                                        \
    const nvrtcResult tx_r_ = (call);                         \
    if (tx_r_ != NVRTC_SUCCESS) nvrtc_fail(tx_r_, #call);     \
  } while (0)

struct Loaded {
  std::shared_ptr<const std::string> cubin;  // kept alive with the library
  cudaLibrary_t library = nullptr;
  cudaKernel_t kernel = nullptr;
};
std::mutex g_mu;
std::map<std::pair<std::string, int>, Loaded> g_loaded;  // (source, device) -> kernel

}  // namespace

int device_arch(int device) {
  int major = 0, minor = 0;
  TX_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  TX_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major * 10 + minor;
}

std::string nvrtc_key(int arch) {
  int major = 0, minor = 0;
  TX_NVRTC_CHECK(nvrtcVersion(&major, &minor));
  std::string k = "nvrtc " + std::to_string(major) + "." + std::to_string(minor);
  for (const auto& o : options(arch)) k += " " + o;
  return k;
}

std::string nvrtc_compile(const std::string& source, int arch) {
  nvrtcProgram prog = nullptr;
  const char* header = kEwMathSource;
  const char* header_name = "tx_ew_math.cuh";
  TX_NVRTC_CHECK(nvrtcCreateProgram(&prog, source.c_str(), "tx_fused.cu", 1, &header, &header_name));
  struct Destroy {
    nvrtcProgram& p;
    ~Destroy() { nvrtcDestroyProgram(&p); }
  } destroy{prog};
  const std::vector<std::string> opts = options(arch);
  std::vector<const char*> argv;
  for (const auto& o : opts) argv.push_back(o.c_str());
  const nvrtcResult r = nvrtcCompileProgram(prog, int(argv.size()), argv.data());
  if (r != NVRTC_SUCCESS) {
    size_t n = 0;
    nvrtcGetProgramLogSize(prog, &n);
    std::string log(n, '\0');
    if (n) nvrtcGetProgramLog(prog, log.data());
    nvrtc_fail(r, "nvrtcCompileProgram", log + "\n--- source ---\n" + source);
  }
  size_t n = 0;
  TX_NVRTC_CHECK(nvrtcGetCUBINSize(prog, &n));
  std::string cubin(n, '\0');
  TX_NVRTC_CHECK(nvrtcGetCUBIN(prog, cubin.data()));
  return cubin;
}

const void* load_fused_kernel(const std::string& source, int device) {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (auto it = g_loaded.find({source, device}); it != g_loaded.end()) return it->second.kernel;
  }
  Loaded l;
  l.cubin = compile_cuda(source, device_arch(device));
  TX_CUDA_CHECK(cudaLibraryLoadData(&l.library, l.cubin->data(), nullptr, nullptr, 0, nullptr, nullptr, 0));
  TX_CUDA_CHECK(cudaLibraryGetKernel(&l.kernel, l.library, "tx_fused"));
  std::lock_guard<std::mutex> lock(g_mu);
  auto [it, inserted] = g_loaded.emplace(std::make_pair(source, device), l);
  if (!inserted) cudaLibraryUnload(l.library);  // another thread loaded it meanwhile
  return it->second.kernel;
}

void launch_fused_kernel(const void* kernel, int device, const std::vector<const void*>& inputs,
                         const std::vector<void*>& outputs, const std::vector<int64_t>& strides, int64_t n,
                         bool dense) {
  if (n == 0) return;
  std::vector<void*> args;
  args.reserve(inputs.size() + outputs.size() + 3);
  // The pointer parameters: the kernel reads each through the address of a pointer-sized value.
  std::vector<const void*> ptrs(inputs.begin(), inputs.end());
  for (void* p : outputs) ptrs.push_back(p);
  for (auto& p : ptrs) args.push_back(&p);
  // TxStrides: a struct of long long[max(1, count)], passed by value from contiguous storage.
  std::vector<long long> st(std::max<size_t>(1, strides.size()), 0);
  std::copy(strides.begin(), strides.end(), st.begin());
  args.push_back(st.data());
  long long count = n;
  int flag = dense ? 1 : 0;
  args.push_back(&count);
  args.push_back(&flag);
  constexpr int kThreads = 256;
  const long long blocks = std::min<long long>((count + kThreads - 1) / kThreads, 65535LL * 8);
  auto stream = static_cast<cudaStream_t>(cuda_rt::current_stream(device));
  TX_CUDA_CHECK(cudaLaunchKernel(kernel, dim3(unsigned(blocks)), dim3(kThreads), args.data(), 0, stream));
}

}  // namespace detail
}  // namespace titanax::jit
