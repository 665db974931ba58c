// Sampling kernels (random_uniform / random_normal on a CUDA device) as grid-stride bodies over the
// hardware-primitive policy of kernels/cuda/hw_policy.h: random.cu runs them on the GPU, tests/emulated/
// on the CPU. They index Philox (core/philox.h) exactly as the CPU's kernels/cpu/random.cpp does, so a
// key gives the CPU's tensor: uniform bitwise; normal through the device's logf / sqrtf / cosf / sinf,
// which may differ from the host's libm in the last bit. Values are made in f32 and converted once to
// the output type (f64, f16, bf16: as the CPU converts). CUDA headers only.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/philox.h"
#include "kernels/cuda/half.cuh"
#include "kernels/cuda/hw_policy.h"

namespace titanax::kernels::cuda::random_kernels {

/// body(b, words) for every block b of 4 of n elements (grid-strided): words = Philox 4x32-10 of counter
/// (b, 0, c2, 0) and key (k0, k1), the CPU's indexing (kernels/cpu/random.h).
template <class Hw, class Body>
TX_HW_FN void philox_blocks(int64_t n, uint32_t c2, uint32_t k0, uint32_t k1, Body body) {
  const int64_t nblk = (n + 3) / 4;
  for (int64_t b = grid_index<Hw>(); b < nblk; b += grid_stride<Hw>())
    body(b, philox::block(uint32_t(uint64_t(b)), uint32_t(uint64_t(b) >> 32), c2, 0, k0, k1));
}

/// out[i] = unit(word i % 4 of Philox counter (i / 4, 0, 0, 0), key (k0, k1)): uniform in [0, 1).
template <class Hw, class T>
TX_HW_FN void fill_uniform(T* out, int64_t n, uint32_t k0, uint32_t k1) {
  philox_blocks<Hw>(n, 0, k0, k1, [&](int64_t b, const philox::Words& r) {
    TX_UNROLL
    for (int k = 0; k < 4; ++k)
      if (b * 4 + k < n) out[b * 4 + k] = store_as<T>(philox::unit_float(r.w[k]));
  });
}

/// Standard normal samples: elements 4b .. 4b + 3 are the Box-Muller transforms of the word pairs (0, 1)
/// and (2, 3) of Philox counter (b, 0, 1, 0): u1 = (top 24 bits + 1) / 2^24 in (0, 1], u2 uniform,
/// r = sqrt(-2 ln u1), elements r cos(2 pi u2) and r sin(2 pi u2).
template <class Hw, class T>
TX_HW_FN void fill_normal(T* out, int64_t n, uint32_t k0, uint32_t k1) {
  philox_blocks<Hw>(n, 1, k0, k1, [&](int64_t b, const philox::Words& r) {
    TX_UNROLL
    for (int pair = 0; pair < 2; ++pair) {
      const float u1 = (float(r.w[2 * pair] >> 8) + 1.0f) * (1.0f / 16777216.0f);
      const float u2 = philox::unit_float(r.w[2 * pair + 1]);
      const float rad = sqrtf(-2.0f * logf(u1)), th = 6.2831853071795864f * u2;
      const int64_t i = b * 4 + 2 * pair;
      if (i < n) out[i] = store_as<T>(rad * cosf(th));
      if (i + 1 < n) out[i + 1] = store_as<T>(rad * sinf(th));
    }
  });
}

}  // namespace titanax::kernels::cuda::random_kernels
