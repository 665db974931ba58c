// conv2d and max_pool2d, with their backward ops (conv2d_backward_input, conv2d_backward_weight,
// max_pool2d_backward). CPU kernels in kernels/cpu/conv.h (oneDNN for f32, direct loops for f64); CUDA
// kernels in kernels/cuda/kernels.h (cuDNN convolutions, our own max-pooling kernels). The max-pool
// workspace (which element won each window) has a per-device layout: its size comes from the backend.
//
// The convolution backward ops are linear in each input, so their own vjps are convolutions again:
// conv2d is differentiable to any order. max_pool2d_backward is linear in dy; its vjp gathers the
// cotangent at the winners max_pool2d_indices finds, so max_pool2d is differentiable to any order too.
#include "core/onnx_builder.h"
#include "kernels/cpu/conv.h"
#include "kernels/cuda/kernels.h"
#include "ops/ops.h"

namespace titanax {
namespace {

namespace kc = kernels::cpu;
using Pair = std::array<int64_t, 2>;

Tensor dense(const Tensor& t) { return t.is_contiguous() ? t : t.detach().contiguous(); }
std::string pair_str(Pair p) {
  std::string s = std::to_string(p[0]);  // (built by appending: GCC 12 warns falsely on "(" + string)
  s.insert(s.begin(), '(');
  s.append(", ").append(std::to_string(p[1])).append(")");
  return s;
}

void check_rank4(const Tensor& t, const char* op, const char* what, const char* layout, const char* fix) {
  if (t.dim() != 4)
    throw ShapeError(std::string(op) + ": " + what + " must be 4-D", layout, t.shape().str(), fix);
}

void check_window(const char* op, Pair stride, Pair padding) {
  if (stride[0] <= 0 || stride[1] <= 0)
    throw ShapeError(std::string(op) + ": stride must be positive", "stride >= 1 on both axes", pair_str(stride));
  if (padding[0] < 0 || padding[1] < 0)
    throw ShapeError(std::string(op) + ": padding must be non-negative", "padding >= 0 on both axes", pair_str(padding));
}

// Each spatial axis of x (H, W) padded must hold the kernel.
void check_fits(const char* op, const Tensor& x, Pair kernel, Pair padding) {
  for (int a = 0; a < 2; ++a) {
    const int64_t in = x.shape()[2 + a], padded = in + 2 * padding[size_t(a)];
    if (padded < kernel[size_t(a)])
      throw ShapeError(std::string(op) + ": kernel larger than the padded input",
                       std::string("kernel ") + (a ? "width" : "height") + " <= " + (a ? "W" : "H") + " + 2 * padding = " +
                           std::to_string(padded),
                       "kernel " + pair_str(kernel) + " over input " + x.shape().str() + " with padding " + pair_str(padding),
                       "use a smaller kernel, more padding, or a larger input");
  }
}

kc::Conv2dGeom conv_geom(const Shape& x, const Shape& w, Pair stride, Pair padding) {
  return {x[0], x[1], x[2], x[3], w[0], w[2], w[3], stride[0], stride[1], padding[0], padding[1]};
}

// vmap's im2col (Chellapilla et al. 2006): the patches of x [B, N, C, H, W] under a kh x kw window with
// this stride and padding, [B, N*OH*OW, C*kh*kw] (rows in (n, oy, ox) order, columns in w's (c, i, j)
// order), from the kh * kw strided slices of the padded x, one per kernel offset.
Tensor batched_patches(const Tensor& x, Pair khw, Pair stride, Pair padding, int64_t OH, int64_t OW) {
  Tensor xp = x;
  for (size_t a = 0; a < 2; ++a)
    if (padding[a] > 0) xp = pad(xp, int(3 + a), padding[a], padding[a]);
  TensorList patches;  // each [B, N, OH, OW, C, 1]
  for (int64_t i = 0; i < khw[0]; ++i)
    for (int64_t j = 0; j < khw[1]; ++j) {
      const Tensor p = xp.slice(3, i, i + stride[0] * (OH - 1) + 1, stride[0]).slice(4, j, j + stride[1] * (OW - 1) + 1, stride[1]);
      patches.push_back(p.permute({0, 1, 3, 4, 2}).unsqueeze(-1));
    }
  const Shape& s = x.shape();
  return concat(patches, -1).reshape(Shape{s[0], s[1] * OH * OW, s[2] * khw[0] * khw[1]});
}

// t's axis `a` (n elements) spread over an axis of `size`: element k at offset + k * step, zeros elsewhere
// (col2im's placement of one kernel offset's contributions; the last lands inside: offset + (n - 1) * step
// < size).
Tensor place(const Tensor& t, int a, int64_t offset, int64_t step, int64_t size) {
  Tensor r = t;
  if (step > 1) {  // each element followed by step - 1 zeros: [..., n, step, ...] merged into n * step
    Shape z = t.shape();
    z.insert(a + 1, step - 1);
    r = concat({t.unsqueeze(a + 1), zeros(z, t.dtype(), t.device())}, a + 1);
    Shape merged = t.shape();
    merged[a] *= step;
    r = r.reshape(merged);
  }
  const int64_t after = size - offset - r.shape()[a];
  r = pad(r, a, offset, std::max<int64_t>(after, 0));
  return after < 0 ? r.slice(a, 0, size) : r;  // what is cut is the trailing zeros
}

// ------------------------------------------------------------------------------------ conv2d

Tensor conv_backward_input(const Tensor& dy, const Tensor& w, Pair hw, Pair stride, Pair padding);
TensorList conv_backward_weight(const Tensor& dy, const Tensor& x, Pair khw, Pair stride, Pair padding, bool bias);

class Conv2d final : public Op {
 public:
  Conv2d(Pair stride, Pair padding, bool bias) : stride_(stride), padding_(padding), bias_(bias) {}
  const char* name() const override { return "conv2d"; }
  std::string attrs() const override {
    return "stride=" + pair_str(stride_) + " padding=" + pair_str(padding_) + " bias=" + std::to_string(bias_);
  }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    const Tensor &x = in[0], &w = in[1];
    check_dtype(x, {DType::f32, DType::f64}, "conv2d");
    check_same_dtype(in, "conv2d");
    check_rank4(x, "conv2d", "x", "x [N, C, H, W]", "add a batch axis with unsqueeze(0)");
    check_rank4(w, "conv2d", "w", "w [O, C, kh, kw]", "w is [out_channels, in_channels, kernel_h, kernel_w]");
    check_window("conv2d", stride_, padding_);
    if (x.shape()[1] != w.shape()[1])
      throw ShapeError("conv2d: input channels of x and w differ",
                       "x.shape[1] == w.shape[1] (w is [O, C, kh, kw])",
                       "x " + x.shape().str() + " has " + std::to_string(x.shape()[1]) + " channels, w " + w.shape().str() +
                           " expects " + std::to_string(w.shape()[1]),
                       "check the previous layer's output channels, or the layout (NCHW, not NHWC)");
    check_fits("conv2d", x, {w.shape()[2], w.shape()[3]}, padding_);
    if (bias_ && (in[2].dim() != 1 || in[2].shape()[0] != w.shape()[0]))
      throw ShapeError("conv2d: bias does not match the output channels", "b of shape [" + std::to_string(w.shape()[0]) + "]",
                       in[2].shape().str());
    kc::Conv2dGeom g = conv_geom(x.shape(), w.shape(), stride_, padding_);
    return {{Shape{g.N, g.O, g.OH(), g.OW()}, x.dtype(), x.device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    Tensor x = dense(in[0]), w = dense(in[1]), b = bias_ ? dense(in[2]) : Tensor();
    kc::conv2d_forward(x, w, bias_ ? &b : nullptr, conv_geom(x.shape(), w.shape(), stride_, padding_), out[0]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    Tensor x = dense(in[0]), w = dense(in[1]), b = bias_ ? dense(in[2]) : Tensor();
    kernels::cuda::conv2d_forward(x, w, bias_ ? &b : nullptr, conv_geom(x.shape(), w.shape(), stride_, padding_), out[0]);
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    const Tensor &x = in[0], &w = in[1], &g = ct[0];
    TensorList r(in.size());
    if (needs[0]) r[0] = conv_backward_input(g, w, {x.shape()[2], x.shape()[3]}, stride_, padding_);
    const bool want_b = bias_ && needs[2];
    if (needs[1]) {
      TensorList gw = conv_backward_weight(g, x, {w.shape()[2], w.shape()[3]}, stride_, padding_, want_b);
      r[1] = gw[0];
      if (want_b) r[2] = gw[1];
    } else if (want_b) {
      r[2] = sum(g, {0, 2, 3});
    }
    return r;
  }
  // Forward mode: bilinear in (x, w) and linear in b, so conv2d(tx, w) + conv2d(x, tw) + tb at every pixel.
  std::optional<TensorList> jvp(const TensorList& in, const TensorList& out, const TensorList& t) const override {
    Tensor d;
    auto add_term = [&](const Tensor& e) { d = d.defined() ? d + e : e; };
    if (t[0].defined()) add_term(conv2d(t[0], in[1], {}, stride_, padding_));
    if (t[1].defined()) add_term(conv2d(in[0], t[1], {}, stride_, padding_));
    if (bias_ && t[2].defined()) {
      const Tensor tb = t[2].reshape(Shape{1, t[2].shape()[0], 1, 1});
      d = d.defined() ? d + tb : expand(tb, out[0].shape());
    }
    return TensorList{d};
  }
  // vmap. A shared w: the batch folded into N, one convolution of B * N images (a per-example b added
  // after it). A per-example w (an ensemble of models): each example's patches times its own w, one
  // batched GEMM [B, N*OH*OW, C*kh*kw] @ [B, C*kh*kw, O] (batched_patches), then its b.
  std::optional<TensorList> batch(const TensorList& in, const std::vector<bool>& batched, int64_t B) const override {
    const Tensor x = with_batch(in[0], batched[0], B);  // [B, N, C, H, W]
    const Shape& xs = x.shape();
    if (!batched[1]) {  // a per-example b is added after the convolution
      const bool inner_b = bias_ && !batched[2];
      TensorList args{x.reshape(Shape{B * xs[1], xs[2], xs[3], xs[4]}), in[1]};
      if (inner_b) args.push_back(in[2]);
      const Tensor y = apply1(std::make_shared<Conv2d>(stride_, padding_, inner_b), args);
      const Shape& ys = y.shape();
      Tensor r = y.reshape(Shape{B, xs[1], ys[1], ys[2], ys[3]});
      if (bias_ && !inner_b) r = r + in[2].reshape(Shape{B, 1, ys[1], 1, 1});
      return TensorList{r};
    }
    const Tensor w = with_batch(in[1], batched[1], B);  // [B, O, C, kh, kw]
    const Shape& ws = w.shape();
    const kc::Conv2dGeom g = conv_geom(Shape(xs.begin() + 1, xs.end()), Shape(ws.begin() + 1, ws.end()), stride_, padding_);
    const Tensor cols = batched_patches(x, {ws[3], ws[4]}, stride_, padding_, g.OH(), g.OW());
    Tensor y = matmul(cols, transpose(w.reshape(Shape{B, ws[1], ws[2] * ws[3] * ws[4]}), -1, -2));  // [B, N*OH*OW, O]
    y = y.reshape(Shape{B, xs[1], g.OH(), g.OW(), ws[1]}).permute({0, 1, 4, 2, 3});
    if (bias_) y = y + with_batch(in[2], batched[2], B).reshape(Shape{B, 1, ws[1], 1, 1});
    return TensorList{y};
  }

 private:
  Pair stride_, padding_;
  bool bias_;
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    const Shape& w = io.in_specs[1].shape;
    b.node("Conv", io.in, io.out,
           {{"kernel_shape", std::vector<int64_t>{w[2], w[3]}},
            {"strides", std::vector<int64_t>{stride_[0], stride_[1]}},
            {"pads", std::vector<int64_t>{padding_[0], padding_[1], padding_[0], padding_[1]}}});
    return true;
  }
};

// Inputs (dy [N, O, OH, OW], w [O, C, kh, kw]) -> dx [N, C, H, W].
class Conv2dBackwardInput final : public Op {
 public:
  Conv2dBackwardInput(Pair hw, Pair stride, Pair padding) : hw_(hw), stride_(stride), padding_(padding) {}
  const char* name() const override { return "conv2d_backward_input"; }
  std::string attrs() const override {
    return "input_hw=" + pair_str(hw_) + " stride=" + pair_str(stride_) + " padding=" + pair_str(padding_);
  }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    const Tensor &dy = in[0], &w = in[1];
    check_dtype(dy, {DType::f32, DType::f64}, name());
    check_same_dtype(in, name());
    check_rank4(dy, name(), "dy", "dy [N, O, OH, OW]", "");
    check_rank4(w, name(), "w", "w [O, C, kh, kw]", "");
    check_window(name(), stride_, padding_);
    Shape xs{dy.shape()[0], w.shape()[1], hw_[0], hw_[1]};
    kc::Conv2dGeom g = conv_geom(xs, w.shape(), stride_, padding_);
    Shape want{g.N, g.O, g.OH(), g.OW()};
    if (hw_[0] + 2 * padding_[0] < g.KH || hw_[1] + 2 * padding_[1] < g.KW || dy.shape() != want)
      throw ShapeError("conv2d_backward_input: dy does not match the convolution", want.str(), dy.shape().str());
    return {{xs, dy.dtype(), dy.device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    Tensor dy = dense(in[0]), w = dense(in[1]);
    kc::conv2d_backward_input(dy, w, conv_geom(out[0].shape(), w.shape(), stride_, padding_), out[0]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    Tensor dy = dense(in[0]), w = dense(in[1]);
    kernels::cuda::conv2d_backward_input(dy, w, conv_geom(out[0].shape(), w.shape(), stride_, padding_), out[0]);
  }
  // vmap. A shared w: the batch folded into N. A per-example w (an ensemble of models): the columns
  // dy^T w per example, one batched GEMM [B, N*OH*OW, O] @ [B, O, C*kh*kw], then col2im, the adjoint of
  // batched_patches: each kernel offset's columns added back where its slice of the padded x was read
  // (spread by the stride, shifted by the offset), the padding cut off.
  std::optional<TensorList> batch(const TensorList& in, const std::vector<bool>& batched, int64_t B) const override {
    const Tensor dy = with_batch(in[0], batched[0], B);  // [B, N, O, OH, OW]
    const Shape& ds = dy.shape();
    const OpPtr same = std::make_shared<Conv2dBackwardInput>(hw_, stride_, padding_);
    if (!batched[1]) {
      const Tensor dx = apply1(same, {dy.reshape(Shape{B * ds[1], ds[2], ds[3], ds[4]}), in[1]});
      const Shape& xs = dx.shape();
      return TensorList{dx.reshape(Shape{B, ds[1], xs[1], xs[2], xs[3]})};
    }
    const Shape& ws = in[1].shape();  // [B, O, C, kh, kw]
    const int64_t N = ds[1], OH = ds[3], OW = ds[4], C = ws[2], KH = ws[3], KW = ws[4];
    const Tensor cols = matmul(dy.permute({0, 1, 3, 4, 2}).reshape(Shape{B, N * OH * OW, ds[2]}), in[1].reshape(Shape{B, ws[1], C * KH * KW}))
                            .reshape(Shape{B, N, OH, OW, C, KH, KW});
    const int64_t HP = hw_[0] + 2 * padding_[0], WP = hw_[1] + 2 * padding_[1];
    Tensor dxp;
    for (int64_t i = 0; i < KH; ++i)
      for (int64_t j = 0; j < KW; ++j) {
        const Tensor part = cols.slice(5, i, i + 1).slice(6, j, j + 1).reshape(Shape{B, N, OH, OW, C}).permute({0, 1, 4, 2, 3});
        const Tensor placed = place(place(part, 3, i, stride_[0], HP), 4, j, stride_[1], WP);
        dxp = dxp.defined() ? dxp + placed : placed;
      }
    return TensorList{dxp.slice(3, padding_[0], padding_[0] + hw_[0]).slice(4, padding_[1], padding_[1] + hw_[1])};
  }
  // dx is bilinear in (dy, w): <G, dx> = <dy, conv2d(G, w)> = <w, conv2d_backward_weight(dy, G)>.
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    const Tensor &dy = in[0], &w = in[1], &G = ct[0];
    TensorList r(2);
    if (needs[0]) r[0] = conv2d(G, w, {}, stride_, padding_);
    if (needs[1]) r[1] = conv_backward_weight(dy, G, {w.shape()[2], w.shape()[3]}, stride_, padding_, false)[0];
    return r;
  }

 private:
  Pair hw_, stride_, padding_;
};

// Inputs (dy [N, O, OH, OW], x [N, C, H, W]) -> dw [O, C, kh, kw] (and db [O] when bias).
class Conv2dBackwardWeight final : public Op {
 public:
  Conv2dBackwardWeight(Pair khw, Pair stride, Pair padding, bool bias)
      : khw_(khw), stride_(stride), padding_(padding), bias_(bias) {}
  const char* name() const override { return "conv2d_backward_weight"; }
  std::string attrs() const override {
    return "kernel=" + pair_str(khw_) + " stride=" + pair_str(stride_) + " padding=" + pair_str(padding_) +
           " bias=" + std::to_string(bias_);
  }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    const Tensor &dy = in[0], &x = in[1];
    check_dtype(dy, {DType::f32, DType::f64}, name());
    check_same_dtype(in, name());
    check_rank4(dy, name(), "dy", "dy [N, O, OH, OW]", "");
    check_rank4(x, name(), "x", "x [N, C, H, W]", "");
    check_window(name(), stride_, padding_);
    check_fits(name(), x, khw_, padding_);
    Shape ws{dy.shape()[1], x.shape()[1], khw_[0], khw_[1]};
    kc::Conv2dGeom g = conv_geom(x.shape(), ws, stride_, padding_);
    Shape want{g.N, g.O, g.OH(), g.OW()};
    if (dy.shape() != want)
      throw ShapeError("conv2d_backward_weight: dy does not match the convolution", want.str(), dy.shape().str());
    std::vector<TensorSpec> s{{ws, dy.dtype(), dy.device()}};
    if (bias_) s.push_back({Shape{g.O}, dy.dtype(), dy.device()});
    return s;
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    Tensor dy = dense(in[0]), x = dense(in[1]);
    kc::conv2d_backward_weight(dy, x, conv_geom(x.shape(), out[0].shape(), stride_, padding_), out[0],
                               bias_ ? &out[1] : nullptr);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    Tensor dy = dense(in[0]), x = dense(in[1]);
    kernels::cuda::conv2d_backward_weight(dy, x, conv_geom(x.shape(), out[0].shape(), stride_, padding_), out[0],
                                          bias_ ? &out[1] : nullptr);
  }
  // (dw, db) is bilinear in (dy, x): <Gw, dw> + <Gb, db> = <dy, conv2d(x, Gw, Gb)> = <x, conv2d_backward_input(dy, Gw)>.
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    const Tensor &dy = in[0], &x = in[1];
    TensorList r(2);
    if (needs[0]) r[0] = conv2d(x, ct[0], bias_ ? ct[1] : Tensor(), stride_, padding_);
    if (needs[1]) r[1] = conv_backward_input(dy, ct[0], {x.shape()[2], x.shape()[3]}, stride_, padding_);
    return r;
  }
  // vmap. Per example, dw[o, c, i, j] sums dy[n, o, y, x] xpad[n, c, y * sh + i, x * sw + j] over the
  // example's images and output positions: the im2col form of the weight gradient, one batched GEMM
  // [B, O, N*OH*OW] @ [B, N*OH*OW, C*kh*kw] of dy with the patches (batched_patches); db sums the
  // example's dy over N, OH, OW.
  std::optional<TensorList> batch(const TensorList& in, const std::vector<bool>& batched, int64_t B) const override {
    const Tensor dy = with_batch(in[0], batched[0], B), x = with_batch(in[1], batched[1], B);  // [B, N, O | C, ...]
    const int64_t N = x.shape()[1], O = dy.shape()[2], OH = dy.shape()[3], OW = dy.shape()[4];
    const Tensor cols = batched_patches(x, khw_, stride_, padding_, OH, OW);
    const Tensor dyr = dy.permute({0, 2, 1, 3, 4}).reshape(Shape{B, O, N * OH * OW});
    const Tensor dw = matmul(dyr, cols).reshape(Shape{B, O, x.shape()[2], khw_[0], khw_[1]});
    return bias_ ? TensorList{dw, sum(dy, {1, 3, 4})} : TensorList{dw};
  }

 private:
  Pair khw_, stride_, padding_;
  bool bias_;
};

Tensor conv_backward_input(const Tensor& dy, const Tensor& w, Pair hw, Pair stride, Pair padding) {
  return apply1(std::make_shared<Conv2dBackwardInput>(hw, stride, padding), {dy, w});
}
TensorList conv_backward_weight(const Tensor& dy, const Tensor& x, Pair khw, Pair stride, Pair padding, bool bias) {
  return titanax::apply(std::make_shared<Conv2dBackwardWeight>(khw, stride, padding, bias), {dy, x});
}

// ------------------------------------------------------------------------------------ max_pool2d

kc::Pool2dGeom pool_geom(const Shape& x, Pair k, Pair s, Pair p) {
  return {x[0], x[1], x[2], x[3], k[0], k[1], s[0], s[1], p[0], p[1]};
}

// Bytes of max_pool2d's workspace on `device` (the CPU and CUDA kernels record the winners differently).
int64_t pool_workspace_bytes(const kc::Pool2dGeom& g, DType dtype, Device device) {
  return device.is_cuda() ? kernels::cuda::max_pool2d_workspace_bytes(g) : kc::max_pool2d_workspace_bytes(g, dtype);
}

void check_pool(const char* op, const Tensor& x, Pair kernel, Pair stride, Pair padding) {
  check_rank4(x, op, "x", "x [N, C, H, W]", "add a batch axis with unsqueeze(0)");
  if (kernel[0] <= 0 || kernel[1] <= 0)
    throw ShapeError(std::string(op) + ": kernel must be positive", "kernel >= 1 on both axes", pair_str(kernel));
  check_window(op, stride, padding);
  if (2 * padding[0] > kernel[0] || 2 * padding[1] > kernel[1])
    throw ShapeError(std::string(op) + ": padding larger than half the kernel", "padding <= kernel / 2",
                     "padding " + pair_str(padding) + " with kernel " + pair_str(kernel),
                     "windows made mostly of padding have no maximum; reduce the padding");
  check_fits(op, x, kernel, padding);
}

// The stride of a pooling: 0 on an axis means the kernel's size there.
Pair pool_stride(Pair kernel, Pair stride) {
  for (size_t a = 0; a < 2; ++a)
    if (stride[a] == 0) stride[a] = kernel[a];
  return stride;
}

// What the max-pooling forward ops share: the window and its checks.
class PoolOp : public Op {
 public:
  PoolOp(Pair kernel, Pair stride, Pair padding) : kernel_(kernel), stride_(stride), padding_(padding) {}
  std::string attrs() const override {
    return "kernel=" + pair_str(kernel_) + " stride=" + pair_str(stride_) + " padding=" + pair_str(padding_);
  }

 protected:
  // x checked (f32 / f64, [N, C, H, W], the window fits), and the geometry of pooling it.
  kc::Pool2dGeom checked_geom(const Tensor& x) const {
    check_dtype(x, {DType::f32, DType::f64}, name());
    check_pool(name(), x, kernel_, stride_, padding_);
    return geom(x);
  }
  kc::Pool2dGeom geom(const Tensor& x) const { return pool_geom(x.shape(), kernel_, stride_, padding_); }
  Pair kernel_, stride_, padding_;
};

// The winners' plane offsets as max_pool2d_indices gives them: i64 [N, C, OH, OW].
class MaxPool2dIndices final : public PoolOp {
 public:
  using PoolOp::PoolOp;
  const char* name() const override { return "max_pool2d_indices"; }
  bool differentiable() const override { return false; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    const kc::Pool2dGeom g = checked_geom(in[0]);
    return {{Shape{g.N, g.C, g.OH(), g.OW()}, DType::i64, in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    Tensor x = dense(in[0]);
    kc::max_pool2d_indices(x, geom(x), out[0]);
  }
  // vmap: the batch folded into N (plane offsets do not depend on the image).
  std::optional<TensorList> batch(const TensorList& in, const std::vector<bool>&, int64_t B) const override {
    const Shape& s = in[0].shape();  // [B, N, C, H, W]
    const Tensor idx = apply1(std::make_shared<MaxPool2dIndices>(kernel_, stride_, padding_), {in[0].reshape(Shape{B * s[1], s[2], s[3], s[4]})});
    const Shape& r = idx.shape();
    return TensorList{idx.reshape(Shape{B, s[1], r[1], r[2], r[3]})};
  }
  // The CUDA forward records the same winners as int32 plane offsets: run it and widen them.
  void cuda(const TensorList& in, TensorList& out) const override {
    Tensor x = dense(in[0]);
    if (out[0].numel() == 0) return;
    Tensor y = empty(out[0].shape(), x.dtype(), x.device()), ws = empty(out[0].shape(), DType::i32, x.device());
    kernels::cuda::max_pool2d_forward(x, geom(x), y, ws);
    kernels::cuda::copy_cast(ws, out[0]);
  }
};

// Inputs (dy [N, C, OH, OW], ws u8, x [N, C, H, W]) -> dx [N, C, H, W]. x is not read: it is there for
// the vjp, which gathers the cotangent at the winners max_pool2d_indices(x) finds again.
class MaxPool2dBackward final : public Op {
 public:
  explicit MaxPool2dBackward(kc::Pool2dGeom g) : g_(g) {}
  const char* name() const override { return "max_pool2d_backward"; }
  std::string attrs() const override {
    return "input=" + Shape{g_.N, g_.C, g_.H, g_.W}.str() + " kernel=" + pair_str({g_.KH, g_.KW}) +
           " stride=" + pair_str({g_.SH, g_.SW}) + " padding=" + pair_str({g_.PH, g_.PW});
  }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    const Tensor &dy = in[0], &ws = in[1];
    check_dtype(dy, {DType::f32, DType::f64}, name());
    check_dtype(ws, {DType::u8}, "max_pool2d_backward (workspace)");
    Shape want{g_.N, g_.C, g_.OH(), g_.OW()};
    if (dy.shape() != want)
      throw ShapeError("max_pool2d_backward: dy does not match the pooling", want.str(), dy.shape().str());
    const int64_t bytes = pool_workspace_bytes(g_, dy.dtype(), dy.device());
    if (ws.numel() != bytes)
      throw ShapeError("max_pool2d_backward: workspace from a different pooling", std::to_string(bytes) + " bytes",
                       std::to_string(ws.numel()) + " bytes", "pass the workspace the matching max_pool2d produced");
    return {{Shape{g_.N, g_.C, g_.H, g_.W}, dy.dtype(), dy.device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    kc::max_pool2d_backward(dense(in[0]), dense(in[1]), g_, out[0]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    kernels::cuda::max_pool2d_backward(dense(in[0]), dense(in[1]), g_, out[0]);
  }
  // vmap: the batch folded into N, as for the forward (MaxPool2d::batch).
  std::optional<TensorList> batch(const TensorList& in, const std::vector<bool>& batched, int64_t B) const override {
    const Tensor dy = with_batch(in[0], batched[0], B), ws = with_batch(in[1], batched[1], B), x = with_batch(in[2], batched[2], B);
    kc::Pool2dGeom g = g_;
    g.N *= B;
    const int64_t bytes = pool_workspace_bytes(g, dy.dtype(), dy.device());
    if (bytes != B * pool_workspace_bytes(g_, dy.dtype(), dy.device())) return std::nullopt;
    const Tensor dx = apply1(std::make_shared<MaxPool2dBackward>(g), {dy.reshape(Shape{g.N, g.C, g.OH(), g.OW()}), ws.reshape(Shape{bytes}),
                                                                    x.reshape(Shape{g.N, g.C, g.H, g.W})});
    return TensorList{dx.reshape(Shape{B, g_.N, g_.C, g_.H, g_.W})};
  }
  // dx is linear in dy (dx = J^T dy with J max_pool2d's 0/1 Jacobian), so its vjp with respect to dy is
  // J ct: the cotangent read at each window's winner. With respect to x it is zero: the winners are
  // piecewise constant in x.
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    TensorList r(3);
    if (!needs[0]) return r;
    const Tensor idx = max_pool2d_indices(in[2], {g_.KH, g_.KW}, {g_.SH, g_.SW}, {g_.PH, g_.PW});
    const int64_t plane = g_.H * g_.W;
    const Tensor base = arange(0, g_.N * g_.C * plane, plane).reshape(Shape{g_.N, g_.C, 1, 1}).to(idx.device());
    r[0] = take(ct[0].reshape(Shape{-1}), (idx + base).reshape(Shape{-1}), 0).reshape(idx.shape());
    return r;
  }

 private:
  kc::Pool2dGeom g_;
};

// Outputs y [N, C, OH, OW] and a hidden u8 workspace (which element won each window), saved for the vjp.
class MaxPool2d final : public PoolOp {
 public:
  using PoolOp::PoolOp;
  const char* name() const override { return "max_pool2d"; }
  bool saves_outputs() const override { return true; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    const Tensor& x = in[0];
    const kc::Pool2dGeom g = checked_geom(x);
    return {{Shape{g.N, g.C, g.OH(), g.OW()}, x.dtype(), x.device()},
            {Shape{pool_workspace_bytes(g, x.dtype(), x.device())}, DType::u8, x.device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    Tensor x = dense(in[0]);
    kc::max_pool2d_forward(x, geom(x), out[0], out[1]);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    Tensor x = dense(in[0]);
    kernels::cuda::max_pool2d_forward(x, geom(x), out[0], out[1]);
  }
  TensorList vjp(const TensorList& in, const TensorList& out, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    return {apply1(std::make_shared<MaxPool2dBackward>(geom(in[0])), {ct[0], out[1], in[0]})};
  }
  // vmap: the batch folded into N ([B, N, C, H, W] pooled as B * N images). The workspace holds each
  // window's winner per output element, in N order, so that of the B * N images is the B examples'
  // workspaces one after another; its size is checked (B times one example's), else the op loops.
  std::optional<TensorList> batch(const TensorList& in, const std::vector<bool>&, int64_t B) const override {
    const Shape& s = in[0].shape();  // [B, N, C, H, W]
    const Shape per_example{s[1], s[2], s[3], s[4]}, folded{B * s[1], s[2], s[3], s[4]};
    const int64_t bytes = pool_workspace_bytes(pool_geom(per_example, kernel_, stride_, padding_), in[0].dtype(), in[0].device());
    if (pool_workspace_bytes(pool_geom(folded, kernel_, stride_, padding_), in[0].dtype(), in[0].device()) != B * bytes)
      return std::nullopt;
    const TensorList r = titanax::apply(std::make_shared<MaxPool2d>(kernel_, stride_, padding_), {in[0].reshape(folded)});
    const Shape& y = r[0].shape();
    return TensorList{r[0].reshape(Shape{B, s[1], y[1], y[2], y[3]}), r[1].reshape(Shape{B, bytes})};
  }
  // y only: the workspace has no ONNX meaning (it feeds the backward, which an inference graph lacks).
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    if (!io.out[1].empty()) return false;
    const kc::Pool2dGeom g = pool_geom(io.in_specs[0].shape, kernel_, stride_, padding_);
    b.node("MaxPool", io.in, {io.out[0]},
           {{"kernel_shape", std::vector<int64_t>{g.KH, g.KW}}, {"strides", std::vector<int64_t>{g.SH, g.SW}},
            {"pads", std::vector<int64_t>{g.PH, g.PW, g.PH, g.PW}}});
    return true;
  }
};

}  // namespace

Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor& b, std::array<int64_t, 2> stride,
              std::array<int64_t, 2> padding) {
  if (b.defined()) return apply1(std::make_shared<Conv2d>(stride, padding, true), {x, w, b});
  return apply1(std::make_shared<Conv2d>(stride, padding, false), {x, w});
}

Tensor max_pool2d(const Tensor& x, std::array<int64_t, 2> kernel, std::array<int64_t, 2> stride,
                  std::array<int64_t, 2> padding) {
  return titanax::apply(std::make_shared<MaxPool2d>(kernel, pool_stride(kernel, stride), padding), {x})[0];
}

Tensor max_pool2d_indices(const Tensor& x, std::array<int64_t, 2> kernel, std::array<int64_t, 2> stride,
                          std::array<int64_t, 2> padding) {
  return apply1(std::make_shared<MaxPool2dIndices>(kernel, pool_stride(kernel, stride), padding), {x});
}

}  // namespace titanax
