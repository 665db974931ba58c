// CPU elementwise kernels: broadcasting binary ops, unary ops, where, casts and fills.
// Inputs may be strided (and broadcast); outputs are written through their strides.
#pragma once

#include "core/tensor.h"

namespace titanax::kernels::cpu {

enum class BinaryOp {
  add, sub, mul, div, maximum, minimum, pow,
  eq, ne, lt, le, gt, ge,                // -> bool
  relu_backward,                         // (dy, y) -> y > 0 ? dy : 0
  gelu_tanh_backward, gelu_erf_backward  // (dy, x) -> dy * gelu'(x)
};
enum class UnaryOp { neg, exp, log, sqrt, rsqrt, tanh, sigmoid, abs, square, reciprocal, relu, gelu_tanh, gelu_erf, sign };

const char* binary_name(BinaryOp op);
const char* unary_name(UnaryOp op);
bool is_comparison(BinaryOp op);

/// out = op(a, b) with a and b broadcast to out.shape(). Arithmetic on f32/f64/i32/i64 (a, b, out of one
/// dtype), comparisons write bool. Throws DTypeError otherwise.
void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out);
/// out = op(x); f32/f64 (neg, abs, square, sign also i32/i64).
void unary(UnaryOp op, const Tensor& x, Tensor& out);
/// out = min(max(x, lo), hi).
void clamp(const Tensor& x, double lo, double hi, Tensor& out);
/// out = cond ? a : b, all broadcast to out.shape(); cond is bool.
void where(const Tensor& cond, const Tensor& a, const Tensor& b, Tensor& out);
/// dst = src converted to dst's dtype (same shape, any strides).
void copy_cast(const Tensor& src, Tensor& dst);
/// Every element of dst = value (converted to dst's dtype).
void fill(Tensor& dst, double value);

}  // namespace titanax::kernels::cpu
