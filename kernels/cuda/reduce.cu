// Reductions over any set of axes: a group of threads (a warp, or a block when there are few outputs)
// per output element, strided over the reduced elements, combined with warp shuffles. Sums accumulate in
// double (as the CPU); max / min let NaN win.
#include <cfloat>

#include "kernels/cuda/common.cuh"

namespace titanax::kernels::cuda {
namespace {

template <class T> __device__ __forceinline__ T lowest();
template <> __device__ __forceinline__ float lowest<float>() { return -INFINITY; }
template <> __device__ __forceinline__ double lowest<double>() { return -INFINITY; }

// Offset of flat index i over `n` dims of sizes / strides (row-major: the last dim fastest).
__device__ __forceinline__ int64_t unravel_offset(int64_t i, const int64_t* size, const int64_t* stride, int n) {
  int64_t off = 0;
  for (int d = n - 1; d >= 0; --d) {
    off += (i % size[d]) * stride[d];
    i /= size[d];
  }
  return off;
}
__device__ __forceinline__ int64_t kept_offset(const ReduceLayout& L, int64_t o) { return unravel_offset(o, L.ksize, L.kstride, L.nk); }
__device__ __forceinline__ int64_t red_offset(const ReduceLayout& L, int64_t r) { return unravel_offset(r, L.rsize, L.rstride, L.nr); }

template <class A, class T>
__device__ __forceinline__ A combine(int op, A a, A b) {
  if (op == 0) return a + b;
  return op == 1 ? nan_max(a, b) : nan_min(a, b);
}

template <class A>
__device__ __forceinline__ A warp_combine(int op, A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = combine<A, A>(op, v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// GROUP threads per output: 32 (a warp; blockDim 256 = 8 outputs per block) or blockDim (one output per block).
template <class T, class A, int GROUP>
__global__ void k_reduce(int op, const T* x, T* out, ReduceLayout L) {
  const int lane = threadIdx.x % GROUP;
  const int64_t groups_per_block = blockDim.x / GROUP;
  const A init = op == 0 ? A(0) : (op == 1 ? A(lowest<T>()) : A(-lowest<T>()));
  for (int64_t o = blockIdx.x * groups_per_block + threadIdx.x / GROUP; o < L.nout;
       o += int64_t(gridDim.x) * groups_per_block) {
    const T* base = x + kept_offset(L, o);
    A acc = init;
    for (int64_t r = lane; r < L.nred; r += GROUP) acc = combine<A, A>(op, acc, A(base[red_offset(L, r)]));
    acc = warp_combine(op, acc);
    if constexpr (GROUP > 32) {
      __shared__ A sh[32];
      const int w = threadIdx.x >> 5;
      __syncthreads();
      if ((threadIdx.x & 31) == 0) sh[w] = acc;
      __syncthreads();
      if (threadIdx.x < 32) {
        A v = threadIdx.x < GROUP / 32 ? sh[threadIdx.x] : init;
        v = warp_combine(op, v);
        if (threadIdx.x == 0) out[o] = T(v);
      }
    } else {
      if (lane == 0) out[o] = T(acc);
    }
  }
}

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

namespace {
// One thread per output: the first index of the maximum along the one reduced axis (strict >, as the CPU:
// NaN wins only at index 0).
template <class T>
__global__ void k_argmax(const T* x, int64_t* out, ReduceLayout L) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < L.nout; o += int64_t(gridDim.x) * blockDim.x) {
    const T* base = x + kept_offset(L, o);
    const int64_t n = L.rsize[0], st = L.rstride[0];
    int64_t best = 0;
    T bv = base[0];
    for (int64_t j = 1; j < n; ++j) {
      const T v = base[j * st];
      if (v > bv) bv = v, best = j;
    }
    out[o] = best;
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
