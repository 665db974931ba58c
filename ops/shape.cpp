// Views and layout ops: reshape, permute, expand, slice (views); copy, concat, pad, astype, to(device),
// one_hot (copies). Also the Tensor methods that wrap them.
#include "core/onnx_builder.h"
#include <algorithm>
#include <numeric>

#include "core/cuda_runtime.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/loops.h"
#include "kernels/cuda/kernels.h"
#include "ops/ops.h"

namespace titanax {
namespace {

/// Base for ops whose output aliases the input's storage.
class ViewOp : public Op {
 public:
  void cpu(const TensorList&, TensorList&) const override {}
  bool custom_forward() const override { return true; }
  bool capturable() const override { return true; }  // no device work: a view of its input's memory
  bool linear() const override { return true; }
  TensorList forward(const TensorList& in) const override { return {view(in[0])}; }
  virtual Tensor view(const Tensor& x) const = 0;
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    Tensor v = view(in[0]);
    return {{v.shape(), v.dtype(), v.device()}};
  }
};

Shape resolve_shape(const Shape& want, int64_t numel, const Shape& from) {
  Shape s = want;
  int infer_at = -1;
  int64_t known = 1;
  for (int i = 0; i < s.rank(); ++i) {
    if (s[i] == -1) {
      if (infer_at >= 0) throw ShapeError("reshape with two -1 dimensions", "at most one -1", want.str());
      infer_at = i;
    } else if (s[i] < 0) {
      throw ShapeError("reshape to a negative dimension", "sizes >= 0 or one -1", want.str());
    } else {
      known *= s[i];
    }
  }
  if (infer_at >= 0) {
    if (known == 0 || numel % known != 0)
      throw ShapeError("reshape cannot infer the -1 dimension", "a size dividing " + std::to_string(numel),
                       from.str() + " -> " + want.str());
    s[infer_at] = numel / known;
  }
  if (s.numel() != numel)
    throw ShapeError("reshape changes the number of elements", std::to_string(numel) + " elements (from " + from.str() + ")",
                     std::to_string(s.numel()) + " elements (" + want.str() + ")");
  return s;
}

class Copy final : public Op {
 public:
  const char* name() const override { return "copy"; }
  bool linear() const override { return true; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    return {{in[0].shape(), in[0].dtype(), in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override { kernels::cpu::copy_cast(in[0], out[0]); }
  void cuda(const TensorList& in, TensorList& out) const override { kernels::cuda::copy_cast(in[0], out[0]); }
  TensorList vjp(const TensorList&, const TensorList&, const TensorList& ct, const std::vector<bool>&) const override {
    return {ct[0]};
  }
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    b.node("Identity", io.in, io.out);
    return true;
  }
};

class Reshape final : public ViewOp {
 public:
  explicit Reshape(Shape s) : s_(s) {}
  const char* name() const override { return "reshape"; }
  std::string attrs() const override { return "shape=" + s_.str(); }
  Tensor view(const Tensor& x) const override {
    Shape s = resolve_shape(s_, x.numel(), x.shape());
    return make_view(x, s, s.contiguous_strides(), x.offset());  // forward() guarantees x is contiguous
  }
  TensorList forward(const TensorList& in) const override {
    Tensor x = in[0].is_contiguous() ? in[0] : apply1(std::make_shared<Copy>(), {in[0].detach()});
    return {view(x)};
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>&) const override {
    return {reshape(ct[0], in[0].shape())};
  }
  // The resolved shape; with a dynamic batch its one batch-dependent axis as -1 (ONNX infers it).
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    const Shape& o = io.out_specs[0].shape;
    std::vector<int64_t> shape(o.begin(), o.end());
    int dynamic = 0;
    for (int i = 0; i < o.rank(); ++i)
      if (io.out_dyn(0, i)) {
        shape[size_t(i)] = -1;
        if (++dynamic > 1) onnx_batch_dependent("reshape", "target shape " + o.str() + " (two axes)");
      }
    b.node("Reshape", {io.in[0], b.ints(shape)}, io.out);
    return true;
  }

 private:
  Shape s_;
};

class Permute final : public ViewOp {
 public:
  explicit Permute(std::vector<int> axes) : axes_(std::move(axes)) {}
  const char* name() const override { return "permute"; }
  std::string attrs() const override {
    std::string a = "axes=[";
    for (size_t i = 0; i < axes_.size(); ++i) a += (i ? "," : "") + std::to_string(axes_[i]);
    return a + "]";
  }
  Tensor view(const Tensor& x) const override {
    if (int(axes_.size()) != x.dim())
      throw ShapeError("permute needs one axis per dimension", std::to_string(x.dim()) + " axes",
                       std::to_string(axes_.size()) + " axes for " + x.shape().str());
    Shape s, st;
    std::vector<bool> seen(size_t(x.dim()), false);
    for (int a : axes_) {
      int n = normalize_axis(a, x.dim());
      if (seen[size_t(n)]) throw ShapeError("permute repeats an axis", "a permutation of the axes", std::to_string(a) + " twice");
      seen[size_t(n)] = true;
      s.push_back(x.shape()[n]);
      st.push_back(x.strides()[n]);
    }
    return make_view(x, s, st, x.offset());
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>&) const override {
    std::vector<int> inv(axes_.size());
    for (size_t i = 0; i < axes_.size(); ++i) inv[size_t(normalize_axis(axes_[i], in[0].dim()))] = int(i);
    return {permute(ct[0], inv)};
  }
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    std::vector<int64_t> perm;
    for (int a : axes_) perm.push_back(normalize_axis(a, io.in_specs[0].shape.rank()));
    b.node("Transpose", io.in, io.out, {{"perm", perm}});
    return true;
  }

 private:
  std::vector<int> axes_;
};

class Expand final : public ViewOp {
 public:
  explicit Expand(Shape s) : s_(s) {}
  const char* name() const override { return "expand"; }
  std::string attrs() const override { return "shape=" + s_.str(); }
  Tensor view(const Tensor& x) const override {
    Shape target = broadcast_shapes(x.shape(), s_);
    if (target != s_)
      throw ShapeError("expand to a shape the tensor does not broadcast to", s_.str(), x.shape().str());
    return make_view(x, s_, kernels::cpu::broadcast_strides(x, s_), x.offset());
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>&) const override {
    return {sum_to(ct[0], in[0].shape())};
  }
  // With a dynamic batch, a batch-dependent target axis is 1 where x has that axis already (Expand
  // broadcasts both ways); expanding a size-1 axis to the batch would need the batch size itself.
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    std::vector<int64_t> shape(s_.begin(), s_.end());
    const int lead = s_.rank() - io.in_specs[0].shape.rank();
    for (int i = 0; i < s_.rank(); ++i) {
      if (!io.out_dyn(0, i)) continue;
      if (i < lead || !io.in_dyn(0, i - lead)) onnx_batch_dependent("expand", "target shape " + s_.str());
      shape[size_t(i)] = 1;
    }
    b.node("Expand", {io.in[0], b.ints(shape)}, io.out);
    return true;
  }

 private:
  Shape s_;
};

struct SliceSpec {
  int axis;
  int64_t start, stop, step;
  // Clamps start/stop like Python slicing and returns the output length.
  int64_t resolve(int64_t n, int64_t& s, int64_t& e) const {
    if (step <= 0) throw ValueError("slice step must be positive", "step >= 1", std::to_string(step));
    s = start < 0 ? std::max<int64_t>(0, start + n) : std::min(start, n);
    e = stop < 0 ? std::max<int64_t>(0, stop + n) : std::min(stop, n);
    return e > s ? (e - s + step - 1) / step : 0;
  }
};

Tensor slice_view(const Tensor& x, const SliceSpec& sp) {
  int a = normalize_axis(sp.axis, x.dim());
  int64_t s, e;
  int64_t len = sp.resolve(x.shape()[a], s, e);
  Shape sh = x.shape(), st = x.strides();
  sh[a] = len;
  st[a] *= sp.step;
  return make_view(x, sh, st, x.offset() + s * x.strides()[a]);
}

// out = zeros(shape); out[slice] = x. The adjoint of slice.
class SliceScatter final : public Op {
 public:
  SliceScatter(Shape shape, SliceSpec sp) : shape_(shape), sp_(sp) {}
  const char* name() const override { return "slice_scatter"; }
  bool linear() const override { return true; }
  std::string attrs() const override {
    return "shape=" + shape_.str() + " axis=" + std::to_string(sp_.axis) + " start=" + std::to_string(sp_.start) +
           " stop=" + std::to_string(sp_.stop) + " step=" + std::to_string(sp_.step);
  }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    Tensor probe = make_view(in[0], shape_, shape_.contiguous_strides(), 0);
    Tensor v = slice_view(probe, sp_);
    if (v.shape() != in[0].shape())
      throw ShapeError("slice_scatter: source does not fit the slice", v.shape().str(), in[0].shape().str());
    return {{shape_, in[0].dtype(), in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    kernels::cpu::fill(out[0], 0.0);
    Tensor v = slice_view(out[0], sp_);
    kernels::cpu::copy_cast(in[0], v);
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    fill_(out[0], 0.0);
    Tensor v = slice_view(out[0], sp_);
    kernels::cuda::copy_cast(in[0], v);
  }
  TensorList vjp(const TensorList&, const TensorList&, const TensorList& ct, const std::vector<bool>&) const override {
    return {slice(ct[0], sp_.axis, sp_.start, sp_.stop, sp_.step)};
  }
  // vmap: the same scatter one axis further in, into [B, shape...].
  std::optional<TensorList> batch(const TensorList& in, const std::vector<bool>&, int64_t B) const override {
    Shape s{B};
    for (int64_t d : shape_) s.push_back(d);
    SliceSpec sp = sp_;
    sp.axis = normalize_axis(sp.axis, shape_.rank()) + 1;
    return TensorList{apply1(std::make_shared<SliceScatter>(s, sp), {in[0]})};
  }
  // A contiguous slice is a zero padding (pad() makes these): Pad with the widths before and after it.
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    if (sp_.step != 1) return false;
    const int r = shape_.rank(), a = normalize_axis(sp_.axis, r);
    int64_t start, stop;
    sp_.resolve(shape_[a], start, stop);
    std::vector<int64_t> pads(size_t(2 * r), 0);
    pads[size_t(a)] = start;
    pads[size_t(r + a)] = shape_[a] - start - io.in_specs[0].shape[a];
    b.node("Pad", {io.in[0], b.ints(pads)}, io.out);
    return true;
  }

 private:
  Shape shape_;
  SliceSpec sp_;
};

class Slice final : public ViewOp {
 public:
  explicit Slice(SliceSpec sp) : sp_(sp) {}
  const char* name() const override { return "slice"; }
  std::string attrs() const override {
    return "axis=" + std::to_string(sp_.axis) + " start=" + std::to_string(sp_.start) + " stop=" +
           std::to_string(sp_.stop) + " step=" + std::to_string(sp_.step);
  }
  Tensor view(const Tensor& x) const override { return slice_view(x, sp_); }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>&) const override {
    return {apply1(std::make_shared<SliceScatter>(in[0].shape(), sp_), {ct[0]})};
  }
  // The bounds as this op resolves them (clamped, non-negative), so ONNX's own clamping never differs.
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    const Shape& x = io.in_specs[0].shape;
    const int a = normalize_axis(sp_.axis, x.rank());
    int64_t start, stop;
    sp_.resolve(x[a], start, stop);
    if (io.in_dyn(0, a)) {  // only the whole batch-dependent axis has bounds that hold for every batch size
      if (start != 0 || stop != x[a] || sp_.step != 1) onnx_batch_dependent("slice", "range of axis " + std::to_string(a));
      stop = INT64_MAX;
    }
    b.node("Slice", {io.in[0], b.ints({start}), b.ints({std::max(start, stop)}), b.ints({a}), b.ints({sp_.step})}, io.out);
    return true;
  }

 private:
  SliceSpec sp_;
};

class Concat final : public Op {
 public:
  explicit Concat(int axis) : axis_(axis) {}
  const char* name() const override { return "concat"; }
  bool linear() const override { return true; }
  std::string attrs() const override { return "axis=" + std::to_string(axis_); }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    if (in.empty()) throw ValueError("concat of no tensors", "at least one tensor", "an empty list");
    check_same_dtype(in, "concat");
    int a = normalize_axis(axis_, in[0].dim());
    Shape s = in[0].shape();
    for (size_t i = 1; i < in.size(); ++i) {
      const Shape& t = in[i].shape();
      bool ok = t.rank() == s.rank();
      for (int d = 0; ok && d < s.rank(); ++d) ok = d == a || t[d] == s[d];
      if (!ok)
        throw ShapeError("concat: shapes differ off the concatenation axis", in[0].shape().str() + " (axis " + std::to_string(a) + " may differ)",
                         t.str() + " (input " + std::to_string(i) + ")");
      s[a] += t[a];
    }
    return {{s, in[0].dtype(), in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    int a = normalize_axis(axis_, in[0].dim());
    int64_t off = 0;
    for (const auto& t : in) {
      Tensor v = slice_view(out[0], {a, off, off + t.shape()[a], 1});
      kernels::cpu::copy_cast(t, v);
      off += t.shape()[a];
    }
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    int a = normalize_axis(axis_, in[0].dim());
    int64_t off = 0;
    for (const auto& t : in) {
      Tensor v = slice_view(out[0], {a, off, off + t.shape()[a], 1});
      kernels::cuda::copy_cast(t, v);
      off += t.shape()[a];
    }
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    int a = normalize_axis(axis_, in[0].dim());
    TensorList r(in.size());
    int64_t off = 0;
    for (size_t i = 0; i < in.size(); ++i) {
      int64_t n = in[i].shape()[a];
      if (needs[i]) r[i] = slice(ct[0], a, off, off + n);
      off += n;
    }
    return r;
  }
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    b.node("Concat", io.in, io.out, {{"axis", int64_t(normalize_axis(axis_, io.in_specs[0].shape.rank()))}});
    return true;
  }

 private:
  int axis_;
};

// The slices of x along `axis`, each without that axis: views of x's memory. Its vjp is one concat of
// the cotangents (their adjoint), where slicing each index apart would scatter each cotangent into a
// zeroed copy of x and sum the copies.
class Unbind final : public Op {
 public:
  explicit Unbind(int axis) : axis_(axis) {}
  const char* name() const override { return "unbind"; }
  bool linear() const override { return true; }
  std::string attrs() const override { return "axis=" + std::to_string(axis_); }
  bool custom_forward() const override { return true; }
  bool capturable() const override { return true; }  // no device work: views of its input's memory
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    if (in[0].dim() == 0) throw ShapeError("unbind of a 0-d tensor", "a tensor of rank >= 1", "[]", "reshape it first");
    const int a = normalize_axis(axis_, in[0].dim());
    Shape s = in[0].shape();
    const int64_t n = s[a];
    s.erase(a);
    return std::vector<TensorSpec>(size_t(n), TensorSpec{s, in[0].dtype(), in[0].device()});
  }
  TensorList forward(const TensorList& in) const override {
    const Tensor& x = in[0];
    const std::vector<TensorSpec> specs = infer(in);
    const int a = normalize_axis(axis_, x.dim());
    Shape st = x.strides();
    st.erase(a);
    TensorList out;
    for (int64_t i = 0; i < int64_t(specs.size()); ++i) out.push_back(make_view(x, specs[0].shape, st, x.offset() + i * x.strides()[a]));
    return out;
  }
  void cpu(const TensorList&, TensorList&) const override {}
  // Split into slices of 1, each squeezed (unused slices still need a name: Split defines every output).
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    const int64_t a = normalize_axis(axis_, io.in_specs[0].shape.rank());
    std::vector<std::string> parts;
    for (size_t i = 0; i < io.out.size(); ++i) parts.push_back(b.fresh());
    b.node("Split", {io.in[0], b.ints(std::vector<int64_t>(io.out.size(), 1))}, parts, {{"axis", a}});
    for (size_t i = 0; i < io.out.size(); ++i)
      if (!io.out[i].empty()) b.node("Squeeze", {parts[i], b.ints({a})}, {io.out[i]});
    return true;
  }
  // One concat, laid out in x's memory order (PyTorch's preserve_format): where x is a permuted view of
  // one dense buffer (q, k, v cut from a [B, T, 3, heads, D] projection), the slices are concatenated
  // in that buffer's axis order and permuted back, so the gradient has x's strides and the vjps of the
  // permute and reshape before the unbind stay views instead of copying it a second time.
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>&) const override {
    const Tensor& x = in[0];
    const int a = normalize_axis(axis_, x.dim());
    Shape one = x.shape();
    one[a] = 1;
    const std::vector<int> order = memory_order(x);
    const bool identity = std::is_sorted(order.begin(), order.end());
    TensorList parts;
    for (const Tensor& c : ct) parts.push_back(identity ? reshape(c, one) : permute(reshape(c, one), order));
    if (identity) return {concat(parts, a)};
    std::vector<int> inverse(order.size());
    for (size_t i = 0; i < order.size(); ++i) inverse[size_t(order[i])] = int(i);
    return {permute(concat(parts, inverse[size_t(a)]), inverse)};
  }

 private:
  // x's axes from the largest stride to the smallest (ties in axis order) where x densely covers its memory
  // in that order (every stride the product of the extents inside it, axes of one element aside); the
  // identity for a contiguous x (whatever the strides of its axes of one element) and otherwise (an
  // overlapping or gapped view: a plain concat).
  static std::vector<int> memory_order(const Tensor& x) {
    std::vector<int> order(size_t(x.dim()));
    std::iota(order.begin(), order.end(), 0);
    if (x.is_contiguous()) return order;
    std::stable_sort(order.begin(), order.end(), [&](int p, int q) { return x.strides()[p] > x.strides()[q]; });
    int64_t inner = 1;
    for (auto it = order.rbegin(); it != order.rend(); ++it) {
      const int64_t n = x.shape()[*it];
      if (n == 1) continue;
      if (x.strides()[*it] != inner) {
        std::iota(order.begin(), order.end(), 0);
        return order;
      }
      inner *= n;
    }
    return order;
  }
  int axis_;
};

class AsType final : public Op {
 public:
  explicit AsType(DType t) : t_(t) {}
  const char* name() const override { return "astype"; }
  bool linear() const override { return is_floating(t_); }
  std::string attrs() const override { return "dtype=" + std::string(dtype_name(t_)); }
  bool differentiable() const override { return is_floating(t_); }
  bool vjp_reads_inputs() const override { return false; }  // the cotangent cast back: only the input's dtype
  std::vector<TensorSpec> infer(const TensorList& in) const override { return {{in[0].shape(), t_, in[0].device()}}; }
  void cpu(const TensorList& in, TensorList& out) const override { kernels::cpu::copy_cast(in[0], out[0]); }
  void cuda(const TensorList& in, TensorList& out) const override { kernels::cuda::copy_cast(in[0], out[0]); }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    if (!needs[0] || !is_floating(in[0].dtype())) return {Tensor()};
    return {ct[0].astype(in[0].dtype())};
  }
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    b.node("Cast", io.in, io.out, {{"to", int64_t(onnx_dtype(t_))}});
    return true;
  }

 private:
  DType t_;
};

class ToDevice final : public Op {
 public:
  explicit ToDevice(Device d) : d_(d) {}
  const char* name() const override { return "to_device"; }
  bool linear() const override { return true; }
  std::string attrs() const override { return "device=" + d_.str(); }
  std::vector<TensorSpec> infer(const TensorList& in) const override { return {{in[0].shape(), in[0].dtype(), d_}}; }
  void cpu(const TensorList&, TensorList&) const override {}
  bool custom_forward() const override { return true; }
  TensorList forward(const TensorList& in) const override {
    if (d_.is_cuda() && d_.index >= cuda_rt::device_count())
      throw DeviceError("no such CUDA device", "an index below " + std::to_string(cuda_rt::device_count()), d_.str(),
                        cuda_rt::built_with_cuda() ? "check CUDA_VISIBLE_DEVICES" : "build with `cmake --preset cuda`");
    Tensor out = empty(in[0].shape(), in[0].dtype(), d_);
    copy_(out, in[0]);
    return {out};
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>&) const override {
    return {ct[0].to(in[0].device())};
  }
  // An ONNX model has no devices: the runtime that loads it places the values.
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    b.node("Identity", io.in, io.out);
    return true;
  }

 private:
  Device d_;
};

class OneHot final : public Op {
 public:
  OneHot(int64_t classes, DType t) : classes_(classes), t_(t) {}
  const char* name() const override { return "one_hot"; }
  std::string attrs() const override { return "classes=" + std::to_string(classes_) + " dtype=" + std::string(dtype_name(t_)); }
  bool differentiable() const override { return false; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    check_dtype(in[0], {DType::i64, DType::i32}, "one_hot (labels)");
    Shape s = in[0].shape();
    s.push_back(classes_);
    return {{s, t_, in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    std::vector<int64_t> lab = in[0].to_vector<int64_t>();
    kernels::cpu::fill(out[0], 0.0);
    Tensor flat = make_view(out[0], Shape{int64_t(lab.size()), classes_}, Shape{classes_, 1}, out[0].offset());
    for (size_t i = 0; i < lab.size(); ++i) {
      if (lab[i] < 0 || lab[i] >= classes_)
        throw ValueError("one_hot: label out of range", "labels in [0, " + std::to_string(classes_) + ")",
                         std::to_string(lab[i]) + " at position " + std::to_string(i));
      Tensor cell = make_view(flat, Shape{}, Shape{}, flat.offset() + int64_t(i) * classes_ + lab[i]);
      kernels::cpu::fill(cell, 1.0);
    }
  }
  // On the device: one pass writing every element; a bad label is a ValueError at the next wait.
  void cuda(const TensorList& in, TensorList& out) const override { kernels::cuda::one_hot(in[0], classes_, out[0]); }
  // ONNX's OneHot gives a row of zeros for a label out of range, where this op throws.
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    const Tensor values = from_vector(std::vector<double>{0, 1}, Shape{2}, DType::f64).astype(t_);
    b.node("OneHot", {io.in[0], b.ints({classes_}), b.constant(values)}, io.out, {{"axis", int64_t(-1)}});
    return true;
  }

 private:
  int64_t classes_;
  DType t_;
};

}  // namespace

Tensor reshape(const Tensor& x, const Shape& shape) {
  if (x.shape() == shape) return x;
  return apply1(std::make_shared<Reshape>(shape), {x});
}
Tensor permute(const Tensor& x, const std::vector<int>& axes) { return apply1(std::make_shared<Permute>(axes), {x}); }
Tensor transpose(const Tensor& x, int a, int b) {
  std::vector<int> axes(size_t(x.dim()));
  std::iota(axes.begin(), axes.end(), 0);
  std::swap(axes[size_t(normalize_axis(a, x.dim()))], axes[size_t(normalize_axis(b, x.dim()))]);
  return permute(x, axes);
}
Tensor expand(const Tensor& x, const Shape& shape) {
  if (x.shape() == shape) return x;
  return apply1(std::make_shared<Expand>(shape), {x});
}
Tensor slice(const Tensor& x, int axis, int64_t start, int64_t stop, int64_t step) {
  return apply1(std::make_shared<Slice>(SliceSpec{axis, start, stop, step}), {x});
}
Tensor concat(const TensorList& xs, int axis) { return apply1(std::make_shared<Concat>(axis), xs); }
TensorList unbind(const Tensor& x, int axis) { return apply(std::make_shared<Unbind>(axis), {x}); }
Tensor pad(const Tensor& x, int axis, int64_t before, int64_t after) {
  int a = normalize_axis(axis, x.dim());
  if (before < 0 || after < 0) throw ValueError("pad with a negative width", ">= 0", std::to_string(before) + ", " + std::to_string(after));
  Shape s = x.shape();
  s[a] += before + after;
  return apply1(std::make_shared<SliceScatter>(s, SliceSpec{a, before, before + x.shape()[a], 1}), {x});
}
Tensor one_hot(const Tensor& labels, int64_t classes, DType dtype) {
  return apply1(std::make_shared<OneHot>(classes, dtype), {labels});
}

// ---- Tensor methods
Tensor Tensor::to(Device d) const {
  if (device() == d) return *this;
  return apply1(std::make_shared<ToDevice>(d), {*this});
}
Tensor Tensor::astype(DType t) const {
  if (dtype() == t) return *this;
  return apply1(std::make_shared<AsType>(t), {*this});
}
Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  return apply1(std::make_shared<Copy>(), {*this});
}
Tensor Tensor::clone() const { return apply1(std::make_shared<Copy>(), {*this}); }
Tensor Tensor::reshape(const Shape& s) const { return titanax::reshape(*this, s); }
Tensor Tensor::flatten(int start_axis, int end_axis) const {
  if (dim() == 0) return titanax::reshape(*this, Shape{1});
  int s = normalize_axis(start_axis, dim()), e = normalize_axis(end_axis, dim());
  Shape out;
  for (int i = 0; i < s; ++i) out.push_back(shape()[i]);
  int64_t p = 1;
  for (int i = s; i <= e; ++i) p *= shape()[i];
  out.push_back(p);
  for (int i = e + 1; i < dim(); ++i) out.push_back(shape()[i]);
  return titanax::reshape(*this, out);
}
Tensor Tensor::T() const {
  if (dim() < 2) throw ShapeError("T() of a tensor with fewer than 2 axes", "rank >= 2", shape().str());
  return titanax::transpose(*this, -2, -1);
}
Tensor Tensor::transpose(int a, int b) const { return titanax::transpose(*this, a, b); }
Tensor Tensor::permute(const std::vector<int>& axes) const { return titanax::permute(*this, axes); }
Tensor Tensor::slice(int axis, int64_t start, int64_t stop, int64_t step) const {
  return titanax::slice(*this, axis, start, stop, step);
}
Tensor Tensor::unsqueeze(int axis) const {
  int a = axis < 0 ? axis + dim() + 1 : axis;
  if (a < 0 || a > dim()) throw ShapeError("unsqueeze axis out of range", "[" + std::to_string(-dim() - 1) + ", " + std::to_string(dim()) + "]", std::to_string(axis));
  Shape s = shape();
  s.insert(a, 1);
  return titanax::reshape(*this, s);
}
Tensor Tensor::squeeze(int axis) const {
  int a = normalize_axis(axis, dim());
  if (shape()[a] != 1) throw ShapeError("squeeze of an axis whose size is not 1", "size 1", shape().str() + " at axis " + std::to_string(axis));
  Shape s = shape();
  s.erase(a);
  return titanax::reshape(*this, s);
}
Tensor Tensor::expand(const Shape& s) const { return titanax::expand(*this, s); }

}  // namespace titanax
