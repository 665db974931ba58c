// Linked into builds without CUDA: every entry point of the CUDA runtime interface throws DeviceError,
// so code paths stay free of #ifdefs and a user who asks for a GPU gets a clear message.
#include "core/allocator.h"
#include "core/cuda_runtime.h"
#include "core/error.h"

namespace titanax {
namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw DeviceError(std::string(what) + ": this Titanax was built without CUDA", "a build with CUDA",
                    "the cpu build", "configure with `cmake --preset cuda` on a machine with the CUDA toolkit");
}
}  // namespace

Allocator& cuda_allocator(int) { no_cuda("cuda allocator"); }
int cuda_device_count() { return 0; }

namespace cuda_rt {
bool built_with_cuda() { return false; }
int device_count() { return 0; }
void memcpy_h2d(void*, const void*, size_t, int) { no_cuda("memcpy to cuda"); }
void memcpy_d2h(void*, const void*, size_t, int) { no_cuda("memcpy from cuda"); }
void memcpy_d2d(void*, const void*, size_t, int) { no_cuda("memcpy on cuda"); }
void memset_zero(void*, size_t, int) { no_cuda("memset on cuda"); }
void synchronize(int) { no_cuda("cuda synchronize"); }
void* current_stream(int) { return nullptr; }
void* create_stream(int) { no_cuda("cuda stream"); }
void destroy_stream(int, void*) noexcept {}
void set_current_stream(int, void* stream) {
  if (stream) no_cuda("cuda stream");
}
void begin_capture(int, const void*) { no_cuda("cuda graph capture"); }
void* end_capture(int, std::string* why) noexcept {
  if (why) *why = "built without CUDA";
  return nullptr;
}
void launch_graph(int, void*) { no_cuda("cuda graph launch"); }
void destroy_graph(void*) noexcept {}
void release_pool(int, const void*) noexcept {}
}  // namespace cuda_rt
}  // namespace titanax
