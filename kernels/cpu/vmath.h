// Branch-free float exp / tanh that the compiler vectorises (AVX2 / AVX-512) inside simple loops, for the
// f32 paths of the hot elementwise and softmax / cross-entropy kernels. Internal to kernels/cpu.
//
// exp: Cody-Waite range reduction x = n ln2 + r (|r| <= ln2 / 2) and Cephes' degree-6 polynomial for
// e^r (Moshier, Cephes Math Library, expf.c), then r's result times 2^n built in two halves so every
// intermediate stays a normal float. Max error about 1 ulp against the correctly rounded value over
// the whole range; +inf -> +inf, -inf -> 0, NaN -> NaN; results below FLT_MIN are denormal as in libm.
// tanh: Cephes' tanhf: an odd minimax polynomial for |x| < 0.625, 1 - 2 / (e^{2|x|} + 1) above, the sign
// restored; about 2 ulp. Double precision keeps libm (gradient checks run in f64).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

namespace titanax::kernels::cpu {

#define TITANAX_VMATH_INLINE [[gnu::always_inline]] inline

TITANAX_VMATH_INLINE float vexp(float x) {
  const float hi = 89.0f, lo = -104.0f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // Round to nearest with the 1.5 * 2^23 trick (no libm call, vectorises; |xc * log2 e| < 2^22).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t ni = int32_t(n);
  const int32_t n1 = ni >> 1, n2 = ni - n1;  // each in [-75, 65]: 2^n1 and 2^n2 are normal floats
  const float s1 = std::bit_cast<float>((n1 + 127) << 23), s2 = std::bit_cast<float>((n2 + 127) << 23);
  const float res = p * s1 * s2;
  return x != x ? x : res;
}

TITANAX_VMATH_INLINE float vtanh(float x) {
  const float a = x < 0 ? -x : x;
  // |x| >= 0.625: 1 - 2 / (e^{2|x|} + 1) (saturates to 1 for large |x|, no overflow issue: 2/inf = 0).
  const float big = 1.0f - 2.0f / (vexp(2.0f * a) + 1.0f);
  // |x| < 0.625: x + x z P(z), z = x^2.
  const float z = a * a;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = a + a * z * p;
  const float t = a < 0.625f ? small : big;
  const float res = x < 0 ? -t : t;
  return x != x ? x : res;
}

/// exp / tanh for float (vectorisable) and double (libm).
TITANAX_VMATH_INLINE float fexp(float x) { return vexp(x); }
TITANAX_VMATH_INLINE double fexp(double x) { return std::exp(x); }
TITANAX_VMATH_INLINE float ftanh(float x) { return vtanh(x); }
TITANAX_VMATH_INLINE double ftanh(double x) { return std::tanh(x); }

}  // namespace titanax::kernels::cpu
