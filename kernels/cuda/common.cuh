// Device helpers shared by the .cu files: grid sizing, dtype dispatch, shared-memory opt-in (warp and
// block reductions: hw_policy.h; the strided N-d indexer: elementwise.cuh).
// CUDA headers only (see kernels/cuda/launch.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/hw_policy.h"
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

// ---- dtype dispatch: body(T{}) for the C++ type T of a Dt, then the launch's error (cudaGetLastError) as
// an int; cudaErrorInvalidValue for a dtype outside the set.

/// f32, f64, f16 (__half), bf16 (__nv_bfloat16): kernels that compute 16-bit values in f32 (half.cuh).
template <class Body>
int dispatch_floating(Dt t, Body body) {
  switch (t) {
    case Dt::f32: body(float{}); break;
    case Dt::f64: body(double{}); break;
    case Dt::f16: body(__half{}); break;
    case Dt::bf16: body(__nv_bfloat16{}); break;
    default: return int(cudaErrorInvalidValue);
  }
  return int(cudaGetLastError());
}
/// The floating dtypes and i32, i64.
template <class Body>
int dispatch_arith(Dt t, Body body) {
  switch (t) {
    case Dt::i32: body(int32_t{}); break;
    case Dt::i64: body(int64_t{}); break;
    default: return dispatch_floating(t, body);
  }
  return int(cudaGetLastError());
}
/// Every dtype (u8, and bool as b8, too).
template <class Body>
int dispatch_all(Dt t, Body body) {
  switch (t) {
    case Dt::u8: body(uint8_t{}); break;
    case Dt::b8: body(bool{}); break;
    default: return dispatch_arith(t, body);
  }
  return int(cudaGetLastError());
}

/// Opts `kernel` into more than the default 48 KB of dynamic shared memory when it needs `bytes`; returns
/// the cudaError_t as an int (0 = success). The limit only ever rises, so a CUDA graph captured with a
/// larger launch of the same kernel still replays after a smaller one.
template <class K>
inline int allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return 0;
  cudaFuncAttributes a{};
  if (cudaFuncGetAttributes(&a, kernel) == cudaSuccess && size_t(a.maxDynamicSharedSizeBytes) >= bytes) return 0;
  return int(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

}  // namespace titanax::kernels::cuda
