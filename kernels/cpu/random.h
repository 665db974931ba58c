// CPU sampling from Philox (core/rng.h) by element index: the CUDA kernels use the same indexing, so a
// key gives the same tensor on every device.
//   uniform: element i = unit(word i % 4 of philox((i / 4, 0, 0, 0), key))
//   normal:  elements 4b..4b+3 = Box-Muller of the two word pairs of philox((b, 0, 1, 0), key)
#pragma once

#include "core/rng.h"
#include "core/tensor.h"

namespace titanax::kernels::cpu {

/// Fills a contiguous f32 / f64 tensor with uniform [0, 1) samples.
void fill_uniform(Tensor& out, RngKey key);
/// Fills a contiguous f32 / f64 tensor with standard normal samples.
void fill_normal(Tensor& out, RngKey key);
/// The uniform sample of element i (the dropout mask uses it: keep when >= p).
inline float uniform_at(RngKey key, uint64_t i) {
  auto r = philox4x32({uint32_t(i >> 2), uint32_t(i >> 34), 0, 0}, key);
  return u32_to_unit_float(r[i & 3]);
}

}  // namespace titanax::kernels::cpu
