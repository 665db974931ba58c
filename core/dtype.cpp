#include "core/dtype.h"

#include "core/error.h"

namespace titanax {

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    case DType::f64: return "f64";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
    case DType::u8: return "u8";
    case DType::bool_: return "bool";
  }
  return "?";
}

DType dtype_from_name(std::string_view n) {
  struct Alias { std::string_view name; DType t; };
  static constexpr Alias aliases[] = {
      {"f32", DType::f32},   {"float32", DType::f32}, {"F32", DType::f32},   {"f16", DType::f16},
      {"float16", DType::f16}, {"F16", DType::f16},   {"bf16", DType::bf16}, {"bfloat16", DType::bf16},
      {"BF16", DType::bf16}, {"f64", DType::f64},     {"float64", DType::f64}, {"F64", DType::f64},
      {"i32", DType::i32},   {"int32", DType::i32},   {"I32", DType::i32},   {"i64", DType::i64},
      {"int64", DType::i64}, {"I64", DType::i64},     {"u8", DType::u8},     {"uint8", DType::u8},
      {"U8", DType::u8},     {"bool", DType::bool_},  {"BOOL", DType::bool_}};
  for (const auto& a : aliases)
    if (a.name == n) return a.t;
  std::vector<std::string> known = {"f32", "f16", "bf16", "f64", "i32", "i64", "u8", "bool"};
  throw DTypeError("unknown dtype name", "one of " + join(known), "'" + std::string(n) + "'",
                   did_you_mean(n, known));
}

f16_t::f16_t(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // inf or NaN
    bits = uint16_t(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
    return;
  }
  if (absx >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
    bits = uint16_t(sign | 0x7c00u);
    return;
  }
  if (absx < 0x38800000u) {  // subnormal half (or zero): value = m * 2^-24
    float af;
    std::memcpy(&af, &absx, 4);
    // Adding 0.5 (2^-1) aligns the half-subnormal quantum 2^-24 to the f32 ulp of 0.5, rounding to even.
    float t = af + 0.5f;
    uint32_t tb;
    std::memcpy(&tb, &t, 4);
    bits = uint16_t(sign | (tb - 0x3f000000u));
    return;
  }
  uint32_t mant_odd = (absx >> 13) & 1u;
  absx += 0xc8000fffu + mant_odd;  // re-bias exponent (-112 << 23) and round to nearest even
  bits = uint16_t(sign | (absx >> 13));
}

f16_t::operator float() const {
  uint32_t sign = uint32_t(bits & 0x8000u) << 16;
  uint32_t exp = (bits >> 10) & 0x1fu;
  uint32_t mant = bits & 0x3ffu;
  uint32_t out;
  if (exp == 0) {
    if (mant == 0) {
      out = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { ++e; mant <<= 1; } while ((mant & 0x400u) == 0);
      out = sign | (uint32_t(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    out = sign | 0x7f800000u | (mant << 13);
  } else {
    out = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

}  // namespace titanax
