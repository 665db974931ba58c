// Philox 4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
// the one definition shared by host code (core/rng.cpp) and CUDA kernels (kernels/cuda/random.cuh:
// sampling and dropout), so a key and counter give the same words on every device. Plain C++ (cstdint
// only) so .cu files may include it; under nvcc the functions are __host__ __device__.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TX_PHILOX_FN __host__ __device__ __forceinline__
#else
#define TX_PHILOX_FN inline
#endif

namespace titanax {
namespace philox {

struct Words {
  uint32_t w[4];
};

/// The 4 random words for counter (c0, c1, c2, c3) and key (k0, k1): 10 rounds.
TX_PHILOX_FN Words block(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(M0) * c0;
    const uint64_t p1 = uint64_t(M1) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  return Words{{c0, c1, c2, c3}};
}

/// Uniform float in [0, 1) from the top 24 bits of x.
TX_PHILOX_FN float unit_float(uint32_t x) { return float(x >> 8) * (1.0f / 16777216.0f); }

}  // namespace philox
}  // namespace titanax
