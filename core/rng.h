// Counter-based random numbers: Philox 4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers:
// as easy as 1, 2, 3", SC 2011). A key plus a counter gives the same numbers on every device and thread,
// so sampling needs no state: element i of a tensor drawn with key k uses counter (i / 4, 0, 0, 0).
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "core/philox.h"

namespace titanax {

/// A 64-bit Philox key (two 32-bit words). Derive new keys with split / fold_in, as in JAX.
struct RngKey {
  uint32_t k0 = 0, k1 = 0;

  /// A key from a user seed.
  static RngKey from_seed(uint64_t seed) { return {uint32_t(seed), uint32_t(seed >> 32)}; }
  uint64_t as_u64() const { return uint64_t(k0) | (uint64_t(k1) << 32); }
  friend bool operator==(RngKey a, RngKey b) { return a.k0 == b.k0 && a.k1 == b.k1; }
  std::string str() const;
};

/// One Philox 4x32-10 block: 4 random 32-bit words for (counter, key) (core/philox.h, shared with CUDA).
std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> counter, RngKey key);

/// A new key that depends on `key` and `data` (e.g. the rank, the step): independent streams.
RngKey fold_in(RngKey key, uint64_t data);
/// Two independent keys derived from `key`.
std::array<RngKey, 2> split(RngKey key);

/// Uniform float in [0, 1) from 24 random bits.
inline float u32_to_unit_float(uint32_t x) { return philox::unit_float(x); }
/// Uniform double in [0, 1) from 53 random bits.
inline double u64_to_unit_double(uint32_t hi, uint32_t lo) {
  return double(((uint64_t(hi) << 32) | lo) >> 11) * (1.0 / 9007199254740992.0);
}

}  // namespace titanax
