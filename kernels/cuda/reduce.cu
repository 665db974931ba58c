// Reductions over any set of axes and argmax (kernels/cuda/reduce.cuh holds the block bodies): the
// __global__ wrappers over the GPU's primitives (kernels/cuda/hw_policy.h) and the launchers.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/reduce.cuh"

namespace titanax::kernels::cuda {
namespace {
using namespace reduce_kernels;

template <class T, class A, int GROUP>
__global__ void k_reduce(int op, const T* x, T* out, ReduceLayout L) {
  reduce<DevicePrim, T, A, GROUP>(op, x, out, L);
}

template <class T>
__global__ void k_argmax(const T* x, int64_t* out, ReduceLayout L) {
  argmax<DevicePrim>(x, out, L);
}

// Few outputs with many reduced elements each: a block per output; otherwise a warp per output.
template <class T>
void run(int op, const T* x, T* out, const ReduceLayout& L, cudaStream_t st) {
  if (L.nout < 2048 && L.nred >= 1024) {
    unsigned blocks = unsigned(L.nout > 65535 ? 65535 : L.nout);
    if (op == 0) k_reduce<T, double, kThreads><<<blocks, kThreads, 0, st>>>(op, x, out, L);
    else k_reduce<T, T, kThreads><<<blocks, kThreads, 0, st>>>(op, x, out, L);
  } else {
    unsigned blocks = grid_for(L.nout, kThreads / 32);
    if (op == 0) k_reduce<T, double, 32><<<blocks, kThreads, 0, st>>>(op, x, out, L);
    else k_reduce<T, T, 32><<<blocks, kThreads, 0, st>>>(op, x, out, L);
  }
}

}  // namespace

int launch_argmax(Dt t, const void* x, int64_t* out, const ReduceLayout& L, void* stream) {
  if (L.nout == 0) return 0;
  auto st = as_stream(stream);
  switch (t) {
    case Dt::f32: k_argmax<<<grid_for(L.nout), kThreads, 0, st>>>(static_cast<const float*>(x), out, L); break;
    case Dt::f64: k_argmax<<<grid_for(L.nout), kThreads, 0, st>>>(static_cast<const double*>(x), out, L); break;
    case Dt::i32: k_argmax<<<grid_for(L.nout), kThreads, 0, st>>>(static_cast<const int32_t*>(x), out, L); break;
    case Dt::i64: k_argmax<<<grid_for(L.nout), kThreads, 0, st>>>(static_cast<const int64_t*>(x), out, L); break;
    default: return int(cudaErrorInvalidValue);
  }
  return int(cudaGetLastError());
}

int launch_reduce(int op, Dt t, const void* x, void* out, const ReduceLayout& L, void* stream) {
  if (L.nout == 0) return 0;
  if (t == Dt::f32) run(op, static_cast<const float*>(x), static_cast<float*>(out), L, as_stream(stream));
  else if (t == Dt::f64) run(op, static_cast<const double*>(x), static_cast<double*>(out), L, as_stream(stream));
  else return int(cudaErrorInvalidValue);
  return int(cudaGetLastError());
}

}  // namespace titanax::kernels::cuda
