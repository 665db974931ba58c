// Reductions: sum, mean, max, min, logsumexp, argmax, sum_to, sum_squares.
#include <algorithm>

#include "core/onnx_builder.h"
#include "kernels/cpu/optim.h"
#include "kernels/cpu/reduce.h"
#include "kernels/cuda/kernels.h"
#include "ops/ops.h"

namespace titanax {
namespace {

using kernels::cpu::ReduceOp;

std::vector<bool> reduced_mask(const Shape& s, const std::vector<int>& axes) {
  std::vector<bool> m(size_t(s.rank()), axes.empty());
  for (int a : axes) {
    int n = normalize_axis(a, s.rank());
    if (m[size_t(n)] && !axes.empty())
      throw ShapeError("axis repeated in a reduction", "distinct axes", "axis " + std::to_string(a) + " twice");
    m[size_t(n)] = true;
  }
  return m;
}

Shape keep_shape(const Shape& s, const std::vector<bool>& m) {
  Shape k = s;
  for (int i = 0; i < s.rank(); ++i)
    if (m[size_t(i)]) k[i] = 1;
  return k;
}

Shape out_shape(const Shape& s, const std::vector<bool>& m, bool keepdims) {
  if (keepdims) return keep_shape(s, m);
  Shape o;
  for (int i = 0; i < s.rank(); ++i)
    if (!m[size_t(i)]) o.push_back(s[i]);
  return o;
}

class Reduce final : public Op {
 public:
  Reduce(ReduceOp k, std::vector<int> axes, bool keepdims) : k_(k), axes_(std::move(axes)), keepdims_(keepdims) {}
  const char* name() const override { return k_ == ReduceOp::sum ? "sum" : k_ == ReduceOp::max ? "max" : "min"; }
  // Sums under autocast run in f32 (PyTorch's list); max / min are exact in any dtype.
  AutocastPolicy autocast_policy() const override { return k_ == ReduceOp::sum ? AutocastPolicy::f32 : AutocastPolicy::promote; }
  std::string attrs() const override {
    std::string s = "axes=[";
    for (size_t i = 0; i < axes_.size(); ++i) s += (i ? "," : "") + std::to_string(axes_[i]);
    return s + "] keepdims=" + std::to_string(keepdims_);
  }
  bool saves_outputs() const override { return k_ != ReduceOp::sum; }
  bool linear() const override { return k_ == ReduceOp::sum; }

  std::vector<TensorSpec> infer(const TensorList& in) const override {
    check_dtype(in[0], {DType::f32, DType::f64, DType::bf16, DType::f16}, name());
    auto m = reduced_mask(in[0].shape(), axes_);
    if (k_ != ReduceOp::sum)
      for (int i = 0; i < in[0].dim(); ++i)
        if (m[size_t(i)] && in[0].shape()[i] == 0)
          throw ShapeError(std::string(name()) + " over an empty axis", "a non-empty axis", in[0].shape().str());
    return {{out_shape(in[0].shape(), m, keepdims_), in[0].dtype(), in[0].device()}};
  }
  // f16 / bf16: reduced in f32 (sums accumulate in double as ever), rounded once (run_in_f32 on the CPU;
  // natively on CUDA).
  void cpu(const TensorList& in, TensorList& out) const override {
    if (is_half(in[0].dtype())) return run_in_f32(in, out);
    auto m = reduced_mask(in[0].shape(), axes_);
    Tensor o = make_view(out[0], keep_shape(in[0].shape(), m), keep_shape(in[0].shape(), m).contiguous_strides(),
                         out[0].offset());
    kernels::cpu::reduce(k_, in[0], m, o);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    auto m = reduced_mask(in[0].shape(), axes_);
    Tensor o = make_view(out[0], keep_shape(in[0].shape(), m), keep_shape(in[0].shape(), m).contiguous_strides(),
                         out[0].offset());
    kernels::cuda::reduce(k_, in[0], m, o);
  }
  TensorList vjp(const TensorList& in, const TensorList& out, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    const Tensor& x = in[0];
    auto m = reduced_mask(x.shape(), axes_);
    Shape ks = keep_shape(x.shape(), m);
    Tensor g = reshape(ct[0], ks);
    if (k_ == ReduceOp::sum) return {expand(g, x.shape())};
    // max / min: split the cotangent evenly among the elements equal to the result.
    Tensor hit = eq(x, reshape(out[0], ks)).astype(x.dtype());
    std::vector<int> ax;
    for (int i = 0; i < x.dim(); ++i)
      if (m[size_t(i)]) ax.push_back(i);
    Tensor count = sum(hit, ax, true);
    return {mul(hit, div(g, count))};
  }
  // The axes written out (an empty list reduces every axis here; an empty ONNX axes list reduces all too,
  // but naming them keeps a 0-d input unambiguous). Opset 17: ReduceSum takes its axes as an input,
  // ReduceMax / ReduceMin as an attribute.
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    const auto m = reduced_mask(io.in_specs[0].shape, axes_);
    std::vector<int64_t> axes;
    for (size_t i = 0; i < m.size(); ++i)
      if (m[i]) axes.push_back(int64_t(i));
    const OnnxAttr keep{"keepdims", int64_t(keepdims_)};
    if (axes.empty()) b.node("Identity", io.in, io.out);  // a 0-d input: nothing to reduce
    else if (k_ == ReduceOp::sum) b.node("ReduceSum", {io.in[0], b.ints(axes)}, io.out, {keep});
    else b.node(k_ == ReduceOp::max ? "ReduceMax" : "ReduceMin", io.in, io.out, {keep, {"axes", axes}});
    return true;
  }

 private:
  ReduceOp k_;
  std::vector<int> axes_;
  bool keepdims_;
};

class ArgMax final : public Op {
 public:
  ArgMax(int axis, bool keepdims) : axis_(axis), keepdims_(keepdims) {}
  const char* name() const override { return "argmax"; }
  std::string attrs() const override { return "axis=" + std::to_string(axis_) + " keepdims=" + std::to_string(keepdims_); }
  bool differentiable() const override { return false; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    int a = normalize_axis(axis_, in[0].dim());
    if (in[0].shape()[a] == 0) throw ShapeError("argmax over an empty axis", "a non-empty axis", in[0].shape().str());
    std::vector<bool> m(size_t(in[0].dim()), false);
    m[size_t(a)] = true;
    return {{out_shape(in[0].shape(), m, keepdims_), DType::i64, in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    int a = normalize_axis(axis_, in[0].dim());
    kernels::cpu::argmax(in[0], a, out[0]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    kernels::cuda::argmax(in[0], normalize_axis(axis_, in[0].dim()), out[0]);
  }
  // ONNX's ArgMax also picks the first of equal maxima (select_last_index 0) and gives int64.
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    b.node("ArgMax", io.in, io.out,
           {{"axis", int64_t(normalize_axis(axis_, io.in_specs[0].shape.rank()))}, {"keepdims", int64_t(keepdims_)}});
    return true;
  }

 private:
  int axis_;
  bool keepdims_;
};

// Inputs: any number of tensors on one device; output: the 0-d f64 sum of all their squared elements.
// With `rows` > 0 (vmap's batching rule builds it), every input is [rows, ...] and the output is [rows]:
// row b the sum over the inputs' rows b, each row summed as the op sums a whole tensor (so bitwise what
// the op gives on that row's tensors).
class SumSquares final : public Op {
 public:
  explicit SumSquares(int64_t rows = 0) : rows_(rows) {}
  const char* name() const override { return "sum_squares"; }
  std::string attrs() const override { return rows_ > 0 ? "rows=" + std::to_string(rows_) : std::string(); }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    for (const Tensor& t : in) {
      check_dtype(t, {DType::f32, DType::f64, DType::bf16, DType::f16}, name());
      if (rows_ > 0 && (t.dim() == 0 || t.shape()[0] != rows_))
        throw ShapeError("sum_squares: an input without the rows to sum separately", "[" + std::to_string(rows_) + ", ...]", t.shape().str());
    }
    const Shape s = rows_ > 0 ? Shape{rows_} : Shape{};
    return {{s, DType::f64, in.empty() ? Device::cpu() : in[0].device()}};
  }
  // Tensor by tensor, each by kernels::cpu::sum_squares (fixed chunks of 16384, so thread counts do not
  // change it; 16-bit tensors widened first, exactly), summed in input order.
  void cpu(const TensorList& in, TensorList& out) const override {
    const int64_t rows = std::max<int64_t>(rows_, 1);
    double* total = out[0].data<double>();
    std::fill(total, total + rows, 0.0);
    for (const Tensor& t : in) {
      const Tensor c = is_half(t.dtype()) ? t.astype(DType::f32) : t.contiguous();
      const int64_t n = c.numel() / rows;
      for (int64_t b = 0; b < rows; ++b)
        total[b] += c.dtype() == DType::f32 ? kernels::cpu::sum_squares(c.data<float>() + b * n, n)
                                            : kernels::cpu::sum_squares(c.data<double>() + b * n, n);
    }
  }
  // With rows: the multi-tensor kernel once per row, on the rows' views, into that row's element.
  void cuda(const TensorList& in, TensorList& out) const override {
    std::vector<Tensor> whole;
    for (const Tensor& t : in) whole.push_back(t.contiguous());
    if (rows_ == 0) {
      kernels::cuda::sum_squares(whole, out[0]);
      return;
    }
    for (int64_t b = 0; b < rows_; ++b) {
      std::vector<Tensor> xs;
      for (const Tensor& t : whole) xs.push_back(t.slice(0, b, b + 1));
      Tensor o = out[0].slice(0, b, b + 1).reshape(Shape{});
      kernels::cuda::sum_squares(xs, o);
    }
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    TensorList r(in.size());
    for (size_t i = 0; i < in.size(); ++i) {
      if (!needs[i]) continue;
      Tensor k = ct[0] * 2.0;  // [rows] with rows: one factor per row
      if (rows_ > 0) {
        Shape s{rows_};
        for (int a = 1; a < in[i].dim(); ++a) s.push_back(1);
        k = k.reshape(s);
      }
      r[i] = in[i] * k.astype(in[i].dtype());
    }
    return r;
  }
  // vmap (per-example gradient norms, as DP-SGD clips them): the batched tensors by this op with rows = B
  // (bitwise the loop's per-example sums when every input is batched), plus the shared ones' sum by this
  // op (an ulp from the loop's order when the two kinds are interleaved).
  std::optional<TensorList> batch(const TensorList& in, const std::vector<bool>& batched, int64_t B) const override {
    if (rows_ > 0) return std::nullopt;
    TensorList rows, shared;
    for (size_t i = 0; i < in.size(); ++i) (batched[i] ? rows : shared).push_back(in[i]);
    Tensor total = apply1(std::make_shared<SumSquares>(B), rows);
    if (!shared.empty()) total = total + apply1(std::make_shared<SumSquares>(), shared);
    return TensorList{total};
  }

 private:
  int64_t rows_;
};

}  // namespace

Tensor sum_squares(const TensorList& xs) {
  if (xs.empty()) return scalar(0.0, DType::f64);
  return apply1(std::make_shared<SumSquares>(), xs);
}

Tensor sum(const Tensor& x, std::vector<int> axes, bool keepdims) {
  return apply1(std::make_shared<Reduce>(ReduceOp::sum, std::move(axes), keepdims), {x});
}

Tensor mean(const Tensor& x, std::vector<int> axes, bool keepdims) {
  auto m = reduced_mask(x.shape(), axes);
  int64_t n = 1;
  for (int i = 0; i < x.dim(); ++i)
    if (m[size_t(i)]) n *= x.shape()[i];
  return mul(sum(x, std::move(axes), keepdims), scalar_like(1.0 / double(std::max<int64_t>(n, 1)), x));
}

Tensor max(const Tensor& x, std::vector<int> axes, bool keepdims) {
  return apply1(std::make_shared<Reduce>(ReduceOp::max, std::move(axes), keepdims), {x});
}
Tensor min(const Tensor& x, std::vector<int> axes, bool keepdims) {
  return apply1(std::make_shared<Reduce>(ReduceOp::min, std::move(axes), keepdims), {x});
}

Tensor logsumexp(const Tensor& x, std::vector<int> axes, bool keepdims) {
  Tensor m = max(x, axes, true).detach();  // a constant shift: the gradient is softmax(x) either way
  Tensor s = log(sum(exp(sub(x, m)), axes, true)) + m;
  if (keepdims) return s;
  auto mask = reduced_mask(x.shape(), axes);
  return reshape(s, out_shape(x.shape(), mask, false));
}

Tensor argmax(const Tensor& x, int axis, bool keepdims) {
  return apply1(std::make_shared<ArgMax>(axis, keepdims), {x});
}

Tensor sum_to(const Tensor& x, const Shape& shape) {
  if (x.shape() == shape) return x;
  int lead = x.dim() - shape.rank();
  if (lead < 0) throw ShapeError("sum_to a larger rank", "rank <= " + std::to_string(x.dim()), shape.str());
  std::vector<int> axes;
  for (int i = 0; i < x.dim(); ++i) {
    if (i < lead) axes.push_back(i);
    else if (shape[i - lead] == 1 && x.shape()[i] != 1) axes.push_back(i);
    else if (shape[i - lead] != x.shape()[i])
      throw ShapeError("sum_to: shape is not a broadcast source", "a shape that broadcasts to " + x.shape().str(), shape.str());
  }
  Tensor s = sum(x, axes, true);
  return reshape(s, shape);
}

}  // namespace titanax
