// dtype -> C++ type dispatch for CPU kernels. Internal to kernels/cpu.
#pragma once

#include <cstdint>
#include <type_traits>

#include "core/dtype.h"
#include "core/error.h"

namespace titanax::kernels::cpu {

[[noreturn]] void unsupported_dtype(const char* kernel, DType t, const char* allowed);

/// Converts between element types, going through float for bf16 / f16.
template <class D, class S>
inline D convert(S v) {
  if constexpr (std::is_same_v<D, S>) {
    return v;
  } else if constexpr (std::is_same_v<S, bf16_t> || std::is_same_v<S, f16_t>) {
    return convert<D>(float(v));
  } else if constexpr (std::is_same_v<D, bf16_t> || std::is_same_v<D, f16_t>) {
    return D(float(v));
  } else if constexpr (std::is_same_v<D, bool>) {
    return v != S(0);
  } else {
    return static_cast<D>(v);
  }
}

}  // namespace titanax::kernels::cpu

#define TX_CASE(DT, CT, ...) \
  case ::titanax::DType::DT: { using scalar_t = CT; __VA_ARGS__; } break;

/// Runs the body with scalar_t = float or double.
#define TX_DISPATCH_FLOAT(dtype, kernel, ...)                                      \
  switch (dtype) {                                                                 \
    TX_CASE(f32, float, __VA_ARGS__)                                               \
    TX_CASE(f64, double, __VA_ARGS__)                                              \
    default: ::titanax::kernels::cpu::unsupported_dtype(kernel, dtype, "f32, f64"); \
  }

/// scalar_t in float, double, int32_t, int64_t.
#define TX_DISPATCH_ARITH(dtype, kernel, ...)                                                \
  switch (dtype) {                                                                           \
    TX_CASE(f32, float, __VA_ARGS__)                                                         \
    TX_CASE(f64, double, __VA_ARGS__)                                                        \
    TX_CASE(i32, int32_t, __VA_ARGS__)                                                       \
    TX_CASE(i64, int64_t, __VA_ARGS__)                                                       \
    default: ::titanax::kernels::cpu::unsupported_dtype(kernel, dtype, "f32, f64, i32, i64"); \
  }

/// scalar_t over every dtype (bf16_t, f16_t and bool included).
#define TX_DISPATCH_ALL(dtype, kernel, ...)     \
  switch (dtype) {                              \
    TX_CASE(f32, float, __VA_ARGS__)            \
    TX_CASE(f64, double, __VA_ARGS__)           \
    TX_CASE(f16, ::titanax::f16_t, __VA_ARGS__)  \
    TX_CASE(bf16, ::titanax::bf16_t, __VA_ARGS__) \
    TX_CASE(i32, int32_t, __VA_ARGS__)          \
    TX_CASE(i64, int64_t, __VA_ARGS__)          \
    TX_CASE(u8, uint8_t, __VA_ARGS__)           \
    TX_CASE(bool_, bool, __VA_ARGS__)           \
  }
