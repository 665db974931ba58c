// Elementwise kernels (strided N-d binary / unary ops with broadcasting, clamp, where, casts) written
// against the hardware-primitive policy of kernels/cuda/hw_policy.h: elementwise.cu runs them on the GPU,
// tests/emulated/ on the CPU. Contiguous same-shape f32, f16 and bf16 operands with 16-byte-aligned
// pointers take the packed bodies (16 bytes per access). The scalar math is kernels/cuda/ew_math.cuh
// (shared with the JIT's generated kernels); elementwise.cu compiles with -fmad=false (cmake/cuda.cmake) so
// that its roundings are those of the generated kernels. f16 and bf16 operands compute in f32 and round
// once on store (half.cuh's Widened): Op::run_in_f32's values, bitwise, in one pass. Casts convert
// 16-bit floats through f32, rounding to nearest even (the CPU's conversions). CUDA headers only.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/half.cuh"
#include "kernels/cuda/hw_policy.h"
#ifndef __CUDACC__
#define TX_EW_DEVICE inline  // the emulator's host build of the scalar math
#endif
#include "kernels/cuda/ew_math.cuh"

namespace titanax::kernels::cuda::elementwise_kernels {

template <class T>
struct BinaryF {
  int op;
  TX_HW_FN T operator()(T x, T y) const {
    switch (op) {
      case ew::add: return ewm::add(x, y);
      case ew::sub: return ewm::sub(x, y);
      case ew::mul: return ewm::mul(x, y);
      case ew::div: return ewm::div_(x, y);
      case ew::maximum: return ewm::maximum(x, y);
      case ew::minimum: return ewm::minimum(x, y);
      case ew::relu_backward: return ewm::relu_backward(x, y);
      default: break;
    }
    if constexpr (std::is_floating_point_v<T>) {
      switch (op) {
        case ew::pow: return ewm::pow_(x, y);
        case ew::gelu_tanh_backward: return ewm::gelu_tanh_backward(x, y);
        case ew::gelu_erf_backward: return ewm::gelu_erf_backward(x, y);
        default: break;
      }
    } else if (op == ew::pow) {
      return T(::pow(double(x), double(y)));
    }
    return T(0);
  }
};

template <class T>
struct CompareF {
  int op;
  TX_HW_FN bool operator()(T x, T y) const {
    switch (op) {
      case ew::eq: return ewm::eq(x, y);
      case ew::ne: return ewm::ne(x, y);
      case ew::lt: return ewm::lt(x, y);
      case ew::le: return ewm::le(x, y);
      case ew::gt: return ewm::gt(x, y);
      default: return ewm::ge(x, y);
    }
  }
};

template <class T>
struct UnaryF {
  int op;
  TX_HW_FN T operator()(T v) const {
    switch (op) {
      case ew::neg: return ewm::neg(v);
      case ew::abs: return ewm::abs_(v);
      case ew::square: return ewm::square(v);
      case ew::sign: return ewm::sign(v);
      case ew::relu: return ewm::relu(v);
      default: break;
    }
    if constexpr (std::is_floating_point_v<T>) {
      switch (op) {
        case ew::exp: return ewm::exp_(v);
        case ew::log: return ewm::log_(v);
        case ew::sqrt: return ewm::sqrt_(v);
        case ew::rsqrt: return ewm::rsqrt_(v);
        case ew::tanh: return ewm::tanh_(v);
        case ew::sigmoid: return ewm::sigmoid(v);
        case ew::reciprocal: return ewm::reciprocal(v);
        case ew::gelu_tanh: return ewm::gelu_tanh(v);
        case ew::gelu_erf: return ewm::gelu_erf(v);
        default: break;
      }
    }
    return T(0);
  }
};

// Conversion as astype; 16-bit floats go through f32 (as kernels/cpu/dispatch.h convert does).
template <class D, class S>
struct CastF {
  TX_HW_FN D operator()(S v) const { return narrow<D>(ewm::cast_to<compute_t<D>, compute_t<S>>::f(widen(v))); }
};
template <class T>
struct ClampF {
  T lo, hi;
  TX_HW_FN T operator()(T v) const { return ewm::clamp(v, lo, hi); }
};

/// Element offsets of operands 0..N-1 for linear (row-major) index i of layout L.
template <int N>
TX_HW_FN void offsets(const Layout& L, int64_t i, int64_t* off) {
  TX_UNROLL
  for (int k = 0; k < N; ++k) off[k] = 0;
  for (int d = L.ndim - 1; d >= 0; --d) {
    const int64_t s = L.size[d];
    const int64_t c = i % s;
    i /= s;
    TX_UNROLL
    for (int k = 0; k < N; ++k) off[k] += c * L.stride[k][d];
  }
}

/// out = f(a, b) over n elements of layout L (operands 0, 1, 2: out, a, b).
template <class Hw, class TO, class TA, class TB, class F>
TX_HW_FN void binary(TO* out, const TA* a, const TB* b, const Layout& L, int64_t n, F f) {
  for (int64_t i = grid_index<Hw>(); i < n; i += grid_stride<Hw>()) {
    int64_t o[3];
    offsets<3>(L, i, o);
    out[o[0]] = f(a[o[1]], b[o[2]]);
  }
}
/// out[i] = f(a[i], b[i]): contiguous operands of one shape.
template <class Hw, class TO, class TA, class TB, class F>
TX_HW_FN void binary_flat(TO* out, const TA* a, const TB* b, int64_t n, F f) {
  for (int64_t i = grid_index<Hw>(); i < n; i += grid_stride<Hw>()) out[i] = f(a[i], b[i]);
}
/// The same with 16-byte aligned pointers to f32, f16 or bf16 (kPackable): one 16-byte pack of each
/// operand per thread and step, then the tail.
template <class Hw, class T, class F>
TX_HW_FN void binary_packed(T* out, const T* a, const T* b, int64_t n, F f) {
  constexpr int W = Pack16<T>::n;
  const int64_t np = n / W;
  for (int64_t i = grid_index<Hw>(); i < np; i += grid_stride<Hw>()) {
    const Pack16<T> x = load16(a + W * i), y = load16(b + W * i);
    Pack16<T> r;
    TX_UNROLL
    for (int k = 0; k < W; ++k) r.v[k] = f(x.v[k], y.v[k]);
    store16(out + W * i, r);
  }
  for (int64_t i = np * W + grid_index<Hw>(); i < n; i += grid_stride<Hw>()) out[i] = f(a[i], b[i]);
}
/// out = f(x) over n elements of layout L (operands 0, 1: out, x).
template <class Hw, class TO, class TA, class F>
TX_HW_FN void unary(TO* out, const TA* x, const Layout& L, int64_t n, F f) {
  for (int64_t i = grid_index<Hw>(); i < n; i += grid_stride<Hw>()) {
    int64_t o[2];
    offsets<2>(L, i, o);
    out[o[0]] = f(x[o[1]]);
  }
}
/// The same over contiguous operands with 16-byte aligned pointers to f32, f16 or bf16 (kPackable): one
/// 16-byte pack per thread and step, then the tail.
template <class Hw, class T, class F>
TX_HW_FN void unary_packed(T* out, const T* x, int64_t n, F f) {
  constexpr int W = Pack16<T>::n;
  const int64_t np = n / W;
  for (int64_t i = grid_index<Hw>(); i < np; i += grid_stride<Hw>()) {
    const Pack16<T> v = load16(x + W * i);
    Pack16<T> r;
    TX_UNROLL
    for (int k = 0; k < W; ++k) r.v[k] = f(v.v[k]);
    store16(out + W * i, r);
  }
  for (int64_t i = np * W + grid_index<Hw>(); i < n; i += grid_stride<Hw>()) out[i] = f(x[i]);
}
/// out = c ? a : b over n elements of layout L (operands 0..3: out, c, a, b).
template <class Hw, class T>
TX_HW_FN void where(T* out, const bool* c, const T* a, const T* b, const Layout& L, int64_t n) {
  for (int64_t i = grid_index<Hw>(); i < n; i += grid_stride<Hw>()) {
    int64_t o[4];
    offsets<4>(L, i, o);
    out[o[0]] = c[o[1]] ? a[o[2]] : b[o[3]];
  }
}

}  // namespace titanax::kernels::cuda::elementwise_kernels
