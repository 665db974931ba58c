// Device helpers shared by the .cu files: grid sizing, the strided N-d indexer, warp / block reductions.
// CUDA headers only (see kernels/cuda/launch.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/launch.h"

namespace titanax::kernels::cuda {

constexpr int kThreads = 256;

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

/// Blocks for n elements, capped (kernels are grid-stride loops).
inline unsigned grid_for(int64_t n, int threads = kThreads) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > 65535 * 8) b = 65535 * 8;
  return unsigned(b);
}

/// Opts `kernel` into more than the default 48 KB of dynamic shared memory when it needs `bytes`; returns
/// the cudaError_t as an int (0 = success).
template <class K>
inline int allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return 0;
  return int(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

/// Element offsets of operands 0..N-1 for linear index i of layout L.
template <int N>
__device__ __forceinline__ void offsets(const Layout& L, int64_t i, int64_t* off) {
#pragma unroll
  for (int k = 0; k < N; ++k) off[k] = 0;
  for (int d = L.ndim - 1; d >= 0; --d) {
    const int64_t s = L.size[d];
    const int64_t c = i % s;
    i /= s;
#pragma unroll
    for (int k = 0; k < N; ++k) off[k] += c * L.stride[k][d];
  }
}

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/// Max that lets NaN win (as the CPU reductions).
template <class T>
__device__ __forceinline__ T nan_max(T a, T b) { return (a != a || a >= b) ? a : b; }
template <class T>
__device__ __forceinline__ T nan_min(T a, T b) { return (a != a || a <= b) ? a : b; }
/// Max that ignores NaN comparisons the way the CPU row_max does (x > m ? x : m).
template <class T>
__device__ __forceinline__ T plain_max(T m, T x) { return x > m ? x : m; }

template <class T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = plain_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/// Block-wide reduction with the warp reduction `warp_op` (warp_sum / warp_max) and its identity
/// (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <class T, class WarpOp>
__device__ T block_reduce(T v, T identity, WarpOp warp_op) {
  __shared__ T sh[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_op(v);
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  T r = lane < nw ? sh[lane] : identity;
  return warp_op(r);
}

template <class T>
__device__ T block_sum(T v) { return block_reduce(v, T(0), [](T x) { return warp_sum(x); }); }

template <class T>
__device__ T block_max(T v, T lowest) { return block_reduce(v, lowest, [](T x) { return warp_max(x); }); }

}  // namespace titanax::kernels::cuda
