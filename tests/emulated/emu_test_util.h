// Helpers shared by the emulated kernel tests (tests/emulated/*.cpp).
#pragma once

#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "core/rng.h"
#include "core/tensor.h"
#include "emulator.h"
#include "kernels/cuda/half.cuh"

namespace titanax::testing::emu {

/// A fresh key from the clock, or from TITANAX_TEST_SEED when set (to replay a failing draw). The seed is
/// printed to stderr with the test case's name (ctest shows it with a failure), since a message attached
/// to one assertion would not reach the failures of later sections.
inline RngKey fresh_key() {
  const char* env = std::getenv("TITANAX_TEST_SEED");
  const uint64_t seed = env && *env ? std::strtoull(env, nullptr, 10)
                                    : uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
  std::fprintf(stderr, "seed %llu (TITANAX_TEST_SEED replays it): %s\n", (unsigned long long)seed,
               Catch::getResultCapture().getCurrentTestName().c_str());
  return RngKey::from_seed(seed);
}

/// A tensor of shape s and dtype dt (floating) filled with NaN: an output a kernel must overwrite.
inline Tensor nan_tensor(const Shape& s, DType dt) { return full(s, std::nan(""), DType::f64).astype(dt); }

/// body() on every thread of a grid of 3 blocks of 64 threads: small, so that a grid-stride loop over a
/// few hundred elements goes round several times.
template <class Body>
void launch_strided(Body body) {
  launch(3, 1, 64, 0, [&](unsigned char*) { body(); });
}

/// The DType of storage type T (f32, f64, f16 as __half, bf16 as __nv_bfloat16).
template <class T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::f32;
  else if constexpr (std::is_same_v<T, double>) return DType::f64;
  else if constexpr (std::is_same_v<T, __half>) return DType::f16;
  else return DType::bf16;
}

/// A host tensor's elements as T (its dtype's C++ type).
template <class T>
T* ptr(Tensor& t) {
  return static_cast<T*>(t.raw_data());
}
template <class T>
const T* cptr(const Tensor& t) {
  return static_cast<const T*>(t.raw_data());
}

}  // namespace titanax::testing::emu
