// Max pooling over NCHW planes (kernels/cuda/launch.h: launch_max_pool2d, launch_max_pool2d_backward): the
// __global__ wrappers over the GPU's primitives of the bodies in kernels/cuda/pool.cuh, and the launchers.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/pool.cuh"

namespace titanax::kernels::cuda {
namespace {

template <class T>
__global__ void k_max_pool2d(const T* x, T* y, int32_t* ws, Pool2dParams g, int64_t total) {
  pool_kernels::max_pool2d<DevicePrim>(x, y, ws, g, total);
}

template <class T>
__global__ void k_max_pool2d_backward(const T* dy, const int32_t* ws, T* dx, Pool2dParams g, int64_t total) {
  pool_kernels::max_pool2d_backward<DevicePrim>(dy, ws, dx, g, total);
}

}  // namespace

int launch_max_pool2d(Dt t, const void* x, void* y, int32_t* ws, const Pool2dParams& g, void* stream) {
  const int64_t total = g.N * g.C * g.OH * g.OW;
  if (total == 0) return 0;
  auto st = as_stream(stream);
  if (t == Dt::f32) k_max_pool2d<<<grid_for(total), kThreads, 0, st>>>(static_cast<const float*>(x), static_cast<float*>(y), ws, g, total);
  else if (t == Dt::f64) k_max_pool2d<<<grid_for(total), kThreads, 0, st>>>(static_cast<const double*>(x), static_cast<double*>(y), ws, g, total);
  else return int(cudaErrorInvalidValue);
  return int(cudaGetLastError());
}

int launch_max_pool2d_backward(Dt t, const void* dy, const int32_t* ws, void* dx, const Pool2dParams& g, void* stream) {
  const int64_t total = g.N * g.C * g.H * g.W;
  if (total == 0) return 0;
  auto st = as_stream(stream);
  if (t == Dt::f32)
    k_max_pool2d_backward<<<grid_for(total), kThreads, 0, st>>>(static_cast<const float*>(dy), ws, static_cast<float*>(dx), g, total);
  else if (t == Dt::f64)
    k_max_pool2d_backward<<<grid_for(total), kThreads, 0, st>>>(static_cast<const double*>(dy), ws, static_cast<double*>(dx), g, total);
  else return int(cudaErrorInvalidValue);
  return int(cudaGetLastError());
}

}  // namespace titanax::kernels::cuda
