// Linked into builds without CUDA (CUDA builds compile jit/cuda_codegen.cpp instead): NVRTC and the
// loading and launching of generated kernels, each throwing DeviceError. Unreachable in practice: without
// CUDA no tensor lives on a CUDA device, so no fused node runs its cuda() path; compile_cuda() called
// directly reports the missing backend.
#include "core/error.h"
#include "jit/codegen.h"
#include "jit/codegen_detail.h"

namespace titanax::jit {
namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw DeviceError(std::string(what) + ": this Titanax was built without CUDA", "a build with CUDA", "the cpu build",
                    "configure with `cmake --preset cuda` on a machine with the CUDA toolkit");
}
}  // namespace

namespace detail {
int device_arch(int) { no_cuda("CUDA device query"); }
std::string nvrtc_key(int) { no_cuda("NVRTC"); }
std::string nvrtc_compile(const std::string&, int) { no_cuda("NVRTC"); }
const void* load_fused_kernel(const std::string&, int) { no_cuda("fused CUDA kernel"); }
void launch_fused_kernel(const void*, int, const std::vector<const void*>&, const std::vector<void*>&,
                         const std::vector<int64_t>&, int64_t, bool) {
  no_cuda("fused CUDA kernel");
}
}  // namespace detail

}  // namespace titanax::jit
