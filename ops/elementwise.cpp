// Elementwise ops: broadcasting binary arithmetic and comparisons, unary functions, where, clamp.
#include <cmath>

#include "core/onnx_builder.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cuda/kernels.h"
#include "ops/ops.h"

namespace titanax {
namespace {

using kernels::cpu::BinaryOp;
using kernels::cpu::UnaryOp;

// gelu''(x), written with differentiable ops (so gelu's third and higher derivatives follow).
//   exact:  gelu = x Phi(x), gelu'' = phi(x) (2 - x^2), phi(x) = exp(-x^2 / 2) / sqrt(2 pi);
//   tanh:   gelu = x (1 + t) / 2 with t = tanh(s), s = k (x + c x^3), k = sqrt(2 / pi), c = 0.044715:
//           gelu'' = (1 - t^2) (s' - x t s'^2 + x s'' / 2), s' = k (1 + 3 c x^2), s'' = 6 k c x.
Tensor gelu_second_derivative(const Tensor& x, bool approximate) {
  const double pi = 3.14159265358979323846;
  const Tensor x2 = square(x);
  if (!approximate) return exp(x2 * -0.5) * (1.0 / std::sqrt(2 * pi)) * (2.0 - x2);
  const double k = std::sqrt(2 / pi), c = 0.044715;
  const Tensor t = tanh((x + x2 * x * c) * k), ds = (x2 * (3 * c) + 1.0) * k;
  return (1.0 - square(t)) * (ds - x * t * square(ds) + x2 * (3 * k * c));
}

class Binary final : public Op {
 public:
  explicit Binary(BinaryOp k) : k_(k) {}
  const char* name() const override { return kernels::cpu::binary_name(k_); }
  bool differentiable() const override { return !kernels::cpu::is_comparison(k_); }
  bool linear() const override { return k_ == BinaryOp::add || k_ == BinaryOp::sub; }
  bool vjp_reads_inputs() const override { return !linear(); }  // add, sub: sum_to(+-g, shape)
  // d(a b) = da b + a db;  d(a / b) = (da - (a / b) db) / b. Other ops: jvp from the vjp.
  std::optional<TensorList> jvp(const TensorList& in, const TensorList& out, const TensorList& t) const override {
    const Tensor &a = in[0], &b = in[1], &ta = t[0], &tb = t[1];
    if (k_ == BinaryOp::mul) return TensorList{sum_defined(ta.defined() ? mul(ta, b) : Tensor(), tb.defined() ? mul(a, tb) : Tensor())};
    if (k_ == BinaryOp::div) {
      const Tensor num = ta.defined() && tb.defined() ? sub(ta, mul(out[0], tb)) : ta.defined() ? ta : neg(mul(out[0], tb));
      return TensorList{div(num, b)};
    }
    return std::nullopt;
  }

  std::vector<TensorSpec> infer(const TensorList& in) const override {
    check_same_dtype(in, name());
    Shape s = broadcast_shapes(in[0].shape(), in[1].shape());
    DType out = kernels::cpu::is_comparison(k_) ? DType::bool_ : in[0].dtype();
    return {{s, out, in[0].device()}};
  }
  // f16 / bf16: computed in f32 and rounded once (run_in_f32 on the CPU; natively on CUDA, in one pass).
  void cpu(const TensorList& in, TensorList& out) const override {
    if (is_half(in[0].dtype())) return run_in_f32(in, out);
    kernels::cpu::binary(k_, in[0], in[1], out[0]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    kernels::cuda::binary(k_, in[0], in[1], out[0]);
  }

  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    const Tensor &a = in[0], &b = in[1], &g = ct[0];
    TensorList r(2);
    auto red = [](const Tensor& t, const Tensor& like) { return sum_to(t, like.shape()); };
    switch (k_) {
      case BinaryOp::add:
        if (needs[0]) r[0] = red(g, a);
        if (needs[1]) r[1] = red(g, b);
        break;
      case BinaryOp::sub:
        if (needs[0]) r[0] = red(g, a);
        if (needs[1]) r[1] = red(neg(g), b);
        break;
      case BinaryOp::mul:
        if (needs[0]) r[0] = red(mul(g, b), a);
        if (needs[1]) r[1] = red(mul(g, a), b);
        break;
      case BinaryOp::div:
        if (needs[0]) r[0] = red(div(g, b), a);
        if (needs[1]) r[1] = red(neg(div(mul(g, a), mul(b, b))), b);
        break;
      case BinaryOp::maximum:
      case BinaryOp::minimum: {
        Tensor pick_a = k_ == BinaryOp::maximum ? ge(a, b) : le(a, b);
        Tensor zero = scalar_like(0.0, g);
        if (needs[0]) r[0] = red(where(pick_a, g, zero), a);
        if (needs[1]) r[1] = red(where(pick_a, zero, g), b);
        break;
      }
      case BinaryOp::pow:
        if (needs[0]) r[0] = red(mul(g, mul(b, pow(a, sub(b, scalar_like(1.0, b))))), a);
        if (needs[1]) r[1] = red(mul(g, mul(pow(a, b), log(a))), b);
        break;
      case BinaryOp::relu_backward:  // (dy, y): linear in dy, piecewise constant in y
        if (needs[0]) r[0] = relu_backward(g, b);
        break;
      case BinaryOp::gelu_tanh_backward:
      case BinaryOp::gelu_erf_backward:
        if (needs[0]) r[0] = red(gelu_backward(g, b, k_ == BinaryOp::gelu_tanh_backward), a);
        if (needs[1]) r[1] = red(mul(mul(g, a), gelu_second_derivative(b, k_ == BinaryOp::gelu_tanh_backward)), b);
        break;
      default: break;
    }
    return r;
  }

  // The arithmetic and comparisons map one to one (ONNX broadcasts as NumPy does, as these ops do); ne is
  // Not(Equal). The backward kinds have no ONNX form: an exported function is an inference function.
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    const char* type = nullptr;
    switch (k_) {
      case BinaryOp::add: type = "Add"; break;
      case BinaryOp::sub: type = "Sub"; break;
      case BinaryOp::mul: type = "Mul"; break;
      case BinaryOp::div: type = "Div"; break;
      case BinaryOp::maximum: type = "Max"; break;
      case BinaryOp::minimum: type = "Min"; break;
      case BinaryOp::pow: type = "Pow"; break;
      case BinaryOp::eq: type = "Equal"; break;
      case BinaryOp::lt: type = "Less"; break;
      case BinaryOp::le: type = "LessOrEqual"; break;
      case BinaryOp::gt: type = "Greater"; break;
      case BinaryOp::ge: type = "GreaterOrEqual"; break;
      case BinaryOp::ne: b.node("Not", {b.op("Equal", io.in)}, io.out); return true;
      default: return false;
    }
    b.node(type, io.in, io.out);
    return true;
  }

 private:
  BinaryOp k_;
};

class Unary final : public Op {
 public:
  explicit Unary(UnaryOp k) : k_(k) {}
  const char* name() const override { return kernels::cpu::unary_name(k_); }
  bool differentiable() const override { return k_ != UnaryOp::sign; }
  bool linear() const override { return k_ == UnaryOp::neg; }
  // Elementwise: the Jacobian is diagonal, so J t = J^T t, the vjp with cotangent t.
  std::optional<TensorList> jvp(const TensorList& in, const TensorList& out, const TensorList& t) const override {
    return vjp(in, out, t, {true});
  }
  bool saves_outputs() const override {
    switch (k_) {
      case UnaryOp::exp: case UnaryOp::sqrt: case UnaryOp::rsqrt: case UnaryOp::tanh: case UnaryOp::sigmoid:
      case UnaryOp::reciprocal: case UnaryOp::relu: return true;
      default: return false;
    }
  }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    return {{in[0].shape(), in[0].dtype(), in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    if (is_half(in[0].dtype())) return run_in_f32(in, out);
    kernels::cpu::unary(k_, in[0], out[0]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    kernels::cuda::unary(k_, in[0], out[0]);
  }

  TensorList vjp(const TensorList& in, const TensorList& out, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    const Tensor &x = in[0], &y = out.empty() ? Tensor() : out[0], &g = ct[0];
    switch (k_) {
      case UnaryOp::neg: return {neg(g)};
      case UnaryOp::exp: return {mul(g, y)};
      case UnaryOp::log: return {div(g, x)};
      case UnaryOp::sqrt: return {div(mul(g, scalar_like(0.5, g)), y)};
      case UnaryOp::rsqrt: return {mul(g, mul(scalar_like(-0.5, y), mul(y, square(y))))};
      case UnaryOp::tanh: return {mul(g, sub(scalar_like(1.0, y), square(y)))};
      case UnaryOp::sigmoid: return {mul(g, mul(y, sub(scalar_like(1.0, y), y)))};
      case UnaryOp::abs: return {mul(g, apply1(std::make_shared<Unary>(UnaryOp::sign), {x}))};
      case UnaryOp::square: return {mul(g, mul(x, scalar_like(2.0, x)))};
      case UnaryOp::reciprocal: return {neg(mul(g, square(y)))};
      case UnaryOp::relu: return {relu_backward(g, y)};
      case UnaryOp::gelu_tanh: return {gelu_backward(g, x, true)};
      case UnaryOp::gelu_erf: return {gelu_backward(g, x, false)};
      default: return {Tensor()};
    }
  }

  // One ONNX operator each, except rsqrt = 1 / sqrt, square = x * x and gelu, which opset 17 lacks:
  //   exact: x / 2 (1 + erf(x / sqrt 2));  tanh: x / 2 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    const std::string& x = io.in[0];
    const DType t = io.in_specs[0].dtype;
    const char* type = nullptr;
    switch (k_) {
      case UnaryOp::neg: type = "Neg"; break;
      case UnaryOp::exp: type = "Exp"; break;
      case UnaryOp::log: type = "Log"; break;
      case UnaryOp::sqrt: type = "Sqrt"; break;
      case UnaryOp::tanh: type = "Tanh"; break;
      case UnaryOp::sigmoid: type = "Sigmoid"; break;
      case UnaryOp::abs: type = "Abs"; break;
      case UnaryOp::reciprocal: type = "Reciprocal"; break;
      case UnaryOp::relu: type = "Relu"; break;
      case UnaryOp::sign: type = "Sign"; break;
      case UnaryOp::rsqrt: b.node("Reciprocal", {b.op("Sqrt", {x})}, io.out); return true;
      case UnaryOp::square: b.node("Mul", {x, x}, io.out); return true;
      case UnaryOp::gelu_erf:
      case UnaryOp::gelu_tanh: {
        std::string inner;
        if (k_ == UnaryOp::gelu_erf) {
          inner = b.op("Erf", {b.op("Mul", {x, b.scalar(1 / std::sqrt(2.0), t)})});
        } else {
          const std::string cube = b.op("Mul", {b.op("Mul", {x, x}), x});
          const std::string s = b.op("Add", {x, b.op("Mul", {cube, b.scalar(0.044715, t)})});
          inner = b.op("Tanh", {b.op("Mul", {s, b.scalar(std::sqrt(2 / 3.14159265358979323846), t)})});
        }
        const std::string half_x = b.op("Mul", {x, b.scalar(0.5, t)});
        b.node("Mul", {half_x, b.op("Add", {inner, b.scalar(1.0, t)})}, io.out);
        return true;
      }
    }
    b.node(type, io.in, io.out);
    return true;
  }

 private:
  UnaryOp k_;
};

class Where final : public Op {
 public:
  const char* name() const override { return "where"; }
  bool linear() const override { return true; }  // in its branches, the condition held fixed
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    check_dtype(in[0], {DType::bool_}, "where (condition)");
    if (in[1].dtype() != in[2].dtype())
      throw DTypeError("where: branches have different dtypes", std::string(dtype_name(in[1].dtype())),
                       std::string(dtype_name(in[2].dtype())), "cast one branch with astype()");
    Shape s = broadcast_shapes(broadcast_shapes(in[0].shape(), in[1].shape()), in[2].shape());
    return {{s, in[1].dtype(), in[1].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override { kernels::cpu::where(in[0], in[1], in[2], out[0]); }
  void cuda(const TensorList& in, TensorList& out) const override {
    kernels::cuda::where(in[0], in[1], in[2], out[0]);
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    TensorList r(3);
    Tensor zero = scalar_like(0.0, ct[0]);
    if (needs[1]) r[1] = sum_to(where(in[0], ct[0], zero), in[1].shape());
    if (needs[2]) r[2] = sum_to(where(in[0], zero, ct[0]), in[2].shape());
    return r;
  }
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    b.node("Where", io.in, io.out);
    return true;
  }
};

class Clamp final : public Op {
 public:
  Clamp(double lo, double hi) : lo_(lo), hi_(hi) {}
  const char* name() const override { return "clamp"; }
  std::string attrs() const override { return "lo=" + attr_num(lo_) + " hi=" + attr_num(hi_); }
  // Elementwise: J t = J^T t, the vjp with cotangent t.
  std::optional<TensorList> jvp(const TensorList& in, const TensorList& out, const TensorList& t) const override {
    return vjp(in, out, t, {true});
  }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    if (lo_ > hi_) throw ValueError("clamp with lo > hi", "lo <= hi", std::to_string(lo_) + " > " + std::to_string(hi_));
    return {{in[0].shape(), in[0].dtype(), in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    if (is_half(in[0].dtype())) return run_in_f32(in, out);
    kernels::cpu::clamp(in[0], lo_, hi_, out[0]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    kernels::cuda::clamp(in[0], lo_, hi_, out[0]);
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    const Tensor& x = in[0];
    Tensor zero = scalar_like(0.0, ct[0]);
    return {where(ge(x, scalar_like(lo_, x)), where(le(x, scalar_like(hi_, x)), ct[0], zero), zero)};
  }
  // Clip with its bounds in x's dtype; an infinite bound is left out (ONNX: no bound).
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    const DType t = io.in_specs[0].dtype;
    b.node("Clip", {io.in[0], std::isinf(lo_) ? "" : b.scalar(lo_, t), std::isinf(hi_) ? "" : b.scalar(hi_, t)}, io.out);
    return true;
  }

 private:
  double lo_, hi_;
};

Tensor bin(BinaryOp k, const Tensor& a, const Tensor& b) { return apply1(std::make_shared<Binary>(k), {a, b}); }
Tensor un(UnaryOp k, const Tensor& x) { return apply1(std::make_shared<Unary>(k), {x}); }

}  // namespace

Tensor scalar_like(double v, const Tensor& like) { return scalar(v, like.dtype(), like.device()); }
Tensor sum_defined(const Tensor& a, const Tensor& b) { return a.defined() && b.defined() ? add(a, b) : a.defined() ? a : b; }

Tensor add(const Tensor& a, const Tensor& b) { return bin(BinaryOp::add, a, b); }
Tensor sub(const Tensor& a, const Tensor& b) { return bin(BinaryOp::sub, a, b); }
Tensor mul(const Tensor& a, const Tensor& b) { return bin(BinaryOp::mul, a, b); }
Tensor div(const Tensor& a, const Tensor& b) { return bin(BinaryOp::div, a, b); }
Tensor maximum(const Tensor& a, const Tensor& b) { return bin(BinaryOp::maximum, a, b); }
Tensor minimum(const Tensor& a, const Tensor& b) { return bin(BinaryOp::minimum, a, b); }
Tensor pow(const Tensor& a, const Tensor& b) { return bin(BinaryOp::pow, a, b); }
Tensor eq(const Tensor& a, const Tensor& b) { return bin(BinaryOp::eq, a, b); }
Tensor ne(const Tensor& a, const Tensor& b) { return bin(BinaryOp::ne, a, b); }
Tensor lt(const Tensor& a, const Tensor& b) { return bin(BinaryOp::lt, a, b); }
Tensor le(const Tensor& a, const Tensor& b) { return bin(BinaryOp::le, a, b); }
Tensor gt(const Tensor& a, const Tensor& b) { return bin(BinaryOp::gt, a, b); }
Tensor ge(const Tensor& a, const Tensor& b) { return bin(BinaryOp::ge, a, b); }
Tensor relu_backward(const Tensor& dy, const Tensor& y) { return bin(BinaryOp::relu_backward, dy, y); }
Tensor gelu_backward(const Tensor& dy, const Tensor& x, bool approximate) {
  return bin(approximate ? BinaryOp::gelu_tanh_backward : BinaryOp::gelu_erf_backward, dy, x);
}
Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) {
  return apply1(std::make_shared<Where>(), {cond, a, b});
}

Tensor neg(const Tensor& x) { return un(UnaryOp::neg, x); }
Tensor exp(const Tensor& x) { return un(UnaryOp::exp, x); }
Tensor log(const Tensor& x) { return un(UnaryOp::log, x); }
Tensor sqrt(const Tensor& x) { return un(UnaryOp::sqrt, x); }
Tensor rsqrt(const Tensor& x) { return un(UnaryOp::rsqrt, x); }
Tensor tanh(const Tensor& x) { return un(UnaryOp::tanh, x); }
Tensor sigmoid(const Tensor& x) { return un(UnaryOp::sigmoid, x); }
Tensor abs(const Tensor& x) { return un(UnaryOp::abs, x); }
Tensor square(const Tensor& x) { return un(UnaryOp::square, x); }
Tensor reciprocal(const Tensor& x) { return un(UnaryOp::reciprocal, x); }
Tensor relu(const Tensor& x) { return un(UnaryOp::relu, x); }
Tensor gelu(const Tensor& x, bool approximate) { return un(approximate ? UnaryOp::gelu_tanh : UnaryOp::gelu_erf, x); }
Tensor clamp(const Tensor& x, double lo, double hi) { return apply1(std::make_shared<Clamp>(lo, hi), {x}); }

Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
Tensor operator-(const Tensor& a) { return neg(a); }
Tensor operator+(const Tensor& a, double b) { return add(a, scalar_like(b, a)); }
Tensor operator-(const Tensor& a, double b) { return sub(a, scalar_like(b, a)); }
Tensor operator*(const Tensor& a, double b) { return mul(a, scalar_like(b, a)); }
Tensor operator/(const Tensor& a, double b) { return div(a, scalar_like(b, a)); }
Tensor operator+(double a, const Tensor& b) { return add(scalar_like(a, b), b); }
Tensor operator-(double a, const Tensor& b) { return sub(scalar_like(a, b), b); }
Tensor operator*(double a, const Tensor& b) { return mul(scalar_like(a, b), b); }
Tensor operator/(double a, const Tensor& b) { return div(scalar_like(a, b), b); }

}  // namespace titanax
