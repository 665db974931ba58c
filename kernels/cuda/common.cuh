// Device helpers shared by the .cu files: grid sizing, shared-memory opt-in (warp and block reductions:
// hw_policy.h; the strided N-d indexer: elementwise.cuh).
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
