// Helpers shared by the CUDA tests (tests/cuda/*.cpp).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/tensor.h"

namespace titanax::testing {

/// A seed for fresh random inputs: $TITANAX_TEST_SEED when set (to replay a failure), else the clock.
inline uint64_t fresh_seed() {
  if (const char* s = std::getenv("TITANAX_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  return uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
}

/// Relative error of the worst element: max |got - want| / max(max |want|, tiny), both copied to the host
/// in f64. NaN in one but not the other, or a size mismatch: infinity.
inline double rel_error(const Tensor& got, const Tensor& want) {
  const std::vector<double> g = got.to(Device::cpu()).astype(DType::f64).to_vector<double>();
  const std::vector<double> w = want.to(Device::cpu()).astype(DType::f64).to_vector<double>();
  if (g.size() != w.size()) return INFINITY;
  double num = 0, den = 1e-30;
  for (size_t i = 0; i < g.size(); ++i) {
    if (std::isnan(g[i]) != std::isnan(w[i])) return INFINITY;
    if (std::isnan(w[i])) continue;
    num = std::max(num, std::fabs(g[i] - w[i]));
    den = std::max(den, std::fabs(w[i]));
  }
  return num / den;
}

/// Whether the two tensors have the same shape, dtype and bytes (copied to the host first).
inline bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  const Tensor ha = a.to(Device::cpu()).contiguous(), hb = b.to(Device::cpu()).contiguous();
  return std::memcmp(ha.raw_data(), hb.raw_data(), ha.nbytes()) == 0;
}

}  // namespace titanax::testing
