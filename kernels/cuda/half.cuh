// 16-bit float storage (f16, bf16) for kernels that compute in f32, the way PyTorch's CUDA kernels do
// (`opmath_t`): values widen to f32 on load and round once, to nearest even, on store: the conversions of
// kernels/cpu/dispatch.h, so a kernel over 16-bit storage gives bitwise what Op::run_in_f32 gives (widen
// every input, compute in f32, round the result) in one pass over the 16-bit bytes instead of three.
// Also 16-byte packs (8 16-bit values, 4 f32) for vectorised contiguous bodies. Runs on the GPU and,
// through hw_policy.h's host branch, in tests/emulated/. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <type_traits>

#include "kernels/cuda/hw_policy.h"

namespace titanax::kernels::cuda {

template <class T> struct is16 : std::false_type {};
template <> struct is16<__half> : std::true_type {};
template <> struct is16<__nv_bfloat16> : std::true_type {};

/// The type a kernel computes T in: f32 for the 16-bit floats, T itself otherwise.
template <class T>
using compute_t = std::conditional_t<is16<T>::value, float, T>;

TX_HW_FN float widen16(__half v) { return __half2float(v); }
TX_HW_FN float widen16(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class D> TX_HW_FN D narrow16(float f);
template <> TX_HW_FN __half narrow16<__half>(float f) { return __float2half_rn(f); }
template <> TX_HW_FN __nv_bfloat16 narrow16<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }

/// v in its compute type (exact).
template <class T>
TX_HW_FN compute_t<T> widen(T v) {
  if constexpr (is16<T>::value) return widen16(v);
  else return v;
}
/// v rounded to the storage type T (round to nearest even for the 16-bit floats; the identity otherwise).
template <class T>
TX_HW_FN T narrow(compute_t<T> v) {
  if constexpr (is16<T>::value) return narrow16<T>(v);
  else return v;
}

/// v (any arithmetic value) stored as T: converted to T's compute type, then rounded to T once.
template <class T, class V>
TX_HW_FN T store_as(V v) {
  return narrow<T>(compute_t<T>(v));
}

/// A functor over f32 applied to 16-bit storage T: its arguments widened, an f32 result rounded to T
/// once, any other result (a comparison's bool) passed through.
template <class T, class F>
struct Widened {
  F f;
  template <class... A>
  TX_HW_FN auto operator()(A... a) const {
    const auto r = f(widen(a)...);
    if constexpr (std::is_same_v<std::remove_const_t<decltype(r)>, float>) return narrow<T>(r);
    else return r;
  }
};
/// f itself over storage types that compute natively, Widened<T, F> over the 16-bit floats (made on
/// the host, by the launchers).
template <class T, class F>
constexpr auto widened(F f) {
  if constexpr (is16<T>::value) return Widened<T, F>{f};
  else return f;
}

/// The storage types the vectorised contiguous bodies serve: f32 and the 16-bit floats.
template <class T>
inline constexpr bool kPackable = std::is_same_v<T, float> || is16<T>::value;

/// 16 bytes of T: 4 f32 or 8 16-bit values, moved by one 16-byte access (ld / st.global.v4).
template <class T>
struct Pack16 {
  static constexpr int n = int(16 / sizeof(T));
  T v[n];
};
/// The 16 bytes at p (16-byte aligned) as a pack.
template <class T>
TX_HW_FN Pack16<T> load16(const T* p) {
  const float4 bits = load_f4(reinterpret_cast<const float*>(p));
  Pack16<T> r;
  std::memcpy(r.v, &bits, 16);
  return r;
}
/// The pack into the 16 bytes at p (16-byte aligned).
template <class T>
TX_HW_FN void store16(T* p, const Pack16<T>& r) {
  float4 bits;
  std::memcpy(&bits, r.v, 16);
  store_f4(reinterpret_cast<float*>(p), bits);
}

}  // namespace titanax::kernels::cuda
