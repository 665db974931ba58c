#include "core/rng.h"

#include <cstdio>

#include "core/philox.h"

namespace titanax {

std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> c, RngKey key) {
  const philox::Words r = philox::block(c[0], c[1], c[2], c[3], key.k0, key.k1);
  return {r.w[0], r.w[1], r.w[2], r.w[3]};
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
