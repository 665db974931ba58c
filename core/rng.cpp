#include "core/rng.h"

#include <cstdio>

namespace titanax {

std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> c, RngKey key) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = uint64_t(M0) * c[0];
    uint64_t p1 = uint64_t(M1) * c[2];
    uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c = {hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0};
    k0 += W0;
    k1 += W1;
  }
  return c;
}

RngKey fold_in(RngKey key, uint64_t data) {
  // Counter word 2 tags the derivation so fold_in and split never collide with sampling counters.
  auto r = philox4x32({uint32_t(data), uint32_t(data >> 32), 0x666f6c64u /* "fold" */, 0}, key);
  return {r[0], r[1]};
}

std::array<RngKey, 2> split(RngKey key) {
  auto r = philox4x32({0, 0, 0x73706c74u /* "splt" */, 0}, key);
  return {RngKey{r[0], r[1]}, RngKey{r[2], r[3]}};
}

std::string RngKey::str() const {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%08x%08x", k1, k0);
  return buf;
}

}  // namespace titanax
