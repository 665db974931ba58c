// Element types and the 16-bit float formats.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace titanax {

/// Element type of a tensor. bool_ is stored as one byte (0 or 1).
enum class DType : uint8_t { f32, f16, bf16, f64, i32, i64, u8, bool_ };

/// Size of one element in bytes.
constexpr size_t itemsize(DType t) {
  switch (t) {
    case DType::f64: case DType::i64: return 8;
    case DType::f32: case DType::i32: return 4;
    case DType::f16: case DType::bf16: return 2;
    case DType::u8: case DType::bool_: return 1;
  }
  return 0;
}
constexpr bool is_floating(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::f16 || t == DType::bf16;
}
/// The 16-bit floating types. Kernels compute them in f32: inputs widen exactly, results round to
/// nearest even when stored (as CUDA's half-precision arithmetic and PyTorch's kernels do).
constexpr bool is_half(DType t) { return t == DType::f16 || t == DType::bf16; }
constexpr bool is_integral(DType t) { return t == DType::i32 || t == DType::i64 || t == DType::u8; }

/// "f32", "bf16", ... (the names configs and safetensors use, see dtype_from_name).
std::string_view dtype_name(DType t);
/// Parses "f32" / "float32", "bf16" / "bfloat16", ... ; throws DTypeError naming the known names.
DType dtype_from_name(std::string_view name);

/// bfloat16: the top 16 bits of an IEEE f32 (Google Brain format). Conversion rounds to nearest even.
struct bf16_t {
  uint16_t bits = 0;
  bf16_t() = default;
  explicit bf16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = uint16_t((u >> 16) | 0x40); return; }  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = uint16_t(u >> 16);
  }
  explicit operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

/// IEEE 754 binary16. Conversion rounds to nearest even; overflow gives inf.
struct f16_t {
  uint16_t bits = 0;
  f16_t() = default;
  explicit f16_t(float f);
  explicit operator float() const;
};

}  // namespace titanax
