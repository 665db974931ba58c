// The scalar math of the CPU elementwise ops, one definition per op: the eager kernels
// (kernels/cpu/elementwise.cpp) and the JIT's fused elementwise interpreter (jit/fusion.cpp) both call
// these, so a fused program gives bitwise the results of the unfused ops. Internal to kernels/cpu and
// jit. Every function is force-inlined so the loops around it vectorise as before (vmath.h's f32 exp /
// tanh are branch-free for that reason).
#pragma once

#include <cmath>
#include <type_traits>

#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/vmath.h"

namespace titanax::kernels::cpu {

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;

/// d gelu_tanh(x) / dx.
template <class T>
TITANAX_VMATH_INLINE T gelu_tanh_grad(T x) {
  const T c = T(kSqrt2OverPi), k = T(0.044715);
  T u = c * (x + k * x * x * x);
  T t = ftanh(u);
  return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * c * (T(1) + T(3) * k * x * x);
}
/// d gelu_erf(x) / dx.
template <class T>
inline T gelu_erf_grad(T x) {
  return T(0.5) * (T(1) + std::erf(x * T(kInvSqrt2))) + x * T(kInvSqrt2Pi) * std::exp(T(-0.5) * x * x);
}

/// op(v) for T in float, double (and, for neg, abs, square, sign, relu, also int32_t / int64_t).
template <UnaryOp OP, class T>
TITANAX_VMATH_INLINE T unary_fn(T v) {
  if constexpr (OP == UnaryOp::neg) return T(-v);
  else if constexpr (OP == UnaryOp::abs) return v < 0 ? T(-v) : v;
  else if constexpr (OP == UnaryOp::square) return T(v * v);
  else if constexpr (OP == UnaryOp::sign) return T((v > 0) - (v < 0));
  else if constexpr (OP == UnaryOp::relu) return v > 0 ? v : T(0);
  else if constexpr (OP == UnaryOp::exp) return fexp(v);
  else if constexpr (OP == UnaryOp::log) return std::log(v);
  else if constexpr (OP == UnaryOp::sqrt) return std::sqrt(v);
  else if constexpr (OP == UnaryOp::rsqrt) return T(1) / std::sqrt(v);
  else if constexpr (OP == UnaryOp::tanh) return ftanh(v);
  else if constexpr (OP == UnaryOp::sigmoid) {
    const T e = fexp(v >= 0 ? -v : v);  // exp(-|v|) never overflows
    return v >= 0 ? T(1) / (T(1) + e) : e / (T(1) + e);
  } else if constexpr (OP == UnaryOp::reciprocal) return T(1) / v;
  else if constexpr (OP == UnaryOp::gelu_tanh) return T(0.5) * v * (T(1) + ftanh(T(kSqrt2OverPi) * (v + T(0.044715) * v * v * v)));
  else {
    static_assert(OP == UnaryOp::gelu_erf, "unhandled UnaryOp");
    return T(0.5) * v * (T(1) + std::erf(v * T(kInvSqrt2)));
  }
}

/// Result type of binary_fn: bool for comparisons, else T.
template <BinaryOp OP, class T>
using binary_result_t = std::conditional_t<(OP >= BinaryOp::eq && OP <= BinaryOp::ge), bool, T>;

/// op(x, y) for T in float, double, int32_t, int64_t (gelu backward: floating only; comparisons also bool,
/// uint8_t). Integer division by zero gives 0.
template <BinaryOp OP, class T>
TITANAX_VMATH_INLINE binary_result_t<OP, T> binary_fn(T x, T y) {
  if constexpr (OP == BinaryOp::add) return T(x + y);
  else if constexpr (OP == BinaryOp::sub) return T(x - y);
  else if constexpr (OP == BinaryOp::mul) return T(x * y);
  else if constexpr (OP == BinaryOp::div) {
    if constexpr (std::is_integral_v<T>) return y == 0 ? T(0) : T(x / y);
    else return T(x / y);
  } else if constexpr (OP == BinaryOp::maximum) return x >= y || x != x ? x : y;
  else if constexpr (OP == BinaryOp::minimum) return x <= y || x != x ? x : y;
  else if constexpr (OP == BinaryOp::pow) return T(std::pow(x, y));
  else if constexpr (OP == BinaryOp::eq) return x == y;
  else if constexpr (OP == BinaryOp::ne) return x != y;
  else if constexpr (OP == BinaryOp::lt) return x < y;
  else if constexpr (OP == BinaryOp::le) return x <= y;
  else if constexpr (OP == BinaryOp::gt) return x > y;
  else if constexpr (OP == BinaryOp::ge) return x >= y;
  else if constexpr (OP == BinaryOp::relu_backward) return y > T(0) ? x : T(0);  // (dy, y)
  else if constexpr (OP == BinaryOp::gelu_tanh_backward) return x * gelu_tanh_grad(y);  // (dy, x)
  else {
    static_assert(OP == BinaryOp::gelu_erf_backward, "unhandled BinaryOp");
    return x * gelu_erf_grad(y);
  }
}

/// min(max(v, lo), hi) with lo, hi already converted to T (as the clamp kernel does).
template <class T>
TITANAX_VMATH_INLINE T clamp_fn(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

}  // namespace titanax::kernels::cpu
