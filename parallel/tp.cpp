// Tensor-parallel collectives (Megatron's f, g, scatter, gather) as Ops whose vjps are each other, and
// the vocabulary-parallel embedding and cross-entropy.
#include "parallel/tp.h"

#include <cmath>

#include "autodiff/tape.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/nn.h"
#include "kernels/cuda/kernels.h"
#include "parallel/axis_context.h"

namespace titanax {
namespace {

namespace kc = kernels::cpu;

using TPCtx = detail::AxisContext;

Tensor dense(const Tensor& t) { return t.is_contiguous() ? t : t.detach().contiguous(); }

class TPOpBase : public Op {
 public:
  explicit TPOpBase(TPCtx c) : c_(std::move(c)) {}
  std::string attrs() const override { return c_.attrs() + more_attrs(); }

 protected:
  virtual std::string more_attrs() const { return {}; }
  // Runs a communicator call, re-raising its CollectiveError at the user's call site with the op's name.
  template <class F>
  auto guarded(F&& f) const {
    try {
      return f();
    } catch (const CollectiveError& e) {
      throw CollectiveError(std::string(name()) + " over axis '" + c_.axis + "': " + e.message(), e.expected(),
                            e.found(), e.suggestion(), c_.loc);
    }
  }
  int norm_dim(int dim, const Tensor& x) const {
    if (x.dim() == 0)
      throw ShapeError(std::string(name()) + " of a 0-d tensor", "a tensor with at least one dimension", x.str(),
                       "reshape it to [1] first", c_.loc);
    return normalize_axis(dim, x.dim(), c_.loc);
  }
  TPCtx c_;
};

Tensor copy_to_c(const TPCtx& c, const Tensor& x);
Tensor reduce_from_c(const TPCtx& c, const Tensor& x);
Tensor scatter_to_c(const TPCtx& c, const Tensor& x, int dim);
Tensor gather_from_c(const TPCtx& c, const Tensor& x, int dim);

// f: identity forward, psum backward.
class CopyToTP final : public TPOpBase {
 public:
  using TPOpBase::TPOpBase;
  const char* name() const override { return "copy_to_tensor_parallel_region"; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    return {{in[0].shape(), in[0].dtype(), in[0].device()}};
  }
  bool custom_forward() const override { return true; }
  TensorList forward(const TensorList& in) const override { return {in[0]}; }  // apply() gives it its own handle
  void cpu(const TensorList& in, TensorList& out) const override { copy_(out[0], in[0]); }
  TensorList vjp(const TensorList&, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    return {reduce_from_c(c_, ct[0])};
  }
};

// g: psum forward, identity backward.
class ReduceFromTP final : public TPOpBase {
 public:
  using TPOpBase::TPOpBase;
  const char* name() const override { return "reduce_from_tensor_parallel_region"; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    if (in[0].dtype() == DType::bool_)
      throw DTypeError(std::string(name()) + ": dtype cannot be reduced", "f32, f64, f16, bf16, i32, i64 or u8", "bool",
                       "cast with astype(DType::f32)", c_.loc);
    return {{in[0].shape(), in[0].dtype(), in[0].device()}};
  }
  bool custom_forward() const override { return true; }
  TensorList forward(const TensorList& in) const override {
    infer(in);
    NoGradGuard ng;
    Tensor y = empty(in[0].shape(), in[0].dtype(), in[0].device());
    copy_(y, in[0]);
    guarded([&] {
      c_.comm->all_reduce(y, CollectiveOp::sum);
      return 0;
    });
    return {y};
  }
  void cpu(const TensorList& in, TensorList& out) const override { copy_(out[0], forward(in)[0]); }
  TensorList vjp(const TensorList&, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    return {copy_to_c(c_, ct[0])};
  }
};

class ScatterToTP final : public TPOpBase {
 public:
  ScatterToTP(TPCtx c, int dim) : TPOpBase(std::move(c)), dim_(dim) {}
  const char* name() const override { return "scatter_to_tensor_parallel_region"; }
  std::string more_attrs() const override { return " dim=" + std::to_string(dim_); }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    const int d = norm_dim(dim_, in[0]);
    Shape s = in[0].shape();
    if (s[d] % c_.size() != 0)
      throw ShapeError(std::string(name()) + ": dimension " + std::to_string(d) + " does not divide by the size of axis '" +
                           c_.axis + "'",
                       "a multiple of " + std::to_string(c_.size()), in[0].str(), "", c_.loc);
    s[d] /= c_.size();
    return {{s, in[0].dtype(), in[0].device()}};
  }
  bool custom_forward() const override { return true; }
  TensorList forward(const TensorList& in) const override {
    infer(in);
    const int d = normalize_axis(dim_, in[0].dim());
    const int64_t n = in[0].shape()[d] / c_.size();
    NoGradGuard ng;
    return {in[0].slice(d, c_.rank() * n, (c_.rank() + 1) * n).clone()};
  }
  void cpu(const TensorList& in, TensorList& out) const override { copy_(out[0], forward(in)[0]); }
  TensorList vjp(const TensorList&, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    return {gather_from_c(c_, ct[0], dim_)};
  }

 private:
  int dim_;
};

class GatherFromTP final : public TPOpBase {
 public:
  GatherFromTP(TPCtx c, int dim) : TPOpBase(std::move(c)), dim_(dim) {}
  const char* name() const override { return "gather_from_tensor_parallel_region"; }
  std::string more_attrs() const override { return " dim=" + std::to_string(dim_); }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    const int d = norm_dim(dim_, in[0]);
    Shape s = in[0].shape();
    s[d] *= c_.size();
    return {{s, in[0].dtype(), in[0].device()}};
  }
  bool custom_forward() const override { return true; }
  TensorList forward(const TensorList& in) const override {
    infer(in);
    const Tensor& x = in[0];
    const int d = normalize_axis(dim_, x.dim());
    NoGradGuard ng;
    Tensor g = guarded([&] { return c_.comm->all_gather(dense(x).unsqueeze(0)); });  // [n, *x.shape]
    // [n, c0, .., cd, ..] -> [c0, .., n, cd, ..] -> merge n into dim d.
    std::vector<int> perm;
    for (int i = 0; i < d; ++i) perm.push_back(i + 1);
    perm.push_back(0);
    for (int i = d; i < x.dim(); ++i) perm.push_back(i + 1);
    Shape s = x.shape();
    s[d] *= c_.size();
    return {g.permute(perm).contiguous().reshape(s)};
  }
  void cpu(const TensorList& in, TensorList& out) const override { copy_(out[0], forward(in)[0]); }
  TensorList vjp(const TensorList&, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    if (!needs[0]) return {Tensor()};
    return {scatter_to_c(c_, ct[0], dim_)};
  }

 private:
  int dim_;
};

Tensor copy_to_c(const TPCtx& c, const Tensor& x) {
  if (c.size() == 1) return x;
  return apply1(std::make_shared<CopyToTP>(c), {x});
}
Tensor reduce_from_c(const TPCtx& c, const Tensor& x) {
  if (c.size() == 1) return x;
  return apply1(std::make_shared<ReduceFromTP>(c), {x});
}
Tensor scatter_to_c(const TPCtx& c, const Tensor& x, int dim) {
  if (c.size() == 1) return x;
  return apply1(std::make_shared<ScatterToTP>(c, dim), {x});
}
Tensor gather_from_c(const TPCtx& c, const Tensor& x, int dim) {
  if (c.size() == 1) return x;
  return apply1(std::make_shared<GatherFromTP>(c, dim), {x});
}

// ------------------------------------------------------------------------------------ vocab-parallel CE

kc::LossReduction to_kernel(Reduction r) {
  return r == Reduction::mean ? kc::LossReduction::mean : r == Reduction::sum ? kc::LossReduction::sum : kc::LossReduction::none;
}

void check_vp_inputs(const Tensor& logits, const Tensor& labels, const char* what, Loc loc) {
  check_dtype(logits, {DType::f32, DType::f64}, what);
  check_dtype(labels, {DType::i32, DType::i64}, (std::string(what) + " (labels)").c_str());
  if (logits.dim() < 1)
    throw ShapeError(std::string(what) + ": logits need a class axis", "logits [..., V / n]", logits.shape().str(), "", loc);
  Shape want(logits.shape().begin(), logits.shape().end() - 1);
  if (labels.shape() != want)
    throw ShapeError(std::string(what) + ": labels do not match the logits",
                     "labels of shape " + want.str() + " for logits " + logits.shape().str(), labels.shape().str(),
                     "labels hold one global class index per row of logits", loc);
}

// The total over the axis of per-rank partial sums, for use in this rank's share of the computation:
// f(g(x)). g all-reduces the partials into the replicated total (identity backward: a replicated value's
// cotangent is whole on every rank); f marks the total's use by this rank's shard (identity forward, the
// shards' partial cotangents all-reduced backward). All-reduce forward and backward, to any order.
Tensor psum_c(const TPCtx& c, const Tensor& x) { return copy_to_c(c, reduce_from_c(c, x)); }

// Inputs (logits [..., C], labels [...], stats f64 [2, R], ct); output dlogits.
class VocabParallelCEBackward final : public TPOpBase {
 public:
  VocabParallelCEBackward(TPCtx c, Reduction r, int64_t ignore) : TPOpBase(std::move(c)), red_(r), ignore_(ignore) {}
  const char* name() const override { return "vocab_parallel_cross_entropy_backward"; }
  std::string more_attrs() const override {
    return " reduction=" + std::to_string(int(red_)) + " ignore=" + std::to_string(ignore_);
  }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    check_vp_inputs(in[0], in[1], name(), c_.loc);
    return {{in[0].shape(), in[0].dtype(), in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override { run(in, out); }
  void cuda(const TensorList& in, TensorList& out) const override { run(in, out); }
  bool capturable() const override { return false; }  // reads the labels on the host
  // dlogits = k (s - y) with s the softmax over the whole vocabulary, y this rank's block of the one-hot
  // label, k = ct * scale per row (1 / count under mean, 0 on ignored rows); written with differentiable
  // ops, the vocabulary-wide sums all-reduced from the rank's partial sums (as CrossEntropyBackward's vjp
  // on one rank). Over all ranks the cotangent A pairs with dlogits as sum_r <A_r, dlogits_r>, so:
  //   d / dlogits = k s (A - sum_V(A s)),   d / dct = sum_V(A (s - y)) * scale (summed over rows unless
  //   reduction none: ct is replicated and gets the whole derivative on every rank),
  // sum_V over the whole vocabulary: psum_c where the total feeds this rank's shard, g alone where it is
  // replicated.
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    const Tensor &labels = in[1], &c = in[3];
    const DType f = in[0].dtype();
    const int64_t C = in[0].shape().back(), lo = int64_t(c_.rank()) * C;
    const Tensor z = in[0], A = ct[0];
    const Tensor keep = ne(labels, scalar(double(ignore_), labels.dtype(), labels.device()));
    const Tensor kept = keep.astype(f);
    Tensor scale = kept;
    if (red_ == Reduction::mean) scale = kept / maximum(sum(kept), scalar_like(1.0, kept));
    // The softmax over the vocabulary, shifted by the saved global row maximum (a constant: the softmax
    // does not depend on it).
    const Tensor m = in[2].slice(0, 0, 1).reshape(labels.shape()).astype(f).detach().unsqueeze(-1);
    const Tensor e = exp(z - m);
    const Tensor s = e / psum_c(c_, sum(e, {-1}, true));
    TensorList r(in.size());
    if (needs[0]) {
      // c is 0-d, or per row under reduction none: replicated, so its use by this rank's shard goes
      // through f (its partial cotangents all-reduced, for the next derivative).
      const Tensor k = copy_to_c(c_, (c * scale).unsqueeze(-1));
      r[0] = k * s * (A - psum_c(c_, sum(A * s, {-1}, true)));
    }
    if (needs[3]) {
      const Tensor first = scalar(double(lo), labels.dtype(), labels.device());
      const Tensor local = sub(labels, first);
      const Tensor here = keep.astype(f) * ge(local, zeros_like(local)).astype(f) *
                          lt(local, scalar(double(C), labels.dtype(), labels.device())).astype(f);
      const Tensor y = one_hot(where(ne(here, zeros_like(here)), local, zeros_like(local)), C, f) * here.unsqueeze(-1);
      // The whole vocabulary's sum, replicated (g alone: used as ct is, not by the shard).
      const Tensor per_row = reduce_from_c(c_, sum(A * (s - y), {-1})) * scale;
      r[3] = red_ == Reduction::none ? per_row : sum(per_row);
    }
    return r;
  }

 private:
  Reduction red_;
  int64_t ignore_;

  void run(const TensorList& in, TensorList& out) const {
    const int64_t C = in[0].shape().back(), lo = int64_t(c_.rank()) * C, vocab = C * c_.size();
    const Tensor logits = dense(in[0]), labels = dense(in[1]), stats = dense(in[2]), ct = dense(in[3]);
    const int64_t count = kc::check_labels(labels.to(Device::cpu()), vocab, ignore_, in[1].shape(), "vocab_parallel_cross_entropy");
    if (logits.device().is_cpu()) kc::ce_shard_backward(logits, labels, lo, stats, ct, ignore_, to_kernel(red_), count, out[0]);
    else kernels::cuda::ce_shard_backward(logits, labels, lo, stats, ct, ignore_, to_kernel(red_), count, out[0]);
  }
};

// Outputs: the loss, and stats f64 [2, R] = (global row max, global sum of exp(logit - max)) for the vjp.
class VocabParallelCE final : public TPOpBase {
 public:
  VocabParallelCE(TPCtx c, Reduction r, int64_t ignore) : TPOpBase(std::move(c)), red_(r), ignore_(ignore) {}
  const char* name() const override { return "vocab_parallel_cross_entropy"; }
  std::string more_attrs() const override {
    return " reduction=" + std::to_string(int(red_)) + " ignore=" + std::to_string(ignore_);
  }
  bool saves_outputs() const override { return true; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    check_vp_inputs(in[0], in[1], name(), c_.loc);
    const int64_t R = in[1].numel();
    Shape s = red_ == Reduction::none ? in[1].shape() : Shape{};
    return {{s, in[0].dtype(), in[0].device()}, {Shape{2, R}, DType::f64, in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override { run(in, out); }
  void cuda(const TensorList& in, TensorList& out) const override { run(in, out); }
  bool capturable() const override { return false; }  // reads the labels on the host, all-reduces
  TensorList vjp(const TensorList& in, const TensorList& out, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    TensorList r(2);
    if (needs[0]) r[0] = apply1(std::make_shared<VocabParallelCEBackward>(c_, red_, ignore_), {in[0], in[1], out[1], ct[0]});
    return r;
  }

 private:
  Reduction red_;
  int64_t ignore_;

  // On either device: the shard kernels there, the all-reduces of their row statistics, then the loss
  // composed on the host from the global statistics (R values each), as cross_entropy composes it.
  void run(const TensorList& in, TensorList& out) const {
    const Tensor logits = dense(in[0]), labels = dense(in[1]);
    const Device dev = logits.device();
    const bool on_cpu = dev.is_cpu();
    const int64_t C = logits.shape().back(), R = labels.numel();
    const int64_t lo = int64_t(c_.rank()) * C, vocab = C * c_.size();
    // Labels are the same on every rank of the axis, so a bad label throws on all of them (no hang); on a
    // GPU they are read on the host (R ids, as VocabShardIds reads them).
    const Tensor host_labels = labels.to(Device::cpu());
    const int64_t count = kc::check_labels(host_labels, vocab, ignore_, in[1].shape(), name());
    Tensor gmax = empty(Shape{R}, DType::f64, dev);
    if (on_cpu) kc::ce_shard_max(logits, gmax);
    else kernels::cuda::ce_shard_max(logits, gmax);
    guarded([&] {
      c_.comm->all_reduce(gmax, CollectiveOp::max);
      return 0;
    });
    Tensor part = empty(Shape{2, R}, DType::f64, dev);
    if (on_cpu) kc::ce_shard_partials(logits, labels, lo, gmax, part);
    else kernels::cuda::ce_shard_partials(logits, labels, lo, gmax, part);
    guarded([&] {
      c_.comm->all_reduce(part, CollectiveOp::sum);
      return 0;
    });
    // The saved statistics (global max, sum of exp) for the backward, where they are.
    Tensor max_row = out[1].slice(0, 0, 1), sum_row = out[1].slice(0, 1, 2);
    copy_(max_row, gmax.reshape(Shape{1, R}));
    copy_(sum_row, part.slice(0, 0, 1));
    const Tensor gmax_h = gmax.to(Device::cpu()), part_h = part.to(Device::cpu());
    Tensor loss_h = empty(out[0].shape(), out[0].dtype());
    const double* m = gmax_h.data<double>();
    const double* p = part_h.data<double>();
    std::vector<int64_t> lab = host_labels.to_vector<int64_t>();
    double total = 0;
    TX_DISPATCH_FLOAT(logits.dtype(), name(), {
      using T = scalar_t;
      T* o = loss_h.data<T>();
      for (int64_t r = 0; r < R; ++r) {
        // As cross_entropy: max + log(sum exp(x - max)) - x[label], with the max in the logits' dtype.
        const double loss = lab[size_t(r)] == ignore_ ? 0.0 : double(T(m[r])) + std::log(p[r]) - p[R + r];
        if (red_ == Reduction::none) o[r] = T(loss);
        else total += loss;  // row order: independent of threads and ranks
      }
      if (red_ == Reduction::mean) total = count > 0 ? total / double(count) : 0.0;
      if (red_ != Reduction::none) o[0] = T(total);
    });
    copy_(out[0], loss_h);
  }
};

// The vocabulary shard's view of token ids: outputs local ids (ids - lo on this rank's rows [lo, lo + rows),
// 0 elsewhere; ids' dtype) and keep ([..., 1] in `dt`: 1 on this rank's rows, else 0). An op, so a traced
// step recomputes them (and checks the range) at every replay; the ids are read on the host (one small
// copy from a GPU, as cross_entropy's label check).
class VocabShardIds final : public Op {
 public:
  VocabShardIds(int64_t lo, int64_t rows, int64_t vocab, DType dt, Loc loc)
      : lo_(lo), rows_(rows), vocab_(vocab), dt_(dt), loc_(loc) {}
  const char* name() const override { return "vocab_shard_ids"; }
  bool capturable() const override { return false; }  // reads the ids on the host (range check)
  std::string attrs() const override {
    return "lo=" + std::to_string(lo_) + " rows=" + std::to_string(rows_) + " vocab=" + std::to_string(vocab_) +
           " dtype=" + std::string(dtype_name(dt_));
  }
  bool differentiable() const override { return false; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    Shape ms = in[0].shape();
    ms.push_back(1);
    return {{in[0].shape(), in[0].dtype(), in[0].device()}, {ms, dt_, in[0].device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override { run(in, out); }
  void cuda(const TensorList& in, TensorList& out) const override { run(in, out); }

 private:
  void run(const TensorList& in, TensorList& out) const {
    const Tensor host = in[0].device().is_cpu() ? in[0] : in[0].detach().to(Device::cpu());
    std::vector<int64_t> id = host.to_vector<int64_t>(), local(id.size());
    std::vector<float> keep(id.size());
    for (size_t i = 0; i < id.size(); ++i) {
      if (id[i] < 0 || id[i] >= vocab_)
        throw ValueError("vocab_parallel_embedding: id out of range", "ids in [0, " + std::to_string(vocab_) + ")",
                         "id " + std::to_string(id[i]) + " at flat position " + std::to_string(i),
                         "check the vocabulary size of the model against the token ids", loc_);
      const bool mine = id[i] >= lo_ && id[i] < lo_ + rows_;
      local[i] = mine ? id[i] - lo_ : 0;
      keep[i] = mine ? 1.f : 0.f;
    }
    copy_(out[0], from_vector(local, in[0].shape()).astype(in[0].dtype()));
    copy_(out[1], from_vector(keep, out[1].shape()).astype(dt_));
  }
  int64_t lo_, rows_, vocab_;
  DType dt_;
  Loc loc_;
};

}  // namespace

Tensor copy_to_tensor_parallel_region(const Mesh& mesh, const Tensor& x, const std::string& axis, Loc loc) {
  return copy_to_c(detail::axis_context(mesh, axis, x, "copy_to_tensor_parallel_region", loc), x);
}
Tensor copy_to_tensor_parallel_region(const Tensor& x, const std::string& axis, Loc loc) {
  return copy_to_tensor_parallel_region(Mesh::current(loc), x, axis, loc);
}
Tensor reduce_from_tensor_parallel_region(const Mesh& mesh, const Tensor& x, const std::string& axis, Loc loc) {
  return reduce_from_c(detail::axis_context(mesh, axis, x, "reduce_from_tensor_parallel_region", loc), x);
}
Tensor reduce_from_tensor_parallel_region(const Tensor& x, const std::string& axis, Loc loc) {
  return reduce_from_tensor_parallel_region(Mesh::current(loc), x, axis, loc);
}
Tensor scatter_to_tensor_parallel_region(const Mesh& mesh, const Tensor& x, const std::string& axis, int dim, Loc loc) {
  TPCtx c = detail::axis_context(mesh, axis, x, "scatter_to_tensor_parallel_region", loc);
  if (c.size() == 1) return x;
  return apply1(std::make_shared<ScatterToTP>(c, dim), {x});
}
Tensor gather_from_tensor_parallel_region(const Mesh& mesh, const Tensor& x, const std::string& axis, int dim, Loc loc) {
  TPCtx c = detail::axis_context(mesh, axis, x, "gather_from_tensor_parallel_region", loc);
  if (c.size() == 1) return x;
  return apply1(std::make_shared<GatherFromTP>(c, dim), {x});
}

Tensor column_parallel_linear(const Mesh& mesh, const Tensor& x, const Tensor& w, const Tensor& b,
                              const std::string& axis, Loc loc) {
  return linear(copy_to_tensor_parallel_region(mesh, x, axis, loc), w, b);
}

Tensor row_parallel_linear(const Mesh& mesh, const Tensor& x, const Tensor& w, const Tensor& b, const std::string& axis,
                           Loc loc) {
  Tensor y = reduce_from_tensor_parallel_region(mesh, linear(x, w), axis, loc);
  return b.defined() ? add(y, b) : y;
}

Tensor vocab_parallel_embedding(const Mesh& mesh, const Tensor& weight, const Tensor& ids, const std::string& axis,
                                Loc loc) {
  TPCtx c = detail::axis_context(mesh, axis, weight, "vocab_parallel_embedding", loc);
  if (weight.dim() != 2)
    throw ShapeError("vocab_parallel_embedding: the table must be 2-D", "weight [V / n, D]", weight.shape().str(), "", loc);
  check_dtype(ids, {DType::i32, DType::i64}, "vocab_parallel_embedding (ids)");
  if (c.size() == 1) return embedding(weight, ids);
  const int64_t rows = weight.shape()[0];
  // On the ids' device (the op reads them on the host), then to the table's.
  TensorList shard = apply(std::make_shared<VocabShardIds>(int64_t(c.rank()) * rows, rows, rows * c.size(), weight.dtype(), loc),
                           {ids});
  Tensor e = mul(embedding(weight, shard[0].to(weight.device())), shard[1].to(weight.device()));  // other ranks' rows -> 0
  return reduce_from_c(c, e);
}

Tensor vocab_parallel_cross_entropy(const Mesh& mesh, const Tensor& logits, const Tensor& labels,
                                    const std::string& axis, Reduction reduction, int64_t ignore_index, Loc loc) {
  TPCtx c = detail::axis_context(mesh, axis, logits, "vocab_parallel_cross_entropy", loc);
  if (!labels.defined())
    throw ValueError("vocab_parallel_cross_entropy of undefined labels", "a defined tensor", "Tensor()", "", loc);
  return apply(std::make_shared<VocabParallelCE>(c, reduction, ignore_index), {logits, labels})[0];
}

}  // namespace titanax

// ------------------------------------------------------------------------------------ TPGroup
namespace titanax {

TPGroup::TPGroup(const Mesh& mesh, std::string axis, Loc loc) : mesh_(mesh), axis_(std::move(axis)), has_mesh_(true) {
  mesh.check_axis(axis_, loc);
  size_ = mesh.axis_size(axis_, loc);
  index_ = mesh.axis_index(axis_, loc);
}

const Mesh& TPGroup::mesh(Loc loc) const {
  if (!has_mesh_)
    throw MeshError("this tensor-parallel group has no mesh", "a TPGroup built from a mesh and an axis", "TPGroup()",
                    "build it as TPGroup(mesh, \"model\")", loc);
  return mesh_;
}

Shape TPGroup::local_shape(const Shape& global, const PartitionSpec& spec, const std::string& what, Loc loc) const {
  if (int(spec.size()) > global.rank())
    throw PlanError(what + ": spec has more entries than the tensor has dimensions", "at most " + std::to_string(global.rank()),
                    spec_str(spec), "", loc);
  Shape s = global;
  for (size_t d = 0; d < spec.size(); ++d) {
    if (spec[d].empty() || !has_mesh_) continue;  // no mesh: every tensor is whole
    if (spec[d] != axis_)
      throw PlanError(what + ": spec splits over axis '" + spec[d] + "', not the tensor-parallel axis '" + axis_ + "'",
                      "specs naming only '" + axis_ + "'", spec_str(spec), "", loc);
    if (s[d] % size_ != 0)
      throw ShapeError(what + ": dimension " + std::to_string(d) + " of " + global.str() + " does not divide by the " +
                           std::to_string(size_) + " ranks of axis '" + axis_ + "'",
                       "a multiple of " + std::to_string(size_), std::to_string(s[d]), "", loc);
    s[d] /= size_;
  }
  return s;
}

Tensor TPGroup::shard(const Tensor& global, const PartitionSpec& spec, Loc loc) const {
  Shape ls = local_shape(global.shape(), spec, "shard", loc);
  Tensor t = global;
  for (size_t d = 0; d < spec.size(); ++d)
    if (!spec[d].empty() && has_mesh_) t = slice(t, int(d), index_ * ls[d], (index_ + 1) * ls[d]);
  return t;
}

}  // namespace titanax
