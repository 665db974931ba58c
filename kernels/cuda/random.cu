// Sampling on the GPU (random_uniform, random_normal): the __global__ wrappers and the launcher of the
// bodies in kernels/cuda/random.cuh.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/random.cuh"

namespace titanax::kernels::cuda {
namespace {
template <class T>
__global__ void k_fill_uniform(T* out, int64_t n, uint32_t k0, uint32_t k1) {
  random_kernels::fill_uniform<DevicePrim>(out, n, k0, k1);
}
template <class T>
__global__ void k_fill_normal(T* out, int64_t n, uint32_t k0, uint32_t k1) {
  random_kernels::fill_normal<DevicePrim>(out, n, k0, k1);
}
}  // namespace

int launch_fill_random(bool normal, Dt t, void* out, int64_t n, uint32_t k0, uint32_t k1, void* stream) {
  if (n == 0) return 0;
  const unsigned blocks = grid_for((n + 3) / 4);
  return dispatch_floating(t, [&](auto v) {
    using T = decltype(v);
    if (normal) k_fill_normal<<<blocks, kThreads, 0, as_stream(stream)>>>(static_cast<T*>(out), n, k0, k1);
    else k_fill_uniform<<<blocks, kThreads, 0, as_stream(stream)>>>(static_cast<T*>(out), n, k0, k1);
  });
}

}  // namespace titanax::kernels::cuda
