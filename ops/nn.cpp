// Neural-network ops: softmax, log_softmax, cross_entropy (+ its fused backward), layer_norm (+ backward),
// dropout, take / embedding (+ their scatter-add backward). Kernels in kernels/cpu/nn.h.
#include <array>
#include <cmath>

#include "autodiff/autodiff.h"
#include "core/onnx_builder.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/nn.h"
#include "kernels/cuda/kernels.h"
#include "ops/fused_ops.h"
#include "ops/ops.h"

namespace titanax {
namespace {

namespace kc = kernels::cpu;

// A contiguous alias of an input, cut from the tape (kernels read raw pointers).
Tensor dense(const Tensor& t) { return t.is_contiguous() ? t : t.detach().contiguous(); }

// For batching rules (Op::batch): the axes of a batched operand [B, per-example...] after the batch one.
std::vector<int> example_axes(const Tensor& t) {
  std::vector<int> a;
  for (int i = 1; i < t.dim(); ++i) a.push_back(i);
  return a;
}

// t with its axes [from, from + count) moved, in order, to start at axis `to` of the result (a permute).
Tensor move_axes(const Tensor& t, int from, int count, int to) {
  std::vector<int> rest, p;
  for (int i = 0; i < t.dim(); ++i)
    if (i < from || i >= from + count) rest.push_back(i);
  p.assign(rest.begin(), rest.begin() + to);
  for (int i = from; i < from + count; ++i) p.push_back(i);
  p.insert(p.end(), rest.begin() + to, rest.end());
  for (int i = 0; i < t.dim(); ++i)
    if (p[size_t(i)] != i) return permute(t, p);
  return t;
}

// ------------------------------------------------------------------------------------ softmax

class Softmax final : public Op {
 public:
  Softmax(int axis, bool log) : axis_(axis), log_(log) {}
  const char* name() const override { return log_ ? "log_softmax" : "softmax"; }
  AutocastPolicy autocast_policy() const override { return AutocastPolicy::f32; }
  std::string attrs() const override { return "axis=" + std::to_string(axis_); }
  bool saves_outputs() const override { return true; }

  std::vector<TensorSpec> infer(const TensorList& in) const override {
    check_dtype(in[0], {DType::f32, DType::f64}, name());
    if (in[0].dim() == 0)
      throw ShapeError(std::string(name()) + " of a 0-d tensor", "a tensor with at least one axis", in[0].shape().str(),
                       "reshape the value to [1] or [n]");
    normalize_axis(axis_, in[0].dim());
    return {{in[0].shape(), in[0].dtype(), in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    Tensor x = dense(in[0]);
    const auto [outer, n, inner] = layout(x);
    kc::softmax(x, outer, n, inner, log_, out[0]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    Tensor x = dense(in[0]);
    const auto [outer, n, inner] = layout(x);
    kernels::cuda::softmax(x, outer, n, inner, log_, out[0]);
  }
  /// x viewed as [outer, n, inner] around the softmax axis.
  std::array<int64_t, 3> layout(const Tensor& x) const {
    const Shape& s = x.shape();
    const int a = normalize_axis(axis_, x.dim());
    int64_t outer = 1, inner = 1;
    for (int i = 0; i < a; ++i) outer *= s[i];
    for (int i = a + 1; i < s.rank(); ++i) inner *= s[i];
    return {outer, s[a], inner};
  }
  TensorList vjp(const TensorList&, const TensorList& out, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    const Tensor &y = out[0], &g = ct[0];
    if (log_) return {sub(g, mul(exp(y), sum(g, {axis_}, true)))};  // g - softmax * sum(g)
    return {mul(y, sub(g, sum(mul(g, y), {axis_}, true)))};          // y * (g - sum(g * y))
  }
  // The Jacobian is symmetric (softmax: diag(y) - y y^T; log_softmax: I - 1 softmax^T, applied as
  // t - sum(softmax * t)): from y and t directly, the vjp's formulas with t in place of g where they agree.
  std::optional<TensorList> jvp(const TensorList&, const TensorList& out, const TensorList& t) const override {
    const Tensor &y = out[0], &dt = t[0];
    if (log_) return TensorList{sub(dt, sum(mul(exp(y), dt), {axis_}, true))};
    return TensorList{mul(y, sub(dt, sum(mul(dt, y), {axis_}, true)))};
  }
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    b.node(log_ ? "LogSoftmax" : "Softmax", io.in, io.out, {{"axis", int64_t(normalize_axis(axis_, io.in_specs[0].shape.rank()))}});
    return true;
  }

 private:
  int axis_;
  bool log_;
};

// ------------------------------------------------------------------------------------ cross-entropy

kc::LossReduction to_kernel(Reduction r) {
  switch (r) {
    case Reduction::mean: return kc::LossReduction::mean;
    case Reduction::sum: return kc::LossReduction::sum;
    default: return kc::LossReduction::none;
  }
}
const char* reduction_name(Reduction r) {
  return r == Reduction::mean ? "mean" : r == Reduction::sum ? "sum" : "none";
}

// Shared shape / dtype rule of cross_entropy and its backward.
void check_ce_inputs(const Tensor& logits, const Tensor& labels, const char* what) {
  check_dtype(logits, {DType::f32, DType::f64, DType::bf16, DType::f16}, what);
  check_dtype(labels, {DType::i32, DType::i64}, (std::string(what) + " (labels)").c_str());
  if (logits.dim() < 1)
    throw ShapeError(std::string(what) + ": logits need a class axis", "logits [..., C]", logits.shape().str());
  Shape want(logits.shape().begin(), logits.shape().end() - 1);
  if (labels.shape() != want)
    throw ShapeError(std::string(what) + ": labels do not match the logits", "labels of shape " + want.str() +
                                                                               " for logits " + logits.shape().str(),
                     labels.shape().str(), "labels hold one class index per row of logits (no one-hot, no class axis)");
}

// The loss's dtype for logits of dtype t: f32 for f16 / bf16 logits (the loss of their exact f32 copy,
// as llm.c's and FlashAttention's fused cross-entropy kernels return it), else t.
DType ce_loss_dtype(DType t) { return is_half(t) ? DType::f32 : t; }

// What the cross-entropy ops share: the reduction and ignore_index, printed as their attributes.
class CrossEntropyBase : public Op {
 public:
  CrossEntropyBase(Reduction r, int64_t ignore) : red_(r), ignore_(ignore) {}
  std::string attrs() const override {
    return std::string("reduction=") + reduction_name(red_) + " ignore_index=" + std::to_string(ignore_);
  }
  Reduction reduction() const { return red_; }
  int64_t ignore_index() const { return ignore_; }

 protected:
  Reduction red_;
  int64_t ignore_;
};

class CrossEntropyBackward final : public CrossEntropyBase {
 public:
  using CrossEntropyBase::CrossEntropyBase;
  const char* name() const override { return "cross_entropy_backward"; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    check_ce_inputs(in[0], in[1], name());
    const Tensor& ct = in[2];
    Shape want = red_ == Reduction::none ? in[1].shape() : Shape{};
    if (ct.shape() != want || ct.dtype() != ce_loss_dtype(in[0].dtype()))
      throw ShapeError("cross_entropy_backward: cotangent does not match the loss",
                       std::string(dtype_name(ce_loss_dtype(in[0].dtype()))) + want.str(),
                       std::string(dtype_name(ct.dtype())) + ct.shape().str());
    return {{in[0].shape(), in[0].dtype(), in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    if (is_half(in[0].dtype())) return run_in_f32(in, out);
    Tensor logits = dense(in[0]), labels = dense(in[1]), ct = dense(in[2]);
    const int64_t C = logits.shape().back();
    int64_t count = kc::check_labels(labels, C, ignore_, in[1].shape(), "cross_entropy");
    kc::cross_entropy_backward(logits, labels, ct, ignore_, to_kernel(red_), count, out[0]);
  }
  // The labels are checked on the device (kernels/cuda/kernels.h): nothing waits.
  void cuda(const TensorList& in, TensorList& out) const override {
    kernels::cuda::cross_entropy_backward(dense(in[0]), dense(in[1]), dense(in[2]), ignore_, to_kernel(red_), out[0]);
  }
  // vmap: each example's gradient is this op with reduction none on the example's rows, each row's
  // cotangent the example's loss cotangent (sum), divided by the example's count of rows not ignored
  // (mean; 1 when there is none, as the kernel).
  std::optional<TensorList> batch(const TensorList& in, const std::vector<bool>& batched, int64_t B) const override {
    const Tensor logits = with_batch(in[0], batched[0], B), labels = with_batch(in[1], batched[1], B);
    Tensor ct = with_batch(in[2], batched[2], B);  // [B, labels...] under none, else [B]
    if (red_ != Reduction::none) {
      Shape per_row{B};
      for (int i = 1; i < labels.dim(); ++i) per_row.push_back(1);
      ct = ct.reshape(per_row);
      if (red_ == Reduction::mean) {
        const Tensor kept = ne(labels, scalar(double(ignore_), labels.dtype(), labels.device())).astype(ct.dtype());
        const Tensor count = labels.dim() > 1 ? sum(kept, example_axes(kept), true) : kept;
        ct = ct / maximum(count, scalar_like(1.0, count));
      }
      ct = ct.expand(labels.shape());
    }
    return TensorList{apply1(std::make_shared<CrossEntropyBackward>(Reduction::none, ignore_), {logits, labels, ct})};
  }
  // The second derivative of cross_entropy, written with differentiable ops (so higher orders follow).
  // This op computes dz = (s - one_hot(y)) k per row, s = softmax(z), where k is the loss cotangent (its
  // row's under reduction none), divided by the count of rows not ignored under mean (0 when there is
  // none, as the loss), and 0 on ignored rows. For a cotangent A of dz (softmax's Jacobian being
  // symmetric):
  //   d z = k s (A - <A, s>),   d ct = <A, s - one_hot(y)> per row, summed (and divided by the count)
  //   under sum and mean; labels take none. 16-bit logits are computed in f32, as the kernels do.
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    const Tensor &labels = in[1], &c = in[2];
    const DType f = ce_loss_dtype(in[0].dtype());
    const Tensor z = in[0].astype(f), A = ct[0].astype(f);
    const Tensor keep = ne(labels, scalar(double(ignore_), labels.dtype(), labels.device()));
    const Tensor kept = keep.astype(f);
    Tensor scale = kept;  // per row: 1 / count under mean, else 1, and 0 on ignored rows
    if (red_ == Reduction::mean) scale = kept / maximum(sum(kept), scalar_like(1.0, kept));
    const Tensor s = softmax(z, -1);
    TensorList r(in.size());
    if (needs[0]) {
      const Tensor k = (c * scale).unsqueeze(-1);  // c is 0-d, or per row under reduction none
      r[0] = (k * s * (A - sum(A * s, {-1}, true))).astype(in[0].dtype());
    }
    if (needs[2]) {
      const Tensor y = one_hot(where(keep, labels, zeros_like(labels)), z.shape().back(), f);
      const Tensor per_row = sum(A * (s - y), {-1}) * scale;
      r[2] = red_ == Reduction::none ? per_row : sum(per_row);
    }
    return r;
  }
};

class CrossEntropy final : public CrossEntropyBase {
 public:
  using CrossEntropyBase::CrossEntropyBase;
  const char* name() const override { return "cross_entropy"; }
  // Under autocast 16-bit logits stay as they are: the loss is f32 anyway (ce_loss_dtype), bitwise that of
  // the f32 copy PyTorch's autocast would make (2 + 4 bytes per logit written and read again, and as much
  // for the gradient's cast back).
  AutocastPolicy autocast_policy() const override { return AutocastPolicy::promote; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    check_ce_inputs(in[0], in[1], name());
    Shape s = red_ == Reduction::none ? in[1].shape() : Shape{};
    return {{s, ce_loss_dtype(in[0].dtype()), in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    if (is_half(in[0].dtype())) return run_in_f32(in, out);
    Tensor logits = dense(in[0]), labels = dense(in[1]);
    const int64_t C = logits.shape().back();
    int64_t count = kc::check_labels(labels, C, ignore_, in[1].shape(), "cross_entropy");
    kc::cross_entropy(logits, labels, ignore_, to_kernel(red_), count, out[0]);
  }
  // The labels are checked on the device (kernels/cuda/kernels.h): a bad one is thrown at the host's next
  // wait for the device, and nothing waits here, so the op can be captured into a CUDA graph.
  void cuda(const TensorList& in, TensorList& out) const override {
    kernels::cuda::cross_entropy(dense(in[0]), dense(in[1]), ignore_, to_kernel(red_), out[0]);
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    TensorList r(2);
    if (needs[0]) r[0] = apply1(std::make_shared<CrossEntropyBackward>(red_, ignore_), {in[0], in[1], ct[0]});
    return r;
  }
};

// cross_entropy and its backward in one node (built by the JIT's fuse_cross_entropy, ops/fused_ops.h).
class CrossEntropyWithGrad final : public CrossEntropyBase {
 public:
  using CrossEntropyBase::CrossEntropyBase;
  const char* name() const override { return "cross_entropy_with_grad"; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    const std::vector<TensorSpec> loss = CrossEntropy(red_, ignore_).infer({in[0], in[1]});
    const std::vector<TensorSpec> grad = CrossEntropyBackward(red_, ignore_).infer(in);
    return {loss[0], grad[0]};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    if (is_half(in[0].dtype())) return run_in_f32(in, out);
    Tensor logits = dense(in[0]), labels = dense(in[1]), ct = dense(in[2]);
    const int64_t count = kc::check_labels(labels, logits.shape().back(), ignore_, in[1].shape(), "cross_entropy");
    kc::cross_entropy_fused(logits, labels, ct, ignore_, to_kernel(red_), count, out[0], out[1]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    kernels::cuda::cross_entropy_fused(dense(in[0]), dense(in[1]), dense(in[2]), ignore_, to_kernel(red_), out[0], out[1]);
  }
  bool differentiable() const override { return false; }
};

// ------------------------------------------------------------------------------------ layer norm

void check_ln_param(const Tensor& x, const Tensor& p, const char* which) {
  const int64_t D = x.shape().back();
  if (p.dim() != 1 || p.shape()[0] != D)
    throw ShapeError(std::string("layer_norm: ") + which + " does not match the normalised axis",
                     "shape [" + std::to_string(D) + "] (x.shape[-1] of x " + x.shape().str() + ")", p.shape().str(),
                     "layer_norm normalises the last axis only; pass parameters of that size");
  if (p.dtype() != x.dtype())
    throw DTypeError(std::string("layer_norm: ") + which + " has a different dtype from x",
                     std::string(dtype_name(x.dtype())), std::string(dtype_name(p.dtype())), "cast it with astype()");
}

// Inputs (dy, x[, w][, residual]); outputs dx, then dw when want_w, then db when want_b. With `residual`
// (only the JIT builds it: layer_norm_backward_residual_op) dx also adds the residual input, the residual
// stream's other gradient.
// Per row of the last axis: the mean, and x's normalisation xh = xc r with xc = x - mean(x) and
// r = (mean(xc^2) + eps)^-1/2, from differentiable ops (the layer norm's jvp and second derivative).
Tensor row_mean(const Tensor& t) { return mean(t, {-1}, true); }
struct RowNorm {
  Tensor xc, r, xh;
};
RowNorm row_norm(const Tensor& x, double eps) {
  const Tensor xc = x - row_mean(x);
  const Tensor r = rsqrt(row_mean(square(xc)) + eps);
  return {xc, r, xc * r};
}

class LayerNormBackward final : public Op {
 public:
  LayerNormBackward(double eps, bool has_w, bool want_w, bool want_b, bool residual = false)
      : eps_(eps), has_w_(has_w), want_w_(want_w), want_b_(want_b), residual_(residual) {}
  const char* name() const override { return "layer_norm_backward"; }
  std::string attrs() const override {
    return "eps=" + attr_num(eps_) + " w=" + std::to_string(has_w_) + " dw=" + std::to_string(want_w_) +
           " db=" + std::to_string(want_b_) + (residual_ ? " residual=1" : "");
  }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    check_dtype(in[1], {DType::f32, DType::f64}, name());
    check_same_dtype(in, name());
    if (in[0].shape() != in[1].shape())
      throw ShapeError("layer_norm_backward: dy and x differ in shape", in[1].shape().str(), in[0].shape().str());
    if (residual_ && in.back().shape() != in[1].shape())
      throw ShapeError("layer_norm_backward: the residual gradient and x differ in shape", in[1].shape().str(),
                       in.back().shape().str());
    if (in[1].dim() < 1) throw ShapeError("layer_norm_backward of a 0-d tensor", "rank >= 1", in[1].shape().str());
    if (has_w_) check_ln_param(in[1], in[2], "w");
    const Device d = in[1].device();
    std::vector<TensorSpec> s{{in[1].shape(), in[1].dtype(), d}};
    Shape p{in[1].shape().back()};
    if (want_w_) s.push_back({p, in[1].dtype(), d});
    if (want_b_) s.push_back({p, in[1].dtype(), d});
    return s;
  }
  void cpu(const TensorList& in, TensorList& out) const override { run(in, out, kc::layer_norm_backward); }
  void cuda(const TensorList& in, TensorList& out) const override { run(in, out, kernels::cuda::layer_norm_backward); }
  // The second derivative of layer_norm, written with differentiable ops (so third and higher orders
  // follow). Per row of D elements, with xc = x - mean(x), r = (mean(xc^2) + eps)^-1/2, xh = xc r and
  // g = dy w (dy without w), this op computes
  //   dx = r (g - mean(g) - xh mean(g xh)) [+ residual],   dw = sum_rows dy xh,   db = sum_rows dy.
  // For cotangents (a, b, c) of (dx, dw, db), the map g -> dx being self-adjoint, with
  // u = r (a~ - xh mean(a xh)), e = b dy, p~ = p - mean(p) and <p, q> the per-row dot product:
  //   d dy = u w + b xh + c,   d w = sum_rows u dy,   d residual = a,
  //   d x  = -r^3 xc <a~, g> / D + 3 r^5 xc <a~, xc> <g, xc> / D^2 - r^3 (<g, xc> a~ + <a~, xc> g~) / D
  //          - r^3 xc <e, xc> / D + r e~
  // (differentiating r and xc in dx and dw: dr/dx = -r^3 xc / D, and centring is the projection p -> p~).
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    const Tensor &dy = in[0], &x = in[1];
    const Tensor w = has_w_ ? in[2] : Tensor();
    const double D = double(x.shape().back());
    auto row_dot = [](const Tensor& p, const Tensor& q) { return sum(p * q, {-1}, true); };
    const auto [xc, r, xh] = row_norm(x, eps_);
    const Tensor g = has_w_ ? dy * w : dy;
    size_t k = 1;
    const Tensor& a = ct[0];
    const Tensor b = want_w_ ? ct[k++] : Tensor(), c = want_b_ ? ct[k++] : Tensor();
    const Tensor ac = a - row_mean(a);
    const Tensor u = r * (ac - xh * row_mean(a * xh));
    TensorList res(in.size());
    if (needs[0]) {
      Tensor d = has_w_ ? u * w : u;
      if (b.defined()) d = d + b * xh;
      if (c.defined()) d = d + c;
      res[0] = d;
    }
    if (needs[1]) {
      const Tensor r3 = r * r * r, A = row_dot(ac, g), B = row_dot(ac, xc), G = row_dot(g, xc);
      Tensor d = r3 * r * r * xc * B * G * (3.0 / (D * D)) - r3 * (xc * A + G * ac + B * (g - row_mean(g))) * (1.0 / D);
      if (b.defined()) {
        const Tensor e = b * dy;
        d = d - r3 * xc * row_dot(e, xc) * (1.0 / D) + r * (e - row_mean(e));
      }
      res[1] = d;
    }
    if (has_w_ && needs[2]) res[2] = sum_to(u * dy, w.shape());
    if (residual_ && needs.back()) res.back() = a;
    return res;
  }
  // vmap: dx from this op without dw / db on the batch (with a per-example w, on dy * w: the kernel's
  // g); dw and db per example, the sums over the example's rows of dy * x^ and of dy, x^ the
  // normalised x (layer_norm without w and b, the same eps).
  std::optional<TensorList> batch(const TensorList& in, const std::vector<bool>& batched, int64_t B) const override {
    const Tensor dy = with_batch(in[0], batched[0], B), x = with_batch(in[1], batched[1], B);
    const bool shared_w = has_w_ && !batched[2];
    TensorList args{dy, x};
    if (has_w_ && !shared_w) {
      Shape ws{B};
      for (int i = 2; i < x.dim(); ++i) ws.push_back(1);
      ws.push_back(x.shape().back());
      args[0] = dy * in[2].reshape(ws);
    }
    if (shared_w) args.push_back(in[2]);
    if (residual_) args.push_back(with_batch(in.back(), batched.back(), B));
    TensorList out{apply1(std::make_shared<LayerNormBackward>(eps_, shared_w, false, false, residual_), args)};
    std::vector<int> rows = example_axes(x);
    rows.pop_back();  // the normalised axis stays
    auto per_example = [&](const Tensor& t) { return rows.empty() ? t : sum(t, rows); };
    if (want_w_) out.push_back(per_example(dy * layer_norm(x, {}, {}, eps_)));
    if (want_b_) out.push_back(per_example(dy));
    return out;
  }
  /// This op with the residual input added (nullptr when it has one already).
  OpPtr with_residual() const {
    return residual_ ? nullptr : std::make_shared<LayerNormBackward>(eps_, has_w_, want_w_, want_b_, true);
  }

 private:
  // The device's kernel on dense operands.
  template <class Kernel>
  void run(const TensorList& in, TensorList& out, Kernel kernel) const {
    Tensor dy = dense(in[0]), x = dense(in[1]);
    Tensor w = has_w_ ? dense(in[2]) : Tensor(), r = residual_ ? dense(in.back()) : Tensor();
    size_t k = 1;
    Tensor* dw = want_w_ ? &out[k++] : nullptr;
    Tensor* db = want_b_ ? &out[k++] : nullptr;
    kernel(dy, x, has_w_ ? &w : nullptr, eps_, out[0], dw, db, residual_ ? &r : nullptr);
  }
  double eps_;
  bool has_w_, want_w_, want_b_, residual_;
};

// Inputs (x[, w][, b]) as flagged.
class LayerNorm final : public Op {
 public:
  LayerNorm(double eps, bool has_w, bool has_b) : eps_(eps), has_w_(has_w), has_b_(has_b) {}
  const char* name() const override { return "layer_norm"; }
  AutocastPolicy autocast_policy() const override { return AutocastPolicy::f32; }
  std::string attrs() const override {
    return "eps=" + attr_num(eps_) + " w=" + std::to_string(has_w_) + " b=" + std::to_string(has_b_);
  }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    check_dtype(in[0], {DType::f32, DType::f64}, name());
    if (in[0].dim() < 1)
      throw ShapeError("layer_norm of a 0-d tensor", "x of shape [..., D]", in[0].shape().str());
    if (has_w_) check_ln_param(in[0], in[1], "w");
    if (has_b_) check_ln_param(in[0], in[has_w_ ? 2 : 1], "b");
    return {{in[0].shape(), in[0].dtype(), in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    Tensor x = dense(in[0]);
    Tensor w = has_w_ ? dense(in[1]) : Tensor(), b = has_b_ ? dense(in[has_w_ ? 2 : 1]) : Tensor();
    kc::layer_norm(x, has_w_ ? &w : nullptr, has_b_ ? &b : nullptr, eps_, out[0]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    Tensor x = dense(in[0]);
    Tensor w = has_w_ ? dense(in[1]) : Tensor(), b = has_b_ ? dense(in[has_w_ ? 2 : 1]) : Tensor();
    kernels::cuda::layer_norm(x, has_w_ ? &w : nullptr, has_b_ ? &b : nullptr, eps_, out[0]);
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    const size_t iw = 1, ib = has_w_ ? 2 : 1;
    const bool want_w = has_w_ && needs[iw], want_b = has_b_ && needs[ib];
    TensorList bin{ct[0], in[0]};
    if (has_w_) bin.push_back(in[iw]);
    TensorList g = titanax::apply(std::make_shared<LayerNormBackward>(eps_, has_w_, want_w, want_b), bin);
    TensorList r(in.size());
    size_t k = 1;
    if (needs[0]) r[0] = g[0];
    if (want_w) r[iw] = g[k++];
    if (want_b) r[ib] = g[k++];
    return r;
  }
  // Forward mode. With xc = x - mean(x), r = (mean(xc^2) + eps)^-1/2 and xh = xc r per row of D, the
  // normalisation's Jacobian r (I - 1 1^T / D - xh xh^T / D) is symmetric, so the tangent of xh is
  // r (t~ - xh mean(xh t)) with t~ = t - mean(t) (the backward's formula with t for dy w), and
  // dy = dxh w + xh tw + tb.
  std::optional<TensorList> jvp(const TensorList& in, const TensorList&, const TensorList& t) const override {
    const Tensor& x = in[0];
    const size_t iw = 1, ib = has_w_ ? 2 : 1;
    const auto [xc, r, xh] = row_norm(x, eps_);
    Tensor d;
    if (t[0].defined()) {
      d = r * (t[0] - row_mean(t[0]) - xh * row_mean(t[0] * xh));
      if (has_w_) d = d * in[iw];
    }
    if (has_w_ && t[iw].defined()) d = d.defined() ? d + xh * t[iw] : xh * t[iw];
    if (has_b_ && t[ib].defined()) d = d.defined() ? d + t[ib] : expand(t[ib], x.shape());
    return TensorList{d};
  }
  // LayerNormalization (opset 17) over the last axis; its Scale input is required: ones without w.
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    const TensorSpec& x = io.in_specs[0];
    if (!has_w_ && io.in_dyn(0, x.shape.rank() - 1)) onnx_batch_dependent("layer_norm", "normalised axis");
    const std::string w = has_w_ ? io.in[1] : b.constant(ones(Shape{x.shape[x.shape.rank() - 1]}, x.dtype));
    std::vector<std::string> args{io.in[0], w};
    if (has_b_) args.push_back(io.in[has_w_ ? 2 : 1]);
    b.node("LayerNormalization", args, io.out, {{"axis", int64_t(-1)}, {"epsilon", eps_}});
    return true;
  }

 private:
  double eps_;
  bool has_w_, has_b_;
};

// ------------------------------------------------------------------------------------ attention

// The lse output's dtype: f64 beside f64 inputs, else f32 (16-bit inputs keep their row statistics in f32).
DType lse_dtype(DType t) { return t == DType::f64 ? DType::f64 : DType::f32; }

// The causal mask of attention, [tq, tk] in dtype t: -inf where key j comes after query i (j > i), else
// 0; added to the scores. Key j is visible to query i iff j <= i, as in the fused kernels.
Tensor causal_mask(int64_t tq, int64_t tk, DType t) {
  std::vector<double> mask(size_t(tq * tk), 0.0);
  for (int64_t i = 0; i < tq; ++i)
    for (int64_t j = i + 1; j < tk; ++j) mask[size_t(i * tk + j)] = -INFINITY;
  return from_vector(mask, Shape{tq, tk}, t);
}

// Attention's ONNX form, composed_attention's math: softmax(scale q k^T + causal mask) v, with q
// [..., Tq, D] of spec `qs`, k and v [..., Tk, D]. Writes o, and the rows' logsumexp in lse_dtype into
// `lse` unless it is empty. 16-bit operands are computed in f32 and o rounded once, as the kernels do.
void attention_onnx(OnnxBuilder& b, std::string q, std::string k, std::string v, const TensorSpec& qs, int64_t tk,
                    bool causal, double scale, const std::string& o, const std::string& lse) {
  const int r = qs.shape.rank();
  const int64_t tq = qs.shape[r - 2];
  const DType t = is_half(qs.dtype) ? DType::f32 : qs.dtype;
  if (t != qs.dtype)
    for (std::string* x : {&q, &k, &v}) *x = b.op("Cast", {*x}, {{"to", int64_t(onnx_dtype(t))}});
  std::vector<int64_t> perm(static_cast<size_t>(r));
  for (int i = 0; i < r; ++i) perm[size_t(i)] = i;
  std::swap(perm[size_t(r - 1)], perm[size_t(r - 2)]);
  std::string s = b.op("Mul", {b.op("MatMul", {q, b.op("Transpose", {k}, {{"perm", perm}})}), b.scalar(scale, t)});
  if (causal) s = b.op("Add", {s, b.constant(causal_mask(tq, tk, t))});
  const std::string y = b.op("MatMul", {b.op("Softmax", {s}, {{"axis", int64_t(-1)}}), v});
  b.node(t != qs.dtype ? "Cast" : "Identity", {y}, {o}, t != qs.dtype ? std::vector<OnnxAttr>{{"to", int64_t(onnx_dtype(qs.dtype))}} : std::vector<OnnxAttr>{});
  if (!lse.empty())
    b.node("ReduceLogSumExp", {s}, {lse}, {{"axes", std::vector<int64_t>{r - 1}}, {"keepdims", int64_t(0)}});
}

// q [..., Tq, D], k [..., Tk, D], v [..., Tk, D] with equal leading axes and Tk, D >= 1.
void check_attention(const Tensor& q, const Tensor& k, const Tensor& v, const char* what) {
  check_dtype(q, {DType::f32, DType::f64, DType::bf16, DType::f16}, what);
  check_same_dtype({q, k, v}, what);
  const std::string got = "q " + q.shape().str() + ", k " + k.shape().str() + ", v " + v.shape().str();
  const char* fix = "pass q [..., Tq, D], k and v [..., Tk, D] with the same leading (batch, head) axes, "
                    "e.g. [B, heads, T, head_dim]";
  if (q.dim() < 2 || k.dim() != q.dim() || v.dim() != q.dim())
    throw ShapeError(std::string(what) + ": q, k, v need one rank >= 2", "q [..., Tq, D], k [..., Tk, D], v [..., Tk, D]",
                     got, fix);
  const int r = q.dim();
  bool ok = k.shape() == v.shape() && q.shape()[r - 1] == k.shape()[r - 1];
  for (int i = 0; i < r - 2; ++i) ok = ok && q.shape()[i] == k.shape()[i];
  if (!ok) throw ShapeError(std::string(what) + ": q, k, v do not match", "q [..., Tq, D], k [..., Tk, D], v [..., Tk, D]", got, fix);
  if (k.shape()[r - 2] < 1 || q.shape()[r - 1] < 1)
    throw ShapeError(std::string(what) + ": no keys or an empty head dimension", "Tk >= 1 and D >= 1", got,
                     "every query needs at least one key to attend to");
}

// What every attention op carries: the causal mask or none, and the scale of the scores.
class AttentionOp : public Op {
 public:
  AttentionOp(bool causal, double scale) : causal_(causal), scale_(scale) {}
  std::string attrs() const override { return "causal=" + std::to_string(causal_) + " scale=" + attr_num(scale_); }

 protected:
  bool causal_;
  double scale_;
};

// The scores scale * q k^T + mask of differentiable ops (PyTorch's math path): q [..., Tq, D], k
// [..., Tk, D]; causal: key j visible to query i iff j <= i, as the fused kernels.
Tensor attention_scores(const Tensor& q, const Tensor& k, bool causal, double scale) {
  Tensor s = matmul(q, transpose(k, -1, -2)) * scale;
  if (causal) s = s + causal_mask(q.shape()[q.dim() - 2], k.shape()[k.dim() - 2], s.dtype()).to(s.device());
  return s;
}

// softmax(attention_scores) v, v [..., Tk, D].
Tensor composed_attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale) {
  return matmul(softmax(attention_scores(q, k, causal, scale), -1), v);
}

// 16-bit operands widened to f32 for the math path (the kernels accumulate in f32); others, and undefined
// tensors, as they are.
Tensor widened(const Tensor& t) { return t.defined() && is_half(t.dtype()) ? t.astype(DType::f32) : t; }

// The vjp of an attention backward op, (dq, dk, dv) = J^T dout with J the Jacobian of o = attention(q,
// k, v): attention recomposed from matmul and softmax (O(Tq x Tk) memory, as PyTorch's math path),
// differentiated once along dout and again along ct = the cotangents of (dq, dk, dv). Returns the
// cotangents of q, k, v (the terms through the saved o and lse included: those inputs get none) and of
// dout. Under create_graph (grad mode on) the recomputation starts from recorded copies, so the result
// can be differentiated once more; 16-bit inputs are recomputed in f32.
TensorList attention_backward_vjp(const TensorList& qkvd, const TensorList& ct, bool need_qkv, bool need_dout, bool causal,
                                  double scale) {
  const bool create_graph = GradMode::enabled();
  GradModeGuard on(true);
  TensorList x(4);
  for (size_t i = 0; i < 4; ++i) {
    const bool need = i < 3 ? need_qkv : need_dout;
    x[i] = create_graph && need ? qkvd[i].clone() : qkvd[i].detach().set_requires_grad();
  }
  BackwardOptions first;
  first.create_graph = true;
  first.stop_at_wrt = true;
  const Tensor o = composed_attention(widened(x[0]), widened(x[1]), widened(x[2]), causal, scale);
  const TensorList g = grad(sum(o * widened(x[3])), {x[0], x[1], x[2]}, first);
  const Tensor inner = sum(g[0] * ct[0]) + sum(g[1] * ct[1]) + sum(g[2] * ct[2]);
  TensorList wrt;
  if (need_qkv) wrt.insert(wrt.end(), {x[0], x[1], x[2]});
  if (need_dout) wrt.push_back(x[3]);
  BackwardOptions second;
  second.create_graph = create_graph;
  second.stop_at_wrt = true;
  const TensorList r = grad(inner, wrt, second);
  TensorList out(4);
  if (need_qkv) out[0] = r[0], out[1] = r[1], out[2] = r[2];
  if (need_dout) out[3] = r.back();
  return out;
}

// Forward mode of attention through the math path (O(Tq x Tk) memory, as the backward's own vjp): with
// the scores s = scale q k^T (+ mask), P = softmax(s) and ds = scale (tq k^T + q tk^T), the tangents are
//   do = (P (ds - rowsum(P ds))) v + P tv,   dlse = rowsum(P ds)
// (products elementwise where both sides are [Tq, Tk]; masked scores have P = 0). q, k, v [..., T, D];
// undefined tangents are zero; 16-bit operands are computed in f32 and do rounded to q's dtype.
TensorList attention_jvp(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& tq, const Tensor& tk,
                         const Tensor& tv, bool causal, double scale) {
  const Tensor q3 = widened(q), k3 = widened(k), v3 = widened(v);
  const Tensor p = softmax(attention_scores(q3, k3, causal, scale), -1);
  Tensor ds;
  if (tq.defined()) ds = matmul(widened(tq), transpose(k3, -1, -2)) * scale;
  if (tk.defined()) {
    const Tensor d = matmul(q3, transpose(widened(tk), -1, -2)) * scale;
    ds = ds.defined() ? ds + d : d;
  }
  Tensor dout, dlse;
  if (ds.defined()) {
    const Tensor pds = p * ds;
    dlse = sum(pds, {-1});
    dout = matmul(pds - p * dlse.unsqueeze(-1), v3);
  }
  if (tv.defined()) dout = dout.defined() ? dout + matmul(p, widened(tv)) : matmul(p, widened(tv));
  if (dout.defined() && dout.dtype() != q.dtype()) dout = dout.astype(q.dtype());
  if (dlse.defined() && dlse.dtype() != lse_dtype(q.dtype())) dlse = dlse.astype(lse_dtype(q.dtype()));
  return {dout, dlse};
}

// Inputs (q, k, v, o, lse, dout); outputs dq, dk, dv.
class AttentionBackward final : public AttentionOp {
 public:
  using AttentionOp::AttentionOp;
  const char* name() const override { return "scaled_dot_product_attention_backward"; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    check_attention(in[0], in[1], in[2], name());
    check_same_dtype({in[0], in[3], in[5]}, name());
    const Device d = in[0].device();
    return {{in[0].shape(), in[0].dtype(), d}, {in[1].shape(), in[1].dtype(), d}, {in[2].shape(), in[2].dtype(), d}};
  }
  // f16 / bf16: in f32 and rounded (the CUDA kernels take 16-bit operands natively).
  void cpu(const TensorList& in, TensorList& out) const override {
    if (is_half(in[0].dtype())) return run_in_f32(in, out);
    kc::attention_backward(dense(in[0]), dense(in[1]), dense(in[2]), dense(in[3]), dense(in[4]), dense(in[5]), causal_,
                           scale_, out[0], out[1], out[2]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    kernels::cuda::attention_backward(in[0], in[1], in[2], in[3], dense(in[4]), in[5], causal_, scale_, out[0], out[1],
                                      out[2]);  // q, k, v, o and dout strided as attention_rows allows
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    const bool need_qkv = needs[0] || needs[1] || needs[2];
    if (!need_qkv && !needs[5]) return TensorList(6);
    const TensorList g = attention_backward_vjp({in[0], in[1], in[2], in[5]}, ct, need_qkv, needs[5], causal_, scale_);
    TensorList r(6);
    for (size_t i = 0; i < 3; ++i)
      if (needs[i]) r[i] = g[i];
    r[5] = g[3];
    return r;
  }
};

// Inputs (q, k, v); outputs o and the row logsumexp (saved for the backward).
class Attention final : public AttentionOp {
 public:
  using AttentionOp::AttentionOp;
  const char* name() const override { return "scaled_dot_product_attention"; }
  AutocastPolicy autocast_policy() const override { return AutocastPolicy::lower; }  // as torch.autocast
  // The CUDA kernels read q, k, v cut from one qkv projection and permuted to [B, heads, T, D] in place
  // (kernels::cuda::attention_rows); the CPU's copy them, and so once, on the tape.
  bool contiguous_input(const Tensor& t) const override {
    return !t.device().is_cuda() || !kernels::cuda::attention_rows(t).has_value();
  }
  bool saves_outputs() const override { return true; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    check_attention(in[0], in[1], in[2], name());
    Shape rows = in[0].shape();
    rows.resize(rows.rank() - 1);
    const Device d = in[0].device();
    return {{in[0].shape(), in[0].dtype(), d}, {rows, lse_dtype(in[0].dtype()), d}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    if (is_half(in[0].dtype())) return run_in_f32(in, out);
    kc::attention_forward(dense(in[0]), dense(in[1]), dense(in[2]), causal_, scale_, out[0], out[1]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    kernels::cuda::attention_forward(in[0], in[1], in[2], causal_, scale_, out[0], out[1]);  // strided: attention_rows
  }
  TensorList vjp(const TensorList& in, const TensorList& out, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    if (!needs[0] && !needs[1] && !needs[2]) return TensorList(3);
    // The lse output is internal (scaled_dot_product_attention returns o only): its cotangent is zero.
    return apply(std::make_shared<AttentionBackward>(causal_, scale_), {in[0], in[1], in[2], out[0], out[1], ct[0]});
  }
  std::optional<TensorList> jvp(const TensorList& in, const TensorList&, const TensorList& t) const override {
    return attention_jvp(in[0], in[1], in[2], t[0], t[1], t[2], causal_, scale_);
  }
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    const Shape& ks = io.in_specs[1].shape;
    if (causal_ && (io.in_dyn(0, ks.rank() - 2) || io.in_dyn(1, ks.rank() - 2)))
      onnx_batch_dependent("scaled_dot_product_attention", "causal mask (sequence axes)");
    attention_onnx(b, io.in[0], io.in[1], io.in[2], io.in_specs[0], ks[ks.rank() - 2], causal_, scale_, io.out[0], io.out[1]);
    return true;
  }
};

// ---------------------------------------------------------------------- attention on a packed qkv
//
// FlashAttention's qkv-packed layout (flash_attn_qkvpacked_func): qkv [*lead, T, 3, H, D] as a projection
// writes it, o [*lead, T, H, D] as the next projection reads it. The kernels read and write every operand
// by strides (kernels::cuda::attention_rows), so on a GPU the packed op needs no copy on either side: no
// permute of o back to [B, T, C] after the forward, no concat of dq, dk, dv before the projection's
// backward. The CPU's kernels take contiguous [N, H, T, D] operands: copies there.

// The packed tensor's sizes: N (the leading axes' product), T, H, D.
struct PackedDims {
  int64_t N, T, H, D;
};

// qkv [*lead, T, 3, H, D] with T, D >= 1, a floating dtype the attention kernels take.
PackedDims packed_dims(const Tensor& qkv, const char* what) {
  check_dtype(qkv, {DType::f32, DType::f64, DType::bf16, DType::f16}, what);
  const Shape& s = qkv.shape();
  const int r = s.rank();
  if (r < 4 || s[r - 3] != 3 || s[r - 4] < 1 || s[r - 1] < 1)
    throw ShapeError(std::string(what) + ": qkv must be [..., T, 3, heads, head_dim] with T, head_dim >= 1",
                     "qkv [..., T, 3, H, D] (FlashAttention's packed layout)", "qkv " + s.str(),
                     "reshape the qkv projection [B, T, 3 * H * D] to [B, T, 3, H, D]");
  int64_t n = 1;
  for (int i = 0; i < r - 4; ++i) n *= s[i];
  return {n, s[r - 4], s[r - 2], s[r - 1]};
}

// o's shape [*lead, T, H, D] for a packed [*lead, T, 3, H, D].
Shape packed_out_shape(const Shape& qkv) {
  Shape o = qkv;
  o.erase(o.rank() - 3);
  return o;
}

// Part j (0 q, 1 k, 2 v) of a contiguous packed qkv as an [N, H, T, D] view.
Tensor packed_part(const Tensor& qkv, const PackedDims& d, int j) {
  return make_view(qkv, Shape{d.N, d.H, d.T, d.D}, Shape{d.T * 3 * d.H * d.D, d.D, 3 * d.H * d.D, 1},
                   qkv.offset() + j * d.H * d.D);
}

// A contiguous [*lead, T, H, D] tensor (o, its cotangent) as an [N, H, T, D] view.
Tensor heads_view(const Tensor& t, const PackedDims& d) {
  return make_view(t, Shape{d.N, d.H, d.T, d.D}, Shape{d.T * d.H * d.D, d.D, d.H * d.D, 1}, t.offset());
}

// Inputs (qkv, o, lse, dout); output dqkv, packed as qkv.
class AttentionPackedBackward final : public AttentionOp {
 public:
  using AttentionOp::AttentionOp;
  const char* name() const override { return "scaled_dot_product_attention_qkvpacked_backward"; }
  bool contiguous_input(const Tensor&) const override { return true; }  // the views below assume it
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    packed_dims(in[0], name());
    check_same_dtype({in[0], in[1], in[3]}, name());
    const Shape o = packed_out_shape(in[0].shape());
    if (in[1].shape() != o || in[3].shape() != o)
      throw ShapeError(std::string(name()) + ": o and its cotangent must be qkv's [..., T, H, D]", o.str(),
                       "o " + in[1].shape().str() + ", dout " + in[3].shape().str(), "pass the forward's o");
    return {{in[0].shape(), in[0].dtype(), in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    if (is_half(in[0].dtype())) return run_in_f32(in, out);
    const PackedDims d = packed_dims(in[0], name());
    Tensor grads[3];
    for (Tensor& g : grads) g = empty(Shape{d.N, d.H, d.T, d.D}, in[0].dtype());
    kc::attention_backward(dense(packed_part(in[0], d, 0)), dense(packed_part(in[0], d, 1)),
                           dense(packed_part(in[0], d, 2)), dense(heads_view(in[1], d)), in[2],
                           dense(heads_view(in[3], d)), causal_, scale_, grads[0], grads[1], grads[2]);
    for (int j = 0; j < 3; ++j) {
      Tensor part = packed_part(out[0], d, j);
      kc::copy_cast(grads[j], part);
    }
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    const PackedDims d = packed_dims(in[0], name());
    Tensor dq = packed_part(out[0], d, 0), dk = packed_part(out[0], d, 1), dv = packed_part(out[0], d, 2);
    kernels::cuda::attention_backward(packed_part(in[0], d, 0), packed_part(in[0], d, 1), packed_part(in[0], d, 2),
                                      heads_view(in[1], d), in[2], heads_view(in[3], d), causal_, scale_, dq, dk, dv);
  }
  // As the unpacked backward's: q, k, v and dout viewed as [..., H, T, D] by (recorded) ops.
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    if (!needs[0] && !needs[3]) return TensorList(4);
    auto heads = [](const Tensor& t) { return transpose(t, -3, -2); };  // [..., T, H, D] -> [..., H, T, D]
    const TensorList parts = unbind(in[0], -3), cts = unbind(ct[0], -3);
    const TensorList g = attention_backward_vjp({heads(parts[0]), heads(parts[1]), heads(parts[2]), heads(in[3])},
                                                {heads(cts[0]), heads(cts[1]), heads(cts[2])}, needs[0], needs[3], causal_,
                                                scale_);
    TensorList r(4);
    if (needs[0]) r[0] = concat({heads(g[0]).unsqueeze(-3), heads(g[1]).unsqueeze(-3), heads(g[2]).unsqueeze(-3)}, -3);
    if (needs[3]) r[3] = heads(g[3]);
    return r;
  }
};

// Input qkv [*lead, T, 3, H, D]; outputs o [*lead, T, H, D] and the row logsumexp [*lead, H, T] (saved for
// the backward).
class AttentionPacked final : public AttentionOp {
 public:
  using AttentionOp::AttentionOp;
  const char* name() const override { return "scaled_dot_product_attention_qkvpacked"; }
  AutocastPolicy autocast_policy() const override { return AutocastPolicy::lower; }  // as the unpacked op
  bool contiguous_input(const Tensor&) const override { return true; }  // the views below assume it
  bool saves_outputs() const override { return true; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    packed_dims(in[0], name());
    const Shape& s = in[0].shape();
    const int r = s.rank();
    Shape rows(s.begin(), s.begin() + (r - 4));  // [*lead, H, T]
    rows.push_back(s[r - 2]);
    rows.push_back(s[r - 4]);
    const Device dev = in[0].device();
    return {{packed_out_shape(s), in[0].dtype(), dev}, {rows, lse_dtype(in[0].dtype()), dev}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    if (is_half(in[0].dtype())) return run_in_f32(in, out);
    const PackedDims d = packed_dims(in[0], name());
    Tensor o = empty(Shape{d.N, d.H, d.T, d.D}, in[0].dtype());
    kc::attention_forward(dense(packed_part(in[0], d, 0)), dense(packed_part(in[0], d, 1)), dense(packed_part(in[0], d, 2)),
                          causal_, scale_, o, out[1]);
    Tensor dst = heads_view(out[0], d);
    kc::copy_cast(o, dst);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    const PackedDims d = packed_dims(in[0], name());
    Tensor o = heads_view(out[0], d);
    kernels::cuda::attention_forward(packed_part(in[0], d, 0), packed_part(in[0], d, 1), packed_part(in[0], d, 2), causal_,
                                     scale_, o, out[1]);
  }
  TensorList vjp(const TensorList& in, const TensorList& out, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    if (!needs[0]) return TensorList(1);
    // The lse output is internal (the public function returns o only): its cotangent is zero.
    return apply(std::make_shared<AttentionPackedBackward>(causal_, scale_), {in[0], out[0], out[1], ct[0]});
  }  // attention_jvp on the [..., H, T, D] parts of qkv and of its tangent; do back to [..., T, H, D].
  std::optional<TensorList> jvp(const TensorList& in, const TensorList&, const TensorList& t) const override {
    auto heads = [](const Tensor& x) { return transpose(x, -3, -2); };  // [..., T, H, D] <-> [..., H, T, D]
    const TensorList p = unbind(in[0], -3), tp = unbind(t[0], -3);
    TensorList r = attention_jvp(heads(p[0]), heads(p[1]), heads(p[2]), heads(tp[0]), heads(tp[1]), heads(tp[2]), causal_, scale_);
    r[0] = heads(r[0]);
    return r;
  }

  // qkv [*lead, T, 3, H, D] split into q, k, v [*lead, H, T, D]; o [*lead, H, T, D] permuted back to
  // [*lead, T, H, D] (the same swap of the H and T axes).
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    const Shape& s = io.in_specs[0].shape;
    const int r = s.rank();
    if (causal_ && io.in_dyn(0, r - 4)) onnx_batch_dependent("scaled_dot_product_attention_qkvpacked", "causal mask (sequence axis)");
    std::vector<int64_t> perm;
    for (int i = 0; i < r - 4; ++i) perm.push_back(i);
    for (int64_t a : {r - 3, r - 4, r - 2}) perm.push_back(a);
    const std::vector<std::string> parts{b.fresh(), b.fresh(), b.fresh()};
    b.node("Split", {io.in[0], b.ints({1, 1, 1})}, parts, {{"axis", int64_t(r - 3)}});
    std::vector<std::string> qkv;
    for (const std::string& p : parts)
      qkv.push_back(b.op("Transpose", {b.op("Squeeze", {p, b.ints({r - 3})})}, {{"perm", perm}}));
    Shape heads(s.begin(), s.begin() + (r - 4));
    for (int64_t d : {s[r - 2], s[r - 4], s[r - 1]}) heads.push_back(d);
    const std::string o = b.fresh();
    attention_onnx(b, qkv[0], qkv[1], qkv[2], {heads, io.in_specs[0].dtype}, s[r - 4], causal_, scale_, o, io.out[1]);
    b.node("Transpose", {o}, {io.out[0]}, {{"perm", perm}});
    return true;
  }
};

// ------------------------------------------------------------------------------------ dropout

// Inputs (x) or, stepped, (x, step): the mask's key is then fold_in(key, step) with step (a 0-d i64 on
// the CPU) read when the op runs, so a replayed graph draws a new mask whenever the step tensor moves.
class Dropout final : public Op {
 public:
  Dropout(double p, RngKey key, bool stepped) : p_(p), key_(key), stepped_(stepped) {}
  const char* name() const override { return "dropout"; }
  bool linear() const override { return true; }  // in x: the mask is a function of the key (and step)
  std::string attrs() const override {
    return "p=" + attr_num(p_) + " key=" + key_.str() + (stepped_ ? " stepped=1" : "");
  }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    check_dtype(in[0], {DType::f32, DType::f64, DType::bf16, DType::f16}, name());
    return {{in[0].shape(), in[0].dtype(), in[0].device()}};
  }
  bool host_input(size_t i) const override { return i == 1; }
  // f16 / bf16: the same mask (by element index) over the widened values, rounded (run_in_f32 on the
  // CPU; natively on CUDA).
  void cpu(const TensorList& in, TensorList& out) const override {
    if (is_half(in[0].dtype())) return run_in_f32(in, out);
    kc::dropout(dense(in[0]), p_, key(in), out[0]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    kernels::cuda::dropout(in[0].contiguous(), p_, key(in), out[0]);
  }
  // vmap: a loop over the examples draws the same mask for each (by element index within the
  // example): the mask of one example's shape (this op on ones: 1 / (1 - p) where kept, 0 where
  // dropped), then x * it where kept and 0 where dropped, as the kernel (x * (1 / (1 - p)), or 0). A
  // 16-bit x is scaled in f32 and rounded once by the kernel: that case, and a per-example step, loop.
  std::optional<TensorList> batch(const TensorList& in, const std::vector<bool>& batched, int64_t B) const override {
    const Tensor& x = in[0];
    if (!batched[0] || (stepped_ && batched[1]) || is_half(x.dtype())) return std::nullopt;
    const Shape& s = x.shape();
    TensorList args{ones(Shape(s.begin() + 1, s.end()), x.dtype(), x.device())};
    if (stepped_) args.push_back(in[1]);
    const Tensor m = apply1(std::make_shared<Dropout>(p_, key_, stepped_), args);
    const Tensor zero = scalar_like(0.0, m);
    return TensorList{where(ne(m, zero), x * m, zero)};
  }
  // Linear in x: the cotangent goes through the same mask (recomputed from the key, never stored).
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    TensorList r(in.size());
    if (!needs[0]) return r;
    const TensorList args = stepped_ ? TensorList{ct[0], in[1]} : TensorList{ct[0]};
    r[0] = apply1(std::make_shared<Dropout>(p_, key_, stepped_), args);
    return r;
  }
  bool to_onnx(OnnxBuilder&, const OnnxNodeIO&) const override {
    throw ValueError("dropout in a function exported to ONNX (an inference graph)", "no dropout op in the traced function",
                     "dropout p=" + attr_num(p_), "call eval() on the model before exporting: eval mode skips dropout");
  }

 private:
  RngKey key(const TensorList& in) const {
    return stepped_ ? fold_in(key_, uint64_t(in[1].data<int64_t>()[0])) : key_;
  }
  double p_;
  RngKey key_;
  bool stepped_;
};

// ------------------------------------------------------------------------------------ take / embedding

// x viewed as [A, n, B] around `axis`.
void split_at(const Shape& s, int axis, int64_t& A, int64_t& n, int64_t& B) {
  A = 1, B = 1;
  for (int i = 0; i < axis; ++i) A *= s[i];
  n = s[axis];
  for (int i = axis + 1; i < s.rank(); ++i) B *= s[i];
}

Shape gathered_shape(const Shape& x, const Shape& idx, int axis) {
  Shape o;
  for (int i = 0; i < axis; ++i) o.push_back(x[i]);
  for (int64_t d : idx) o.push_back(d);
  for (int i = axis + 1; i < x.rank(); ++i) o.push_back(x[i]);
  if (o.rank() > kMaxRank) throw ShapeError("take: result has too many axes", "rank <= 8", std::to_string(o.rank()));
  return o;
}

// Gathers along `axis` (take) or rows of a [V, D] table (embedding: axis 0, extra checks).
class Gather final : public Op {
 public:
  Gather(int axis, bool embedding) : axis_(axis), embedding_(embedding) {}
  const char* name() const override { return embedding_ ? "embedding" : "take"; }
  bool linear() const override { return true; }  // in the table, the indices held fixed
  std::string attrs() const override { return "axis=" + std::to_string(axis_); }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    const Tensor &x = in[0], &idx = in[1];
    check_dtype(x, {DType::f32, DType::f64}, name());
    check_dtype(idx, {DType::i32, DType::i64}, embedding_ ? "embedding (ids)" : "take (indices)");
    if (embedding_ && x.dim() != 2)
      throw ShapeError("embedding: the table must be 2-D", "weight [V, D]", x.shape().str());
    if (x.dim() == 0) throw ShapeError("take from a 0-d tensor", "a tensor with at least one axis", x.shape().str());
    int a = normalize_axis(axis_, x.dim());
    return {{gathered_shape(x.shape(), idx.shape(), a), x.dtype(), x.device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    Tensor x = dense(in[0]), idx = dense(in[1]);
    int64_t A, n, B;
    split_at(x.shape(), normalize_axis(axis_, x.dim()), A, n, B);
    kc::check_indices(idx, n, in[1].shape(), name());
    kc::gather(x, idx, A, n, B, out[0]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    Tensor x = dense(in[0]), idx = dense(in[1]);
    int64_t A, n, B;
    split_at(x.shape(), normalize_axis(axis_, x.dim()), A, n, B);
    kernels::cuda::gather(x, idx, A, n, B, embedding_, out[0]);  // indices checked on the device
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override;
  std::optional<TensorList> batch(const TensorList& in, const std::vector<bool>& batched, int64_t B) const override;
  // ONNX's Gather also wraps negative indices, where this op throws.
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    b.node("Gather", io.in, io.out, {{"axis", int64_t(normalize_axis(axis_, io.in_specs[0].shape.rank()))}});
    return true;
  }

 private:
  int axis_;
  bool embedding_;
};

// vmap's batched indices idx [B, per-example...] into an axis of size n, as rows of the B copies of that
// axis stacked into one of B * n: idx + b * n (i64). They first pass through a gather from the rows
// 0 .. n - 1 (f64, exact), which checks them as the op's own kernel does (on a GPU without waiting for
// it), so an index out of range is the op's error, not a row of another example.
Tensor stacked_rows(const Tensor& idx, int64_t n, int64_t B, bool embedding) {
  const Tensor rows = arange(0, n, 1, DType::f64).reshape(Shape{n, 1}).to(idx.device());
  const Tensor checked = apply1(std::make_shared<Gather>(0, embedding), {rows, idx}).reshape(idx.shape());
  Shape per_example{B};
  for (int i = 1; i < idx.dim(); ++i) per_example.push_back(1);
  return checked.astype(DType::i64) + arange(0, B * n, n).reshape(per_example).to(idx.device());
}

// The adjoint of Gather: scatter-adds g [.., idx.shape, ..] into zeros of `shape` (deterministic).
class ScatterAdd final : public Op {
 public:
  ScatterAdd(int axis, Shape shape, bool embedding) : axis_(axis), shape_(shape), embedding_(embedding) {}
  const char* name() const override { return embedding_ ? "embedding_backward" : "take_backward"; }
  bool linear() const override { return true; }  // in the gradient, the indices held fixed
  std::string attrs() const override { return "axis=" + std::to_string(axis_) + " shape=" + shape_.str(); }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    const Tensor &g = in[0], &idx = in[1];
    check_dtype(g, {DType::f32, DType::f64}, name());
    check_dtype(idx, {DType::i32, DType::i64}, name());
    Shape want = gathered_shape(shape_, idx.shape(), axis_);
    if (g.shape() != want)
      throw ShapeError(std::string(name()) + ": gradient does not match the gathered shape", want.str(), g.shape().str());
    return {{shape_, g.dtype(), g.device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    Tensor g = dense(in[0]), idx = dense(in[1]);
    int64_t A, n, B;
    split_at(shape_, axis_, A, n, B);
    kc::check_indices(idx, n, in[1].shape(), name());
    kc::scatter_add(g, idx, A, n, B, out[0]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    Tensor g = dense(in[0]), idx = dense(in[1]);
    int64_t A, n, B;
    split_at(shape_, axis_, A, n, B);
    kernels::cuda::scatter_add(g, idx, A, n, B, embedding_, out[0]);  // indices checked on the device
  }
  // vmap. Shared indices: this op one axis further in, on the batch. Batched ones: the example's copy
  // of the scattered axis moved next to the batch axis, both flattened into one of B * n rows, and the
  // example's indices offset into its own rows (stacked_rows); each row then sums its example's
  // gradients in the loop's order.
  std::optional<TensorList> batch(const TensorList& in, const std::vector<bool>& batched, int64_t B) const override {
    const Tensor g = with_batch(in[0], batched[0], B);
    Shape out{B};
    for (int64_t d : shape_) out.push_back(d);
    if (!batched[1]) return TensorList{apply1(std::make_shared<ScatterAdd>(axis_ + 1, out, embedding_), {g, in[1]})};
    const int k = in[1].dim() - 1;  // the indices' per-example rank
    const int64_t n = shape_[axis_];
    Shape rows_shape{B * n};
    for (int i = 0; i < shape_.rank(); ++i)
      if (i != axis_) rows_shape.push_back(shape_[i]);
    // g [B, pre..., idx..., post...] -> [B, idx..., pre..., post...] -> [B * |idx|, pre..., post...],
    // in the order of the rows' indices
    const Tensor gm = move_axes(g, 1 + axis_, k, 1);
    Shape flat{in[1].numel()};
    for (int i = 1 + k; i < gm.dim(); ++i) flat.push_back(gm.shape()[i]);
    const Tensor gr = gm.reshape(flat);
    const Tensor rows = stacked_rows(in[1], n, B, embedding_).reshape(Shape{in[1].numel()});
    Tensor r = apply1(std::make_shared<ScatterAdd>(0, rows_shape, embedding_), {gr, rows});
    Shape split{B, n};
    for (int i = 1; i < rows_shape.rank(); ++i) split.push_back(rows_shape[i]);
    return TensorList{move_axes(r.reshape(split), 1, 1, 1 + axis_)};
  }
  // Linear in g: the adjoint of a scatter-add is the gather.
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    TensorList r(2);
    if (needs[0]) r[0] = apply1(std::make_shared<Gather>(axis_, embedding_), {ct[0], in[1]});
    return r;
  }

 private:
  int axis_;  // normalised
  Shape shape_;
  bool embedding_;
};

// vmap. A batched x: this op one axis further in. Batched indices into a shared x: the gather with them,
// the batch then moved to the front (embedding's ids lead its result already). Both batched: the
// example's copy of the gathered axis moved next to the batch axis, both flattened into one of B * n
// rows, and the example's indices offset into its own rows (stacked_rows).
std::optional<TensorList> Gather::batch(const TensorList& in, const std::vector<bool>& batched, int64_t B) const {
  const Tensor &x = in[0], &idx = in[1];
  const int a = normalize_axis(axis_, x.dim() - (batched[0] ? 1 : 0));
  if (!batched[1]) return TensorList{take(x, idx, a + 1)};
  if (!batched[0]) return TensorList{move_axes(apply1(std::make_shared<Gather>(axis_, embedding_), {x, idx}), a, 1, 0)};
  const int64_t n = x.shape()[a + 1];
  Shape rows_shape{B * n};
  for (int i = 1; i < x.dim(); ++i)
    if (i != a + 1) rows_shape.push_back(x.shape()[i]);
  const Tensor xr = move_axes(x, a + 1, 1, 1).reshape(rows_shape);
  const Tensor y = apply1(std::make_shared<Gather>(0, embedding_), {xr, stacked_rows(idx, n, B, embedding_)});
  return TensorList{move_axes(y, 1, idx.dim() - 1, 1 + a)};  // [B, idx..., pre..., post...] -> [B, pre..., idx..., post...]
}

TensorList Gather::vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                       const std::vector<bool>& needs) const {
  TensorList r(2);
  if (needs[0])
    r[0] = apply1(std::make_shared<ScatterAdd>(normalize_axis(axis_, in[0].dim()), in[0].shape(), embedding_),
                  {ct[0], in[1]});
  return r;
}

}  // namespace

Tensor softmax(const Tensor& x, int axis) { return apply1(std::make_shared<Softmax>(axis, false), {x}); }
Tensor log_softmax(const Tensor& x, int axis) { return apply1(std::make_shared<Softmax>(axis, true), {x}); }

OpPtr layer_norm_backward_residual_op(const Op& bwd) {
  const auto* b = dynamic_cast<const LayerNormBackward*>(&bwd);
  return b ? b->with_residual() : nullptr;
}

OpPtr fused_cross_entropy_op(const Op& fwd, const Op& bwd) {
  const auto* f = dynamic_cast<const CrossEntropy*>(&fwd);
  const auto* b = dynamic_cast<const CrossEntropyBackward*>(&bwd);
  if (!f || !b || f->reduction() != b->reduction() || f->ignore_index() != b->ignore_index()) return nullptr;
  return std::make_shared<CrossEntropyWithGrad>(f->reduction(), f->ignore_index());
}

Tensor cross_entropy(const Tensor& logits, const Tensor& labels, Reduction reduction, int64_t ignore_index) {
  return apply1(std::make_shared<CrossEntropy>(reduction, ignore_index), {logits, labels});
}

Tensor layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps) {
  if (!(eps >= 0)) throw ValueError("layer_norm: eps must be >= 0", ">= 0 (typically 1e-5)", std::to_string(eps));
  TensorList in;
  in.reserve(3);  // (also keeps GCC 12's -Warray-bounds from a false positive on the growth of {x})
  in.push_back(x);
  if (w.defined()) in.push_back(w);
  if (b.defined()) in.push_back(b);
  return apply1(std::make_shared<LayerNorm>(eps, w.defined(), b.defined()), in);
}

namespace {
// The scores' scale: `scale`, else 1 / sqrt(D) with D the size of t's last axis; ValueError unless finite.
double attention_scale(const Tensor& t, std::optional<double> scale, const char* what) {
  const double sc = scale ? *scale : 1.0 / std::sqrt(double(t.dim() >= 1 ? std::max<int64_t>(t.shape().back(), 1) : 1));
  if (!std::isfinite(sc))
    throw ValueError(std::string(what) + ": scale must be finite", "a finite scale (default 1 / sqrt(D))", std::to_string(sc));
  return sc;
}
}  // namespace

Tensor scaled_dot_product_attention(const Tensor& q, const Tensor& k, const Tensor& v, bool is_causal,
                                    std::optional<double> scale) {
  // Shapes and dtypes are checked by the op (after autocast has cast its inputs).
  const double sc = attention_scale(q, scale, "scaled_dot_product_attention");
  return apply(std::make_shared<Attention>(is_causal, sc), {q, k, v})[0];
}

Tensor scaled_dot_product_attention_qkvpacked(const Tensor& qkv, bool is_causal, std::optional<double> scale) {
  const double sc = attention_scale(qkv, scale, "scaled_dot_product_attention_qkvpacked");
  return apply(std::make_shared<AttentionPacked>(is_causal, sc), {qkv})[0];
}

namespace {
void check_dropout(const Tensor& x, double p) {
  if (!(p >= 0 && p < 1))
    throw ValueError("dropout: p must be in [0, 1)", "0 <= p < 1", "p = " + std::to_string(p),
                     "p is the probability of zeroing an element; use training = false to disable dropout");
  check_dtype(x, {DType::f32, DType::f64, DType::bf16, DType::f16}, "dropout");
}
}  // namespace

Tensor dropout(const Tensor& x, double p, RngKey key, bool training) {
  check_dropout(x, p);
  if (!training || p == 0) return x;
  return apply1(std::make_shared<Dropout>(p, key, false), {x});
}

Tensor dropout(const Tensor& x, double p, RngKey key, const Tensor& step, bool training) {
  if (!step.defined() || step.dim() != 0 || step.dtype() != DType::i64 || !step.device().is_cpu())
    throw ValueError("dropout: step must be a 0-d i64 tensor on the CPU",
                     "shape [], i64, cpu (e.g. the optimizer's step counter)",
                     step.defined() ? step.shape().str() + ", " + std::string(dtype_name(step.dtype())) + ", " + step.device().str()
                                    : "an undefined tensor");
  check_dropout(x, p);
  if (!training || p == 0) return x;
  return apply1(std::make_shared<Dropout>(p, key, true), {x, step});
}

Tensor embedding(const Tensor& weight, const Tensor& ids) {
  return apply1(std::make_shared<Gather>(0, true), {weight, ids});
}

Tensor take(const Tensor& x, const Tensor& idx, int axis) {
  return apply1(std::make_shared<Gather>(axis, false), {x, idx});
}

}  // namespace titanax
