// The scalar math of the CUDA elementwise ops, one definition per op: the eager kernels
// (kernels/cuda/elementwise.cu) call these, and the JIT's generated kernels (jit/codegen.h) get this very
// file as an NVRTC header (embedded in the library at build time by cmake/cuda.cmake), so a fused
// program computes bitwise what the unfused ops compute. Both compile with FMA contraction off
// (nvcc -fmad=false for elementwise.cu, NVRTC --fmad=false): contraction across the ops of a fused
// program would otherwise change its roundings.
//
// Self-contained on purpose: no includes and no std (NVRTC compiles it without the host's headers).
// Math functions are the CUDA device library's (expf / exp, tanhf / tanh, ...), named by their float
// and double spellings explicitly so that nvcc and NVRTC resolve the same function. The formulas are
// those of the CPU twins (kernels/cpu/elementwise_math.h).
#pragma once

#ifndef TX_EW_DEVICE
#define TX_EW_DEVICE __device__ __forceinline__
#endif

namespace titanax {
namespace kernels {
namespace cuda {
namespace ewm {

/// 1 for the integer types the kernels use (int32, int64 as long or long long), else 0.
template <class T> struct is_int { static const bool value = false; };
template <> struct is_int<int> { static const bool value = true; };
template <> struct is_int<long> { static const bool value = true; };
template <> struct is_int<long long> { static const bool value = true; };

TX_EW_DEVICE float d_exp(float v) { return expf(v); }
TX_EW_DEVICE double d_exp(double v) { return exp(v); }
TX_EW_DEVICE float d_log(float v) { return logf(v); }
TX_EW_DEVICE double d_log(double v) { return log(v); }
TX_EW_DEVICE float d_sqrt(float v) { return sqrtf(v); }
TX_EW_DEVICE double d_sqrt(double v) { return sqrt(v); }
TX_EW_DEVICE float d_tanh(float v) { return tanhf(v); }
TX_EW_DEVICE double d_tanh(double v) { return tanh(v); }
TX_EW_DEVICE float d_erf(float v) { return erff(v); }
TX_EW_DEVICE double d_erf(double v) { return erf(v); }
TX_EW_DEVICE float d_pow(float x, float y) { return powf(x, y); }
TX_EW_DEVICE double d_pow(double x, double y) { return pow(x, y); }

// ------------------------------------------------------------------ unary (floating unless noted)
template <class T> TX_EW_DEVICE T neg(T v) { return T(-v); }                      // also integers
template <class T> TX_EW_DEVICE T abs_(T v) { return v < T(0) ? T(-v) : v; }       // also integers
template <class T> TX_EW_DEVICE T square(T v) { return T(v * v); }                 // also integers
template <class T> TX_EW_DEVICE T sign(T v) { return T((v > T(0)) - (v < T(0))); } // also integers
template <class T> TX_EW_DEVICE T relu(T v) { return v > T(0) ? v : T(0); }        // also integers
template <class T> TX_EW_DEVICE T exp_(T v) { return d_exp(v); }
template <class T> TX_EW_DEVICE T log_(T v) { return d_log(v); }
template <class T> TX_EW_DEVICE T sqrt_(T v) { return d_sqrt(v); }
template <class T> TX_EW_DEVICE T rsqrt_(T v) { return T(1) / d_sqrt(v); }
template <class T> TX_EW_DEVICE T tanh_(T v) { return d_tanh(v); }
/// exp(-|v|) never overflows.
template <class T> TX_EW_DEVICE T sigmoid(T v) {
  const T e = d_exp(v >= T(0) ? -v : v);
  return v >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}
template <class T> TX_EW_DEVICE T reciprocal(T v) { return T(1) / v; }
/// GELU, tanh approximation (Hendrycks & Gimpel 2016).
template <class T> TX_EW_DEVICE T gelu_tanh(T v) {
  return T(0.5) * v * (T(1) + d_tanh(T(0.7978845608028654) * (v + T(0.044715) * v * v * v)));
}
template <class T> TX_EW_DEVICE T gelu_erf(T v) { return T(0.5) * v * (T(1) + d_erf(v * T(0.7071067811865476))); }

// ------------------------------------------------------------------ binary
template <class T> TX_EW_DEVICE T add(T x, T y) { return T(x + y); }
template <class T> TX_EW_DEVICE T sub(T x, T y) { return T(x - y); }
template <class T> TX_EW_DEVICE T mul(T x, T y) { return T(x * y); }
/// Integer division by zero gives 0 (as the CPU).
template <class T> TX_EW_DEVICE T div_(T x, T y) { return is_int<T>::value && y == T(0) ? T(0) : T(x / y); }
/// NaN wins.
template <class T> TX_EW_DEVICE T maximum(T x, T y) { return (x >= y || x != x) ? x : y; }
template <class T> TX_EW_DEVICE T minimum(T x, T y) { return (x <= y || x != x) ? x : y; }
template <class T> TX_EW_DEVICE T pow_(T x, T y) { return d_pow(x, y); }
template <class T> TX_EW_DEVICE bool eq(T x, T y) { return x == y; }
template <class T> TX_EW_DEVICE bool ne(T x, T y) { return x != y; }
template <class T> TX_EW_DEVICE bool lt(T x, T y) { return x < y; }
template <class T> TX_EW_DEVICE bool le(T x, T y) { return x <= y; }
template <class T> TX_EW_DEVICE bool gt(T x, T y) { return x > y; }
template <class T> TX_EW_DEVICE bool ge(T x, T y) { return x >= y; }
/// (dy, y): dy where the forward output was positive.
template <class T> TX_EW_DEVICE T relu_backward(T dy, T y) { return y > T(0) ? dy : T(0); }
/// (dy, x): dy * d gelu_tanh(x) / dx.
template <class T> TX_EW_DEVICE T gelu_tanh_backward(T dy, T x) {
  const T c = T(0.7978845608028654), k = T(0.044715);
  const T u = c * (x + k * x * x * x);
  const T t = d_tanh(u);
  return dy * (T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * c * (T(1) + T(3) * k * x * x));
}
/// (dy, x): dy * d gelu_erf(x) / dx.
template <class T> TX_EW_DEVICE T gelu_erf_backward(T dy, T x) {
  return dy * (T(0.5) * (T(1) + d_erf(x * T(0.7071067811865476))) + x * T(0.3989422804014327) * d_exp(T(-0.5) * x * x));
}

// ------------------------------------------------------------------ others
/// min(max(v, lo), hi) with lo, hi already in T.
template <class T> TX_EW_DEVICE T clamp(T v, T lo, T hi) { return v < lo ? lo : (v > hi ? hi : v); }
/// Conversion as astype: to bool is v != 0.
template <class D, class S> struct cast_to { static TX_EW_DEVICE D f(S v) { return static_cast<D>(v); } };
template <class S> struct cast_to<bool, S> { static TX_EW_DEVICE bool f(S v) { return v != S(0); } };

}  // namespace ewm
}  // namespace cuda
}  // namespace kernels
}  // namespace titanax
