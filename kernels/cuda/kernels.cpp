// Host wrappers of the CUDA kernels (kernels/cuda/kernels.h): Tensor -> raw pointers and layouts, dtype
// checks, launch, error check. The kernels themselves are in the .cu files (kernels/cuda/launch.h).
#include "kernels/cuda/kernels.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "core/cuda_runtime.h"
#include "kernels/cpu/loops.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/launch.h"

namespace titanax::kernels::cuda {

static_assert(int(BinaryOp::gelu_erf_backward) == ew::gelu_erf_backward && int(BinaryOp::eq) == ew::eq,
              "launch.h ew::Binary must mirror kernels::cpu::BinaryOp");
static_assert(int(UnaryOp::sign) == ew::sign && int(UnaryOp::relu) == ew::relu,
              "launch.h ew::Unary must mirror kernels::cpu::UnaryOp");

namespace {

Dt to_dt(DType t, const char* what) {
  switch (t) {
    case DType::f32: return Dt::f32;
    case DType::f64: return Dt::f64;
    case DType::i32: return Dt::i32;
    case DType::i64: return Dt::i64;
    case DType::u8: return Dt::u8;
    case DType::bool_: return Dt::b8;
    case DType::f16: return Dt::f16;
    case DType::bf16: return Dt::bf16;
    default:
      throw DTypeError(std::string(what) + ": unsupported dtype on CUDA", "f32, f64, f16, bf16, i32, i64, u8, bool",
                       std::string(dtype_name(t)), "cast with astype(DType::f32)");
  }
}

// t's Dt when it is f32 / f64 (or, with half_ok, f16 / bf16: kernels that compute them in f32 and round
// once, half.cuh); DTypeError otherwise.
Dt floating_dt(const Tensor& t, const char* what, bool half_ok) {
  if (t.dtype() == DType::f32 || t.dtype() == DType::f64 || (half_ok && is_half(t.dtype()))) return to_dt(t.dtype(), what);
  throw DTypeError(std::string(what) + ": unsupported dtype on CUDA", half_ok ? "f32, f64, f16, bf16" : "f32, f64",
                   std::string(dtype_name(t.dtype())), "cast with astype(DType::f32)");
}
Dt floating(const Tensor& t, const char* what) { return floating_dt(t, what, false); }
Dt any_floating(const Tensor& t, const char* what) { return floating_dt(t, what, true); }

int red_code(LossReduction r) { return r == LossReduction::mean ? 0 : r == LossReduction::sum ? 1 : 2; }

void* stream_of(const Tensor& t) { return cuda_rt::current_stream(t.device().index); }

bool dense_like(const Tensor& t, const Tensor& out) { return t.is_contiguous() && t.shape() == out.shape(); }

void check(int err, const char* what) {
  if (err != 0) throw_cuda_error(err, what, __FILE__, __LINE__);
}

}  // namespace

Layout make_layout(const Shape& shape, std::initializer_list<Shape> strides) {
  if (shape.rank() > kMaxDims)
    throw ShapeError("CUDA elementwise kernel: too many axes", "rank <= " + std::to_string(kMaxDims), shape.str());
  Layout L;
  L.ndim = shape.rank();
  for (int d = 0; d < L.ndim; ++d) L.size[d] = shape[d];
  int k = 0;
  for (const Shape& s : strides) {
    for (int d = 0; d < L.ndim; ++d) L.stride[k][d] = s[d];
    ++k;
  }
  return L;
}

void copy_cast(const Tensor& src, Tensor& dst) {
  Layout L = make_layout(dst.shape(), {dst.strides(), cpu::broadcast_strides(src, dst.shape())});
  check(launch_copy(to_dt(src.dtype(), "copy"), to_dt(dst.dtype(), "copy"), src.raw_data(), dst.raw_data(), L,
                    dst.numel(), stream_of(dst)),
        "launch_copy");
}

void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out) {
  const char* nm = cpu::binary_name(op);
  Dt t = to_dt(a.dtype(), nm);
  if (!cpu::is_comparison(op) && (t == Dt::u8 || t == Dt::b8))
    throw DTypeError(std::string(nm) + ": unsupported dtype on CUDA", "f32, f64, f16, bf16, i32, i64",
                     std::string(dtype_name(a.dtype())), "cast with astype(DType::f32)");
  if ((op == BinaryOp::gelu_tanh_backward || op == BinaryOp::gelu_erf_backward)) any_floating(a, nm);
  Layout L = make_layout(out.shape(), {out.strides(), cpu::broadcast_strides(a, out.shape()),
                                       cpu::broadcast_strides(b, out.shape())});
  const bool contig = out.is_contiguous() && dense_like(a, out) && dense_like(b, out);
  check(launch_binary(int(op), t, a.raw_data(), b.raw_data(), out.raw_data(), L, out.numel(), contig, stream_of(out)),
        nm);
}

void unary(UnaryOp op, const Tensor& x, Tensor& out) {
  const char* nm = cpu::unary_name(op);
  const bool int_ok = op == UnaryOp::neg || op == UnaryOp::abs || op == UnaryOp::square || op == UnaryOp::sign ||
                      op == UnaryOp::relu;
  Dt t = int_ok ? to_dt(x.dtype(), nm) : any_floating(x, nm);
  if (t == Dt::u8 || t == Dt::b8) any_floating(x, nm);
  Layout L = make_layout(out.shape(), {out.strides(), cpu::broadcast_strides(x, out.shape())});
  const bool contig = out.is_contiguous() && dense_like(x, out);
  check(launch_unary(int(op), t, x.raw_data(), out.raw_data(), L, out.numel(), contig, stream_of(out)), nm);
}

void clamp(const Tensor& x, double lo, double hi, Tensor& out) {
  Dt t = to_dt(x.dtype(), "clamp");
  if (t == Dt::u8 || t == Dt::b8) any_floating(x, "clamp");
  Layout L = make_layout(out.shape(), {out.strides(), cpu::broadcast_strides(x, out.shape())});
  const bool contig = out.is_contiguous() && dense_like(x, out);
  check(launch_clamp(t, x.raw_data(), out.raw_data(), lo, hi, L, out.numel(), contig, stream_of(out)), "clamp");
}

void where(const Tensor& cond, const Tensor& a, const Tensor& b, Tensor& out) {
  Layout L = make_layout(out.shape(), {out.strides(), cpu::broadcast_strides(cond, out.shape()),
                                       cpu::broadcast_strides(a, out.shape()), cpu::broadcast_strides(b, out.shape())});
  check(launch_where(to_dt(out.dtype(), "where"), cond.raw_data(), a.raw_data(), b.raw_data(), out.raw_data(), L,
                     out.numel(), stream_of(out)),
        "where");
}

ReduceLayout reduce_layout(const Tensor& x, const std::vector<bool>& reduced) {
  if (x.dim() > kMaxDims)
    throw ShapeError("CUDA reduction: too many axes", "rank <= " + std::to_string(kMaxDims), x.shape().str(),
                     "reshape to merge adjacent axes that are reduced together");
  ReduceLayout L;
  bool last_reduced = false;  // the kind of the last axis appended
  for (int d = 0; d < x.dim(); ++d) {
    const int64_t size = x.shape()[d], stride = x.strides()[d];
    if (size == 1) continue;  // no index to walk
    const bool r = reduced[size_t(d)];
    int& n = r ? L.nr : L.nk;
    int64_t* sizes = r ? L.rsize : L.ksize;
    int64_t* strides = r ? L.rstride : L.kstride;
    (r ? L.nred : L.nout) *= size;
    // Adjacent axes of one kind whose strides nest walk as one axis, in the same order.
    if (n > 0 && last_reduced == r && strides[n - 1] == stride * size) {
      sizes[n - 1] *= size;
      strides[n - 1] = stride;
    } else {
      sizes[n] = size;
      strides[n++] = stride;
    }
    last_reduced = r;
  }
  return L;
}

ReducePlan reduce_plan(const ReduceLayout& L) {
  // Enough independent items to fill an H100 (132 SMs x 8 resident blocks of 256 threads), while every
  // thread still reduces a run of elements; the numbers depend on the sizes only, so the summation order
  // (and the result) is the same on every run and every device.
  constexpr int64_t kTargetBlocks = 1024, kPerThread = 16;
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  ReducePlan P;
  int64_t items_wanted, group;
  const bool kept_contiguous = L.nk > 0 && L.kstride[L.nk - 1] == 1;
  const bool red_contiguous = L.nr > 0 && L.rstride[L.nr - 1] == 1;
  if (kept_contiguous && !red_contiguous) {
    P.shape = ReducePlan::kCols;
    items_wanted = ceil_div(kTargetBlocks, ceil_div(L.nout, 32));  // splits per tile of 32 outputs
    group = kReduceThreads / 32;                                     // row groups
  } else if (L.nout < 2048 && L.nred >= 1024) {
    P.shape = ReducePlan::kRowsBlock;
    items_wanted = ceil_div(kTargetBlocks, L.nout);
    group = kReduceThreads;
  } else {
    P.shape = ReducePlan::kRowsWarp;
    items_wanted = ceil_div(kTargetBlocks * (kReduceThreads / 32), L.nout);
    group = 32;
  }
  const int64_t max_splits = std::max<int64_t>(1, L.nred / (group * kPerThread));
  P.splits = std::clamp<int64_t>(items_wanted, 1, max_splits);
  P.chunk = std::max<int64_t>(1, ceil_div(L.nred, P.splits));
  P.splits = std::max<int64_t>(1, ceil_div(L.nred, P.chunk));  // no empty split
  return P;
}

void reduce(ReduceOp op, const Tensor& x, const std::vector<bool>& reduced, Tensor& out) {
  const Dt t = any_floating(x, "reduce");
  const ReduceLayout L = reduce_layout(x, reduced);
  const ReducePlan P = reduce_plan(L);
  const int code = op == ReduceOp::sum ? 0 : op == ReduceOp::max ? 1 : 2;
  // The splits' accumulators: double for sums, else x's compute type (f32 for f16 / bf16).
  const DType acc = code == 0 ? DType::f64 : is_half(x.dtype()) ? DType::f32 : x.dtype();
  const Tensor work = P.splits > 1 ? empty(Shape{P.splits * L.nout}, acc, x.device()) : Tensor();
  check(launch_reduce(code, t, x.raw_data(), out.raw_data(), L, P, work.defined() ? work.raw_data() : nullptr,
                      stream_of(out)),
        "reduce");
}

void argmax(const Tensor& x, int axis, Tensor& out) {
  const Dt t = to_dt(x.dtype(), "argmax");
  if (t == Dt::u8 || t == Dt::b8 || t == Dt::f16 || t == Dt::bf16)
    throw DTypeError("argmax: unsupported dtype on CUDA", "f32, f64, i32, i64", std::string(dtype_name(x.dtype())),
                     "cast with astype(DType::f32)");
  std::vector<bool> reduced(size_t(x.dim()), false);
  reduced[size_t(axis)] = true;
  const ReduceLayout L = reduce_layout(x, reduced);
  check(launch_argmax(t, x.raw_data(), static_cast<int64_t*>(out.raw_data()), L, stream_of(out)), "argmax");
}

void ce_shard_max(const Tensor& logits, Tensor& gmax) {
  const int64_t C = logits.shape().back(), R = C > 0 ? logits.numel() / C : 0;
  check(launch_ce_shard_max(floating(logits, "vocab_parallel_cross_entropy"), logits.raw_data(), R, C,
                            static_cast<double*>(gmax.raw_data()), stream_of(gmax)),
        "vocab_parallel_cross_entropy");
}

void ce_shard_partials(const Tensor& logits, const Tensor& labels, int64_t lo, const Tensor& gmax, Tensor& partial) {
  const int64_t C = logits.shape().back(), R = labels.numel();
  check(launch_ce_shard_partials(floating(logits, "vocab_parallel_cross_entropy"), labels.dtype() == DType::i64,
                                 logits.raw_data(), labels.raw_data(), R, C, lo, static_cast<const double*>(gmax.raw_data()),
                                 static_cast<double*>(partial.raw_data()), stream_of(partial)),
        "vocab_parallel_cross_entropy");
}

void ce_shard_backward(const Tensor& logits, const Tensor& labels, int64_t lo, const Tensor& stats, const Tensor& ct,
                       int64_t ignore_index, LossReduction red, int64_t count, Tensor& dlogits) {
  const int64_t C = logits.shape().back(), R = labels.numel();
  check(launch_ce_shard_backward(floating(logits, "vocab_parallel_cross_entropy_backward"), labels.dtype() == DType::i64,
                                 logits.raw_data(), labels.raw_data(), ct.raw_data(), R, C, lo,
                                 static_cast<const double*>(stats.raw_data()), ignore_index, red_code(red), count,
                                 dlogits.raw_data(), stream_of(dlogits)),
        "vocab_parallel_cross_entropy_backward");
}

void fill_random(bool normal, RngKey key, Tensor& out) {
  if (!out.is_contiguous()) throw ShapeError("CUDA random fill needs a contiguous output", "contiguous", out.str());
  const char* what = normal ? "random_normal" : "random_uniform";
  check(launch_fill_random(normal, any_floating(out, what), out.raw_data(), out.numel(), key.k0, key.k1, stream_of(out)),
        what);
}

void one_hot(const Tensor& labels, int64_t classes, Tensor& out) {
  const Tensor lab = labels.contiguous();
  check(launch_one_hot(to_dt(out.dtype(), "one_hot"), lab.dtype() == DType::i64, lab.raw_data(), lab.numel(), classes,
                       report_slot(out.device().index), out.raw_data(), stream_of(out)),
        "one_hot");
}

void dropout(const Tensor& x, double p, RngKey key, Tensor& out) {
  if (!x.is_contiguous()) throw ShapeError("CUDA dropout needs a contiguous input", "contiguous", x.str());
  check(launch_dropout(any_floating(x, "dropout"), x.raw_data(), out.raw_data(), x.numel(), p, key.k0, key.k1, stream_of(out)),
        "dropout");
}

void softmax(const Tensor& x, int64_t outer, int64_t n, int64_t inner, bool log, Tensor& y) {
  check(launch_softmax(floating(x, "softmax"), x.raw_data(), y.raw_data(), outer, n, inner, log, stream_of(y)),
        "softmax");
}

namespace {
// The cross-entropy forward, and with ct and dlogits its backward in the same pass (launch_cross_entropy_fused).
void cross_entropy_rows(const Tensor& logits, const Tensor& labels, const Tensor* ct, int64_t ignore_index, LossReduction red,
                        Tensor& out, Tensor* dlogits) {
  const int64_t C = logits.shape().back(), R = C > 0 ? logits.numel() / C : labels.numel();
  Tensor rows = empty(Shape{std::max<int64_t>(R, 1)}, DType::f64, logits.device());
  Tensor count = empty(Shape{}, DType::i64, logits.device());
  check(launch_cross_entropy_fused(any_floating(logits, "cross_entropy"), labels.dtype() == DType::i64, logits.raw_data(),
                                   labels.raw_data(), ct ? ct->raw_data() : nullptr, R, C, ignore_index, red_code(red),
                                   static_cast<int64_t*>(count.raw_data()), report_slot(logits.device().index),
                                   out.raw_data(), static_cast<double*>(rows.raw_data()),
                                   dlogits ? dlogits->raw_data() : nullptr, stream_of(out)),
        "cross_entropy");
}
}  // namespace

void cross_entropy(const Tensor& logits, const Tensor& labels, int64_t ignore_index, LossReduction red, Tensor& out) {
  cross_entropy_rows(logits, labels, nullptr, ignore_index, red, out, nullptr);
}

void cross_entropy_fused(const Tensor& logits, const Tensor& labels, const Tensor& ct, int64_t ignore_index,
                         LossReduction red, Tensor& out, Tensor& dlogits) {
  cross_entropy_rows(logits, labels, &ct, ignore_index, red, out, &dlogits);
}

void cross_entropy_backward(const Tensor& logits, const Tensor& labels, const Tensor& ct, int64_t ignore_index,
                            LossReduction red, Tensor& dlogits) {
  const int64_t C = logits.shape().back(), R = C > 0 ? logits.numel() / C : 0;
  Tensor count = empty(Shape{}, DType::i64, logits.device());
  check(launch_cross_entropy_backward(any_floating(logits, "cross_entropy_backward"), labels.dtype() == DType::i64,
                                      logits.raw_data(), labels.raw_data(), ct.raw_data(), R, C, ignore_index,
                                      red_code(red), static_cast<int64_t*>(count.raw_data()),
                                      report_slot(logits.device().index), dlogits.raw_data(), stream_of(dlogits)),
        "cross_entropy_backward");
}

void layer_norm(const Tensor& x, const Tensor* w, const Tensor* b, double eps, Tensor& y) {
  const int64_t D = x.shape().back(), R = D > 0 ? x.numel() / D : 0;
  check(launch_layer_norm(floating(x, "layer_norm"), x.raw_data(), w ? w->raw_data() : nullptr,
                          b ? b->raw_data() : nullptr, R, D, eps, y.raw_data(), stream_of(y)),
        "layer_norm");
}

void layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor* w, double eps, Tensor& dx, Tensor* dw,
                         Tensor* db, const Tensor* residual) {
  const int64_t D = x.shape().back(), R = D > 0 ? x.numel() / D : 0;
  Tensor work = empty(Shape{std::max<int64_t>(int64_t(layer_norm_backward_workspace(R, D)), 1)}, DType::f64, x.device());
  check(launch_layer_norm_backward(floating(x, "layer_norm_backward"), dy.raw_data(), x.raw_data(),
                                   w ? w->raw_data() : nullptr, residual ? residual->raw_data() : nullptr, R, D, eps,
                                   dx.raw_data(),
                                   dw ? dw->raw_data() : nullptr, db ? db->raw_data() : nullptr,
                                   static_cast<double*>(work.raw_data()), stream_of(dx)),
        "layer_norm_backward");
}

void gather(const Tensor& x, const Tensor& idx, int64_t A, int64_t n, int64_t B, bool embedding, Tensor& out) {
  check(launch_gather(floating(x, "gather"), idx.dtype() == DType::i64, x.raw_data(), idx.raw_data(), A, n, B,
                      idx.numel(), embedding ? kEmbedding : kTake, report_slot(out.device().index), out.raw_data(),
                      stream_of(out)),
        "gather");
}

void scatter_add(const Tensor& g, const Tensor& idx, int64_t A, int64_t n, int64_t B, bool embedding, Tensor& out) {
  const Dt t = floating(g, "scatter_add");
  const int64_t K = idx.numel();
  Tensor work = empty(Shape{int64_t(scatter_add_workspace(n, K))}, DType::u8, out.device());
  check(launch_scatter_add(t, idx.dtype() == DType::i64, g.raw_data(), idx.raw_data(), A, n, B, K, work.raw_data(),
                           embedding ? kEmbeddingBackward : kTakeBackward, report_slot(out.device().index), out.raw_data(),
                           stream_of(out)),
        "scatter_add");
  // work goes back to the stream-ordered pool here; a later allocation reusing it is queued after these
  // kernels on the same stream, so no synchronisation is needed.
}

namespace {
constexpr int64_t kMaxAttentionHeadDim = 128;

// The dtype of q (checked against `others`): f32, bf16 or f16.
Dt attention_dtype(const char* what, const Tensor& q, std::initializer_list<const Tensor*> others) {
  Dt t;
  switch (q.dtype()) {
    case DType::f32: t = Dt::f32; break;
    case DType::bf16: t = Dt::bf16; break;
    case DType::f16: t = Dt::f16; break;
    default:
      throw DTypeError(std::string(what) + ": unsupported dtype on CUDA", "f32, bf16 or f16",
                       std::string(dtype_name(q.dtype())),
                       q.dtype() == DType::f64
                           ? "the CUDA attention kernels have no f64 version: cast q, k, v with astype(DType::f32) "
                             "(or run the f64 attention on the CPU)"
                           : "cast q, k, v with astype(DType::f32)");
  }
  for (const Tensor* o : others)
    if (o->dtype() != q.dtype())
      throw DTypeError(std::string(what) + ": q, k, v (and o, dout) must share one dtype",
                       std::string(dtype_name(q.dtype())) + " (q's dtype)", std::string(dtype_name(o->dtype())),
                       "cast them all to one dtype with astype");
  return t;
}

void attention_lse_f32(const char* what, const Tensor& lse) {
  if (lse.dtype() != DType::f32)
    throw DTypeError(std::string(what) + ": the row logsumexp must be f32 on CUDA", "f32",
                     std::string(dtype_name(lse.dtype())), "allocate lse as f32 for f32 / bf16 / f16 inputs");
}

struct AttentionDims {
  int64_t N, Tq, Tk, D;
};

// q [..., Tq, D], k [..., Tk, D] (the leading axes flattened to N, as the CPU twin); D <= 128.
AttentionDims attention_dims(const char* what, const Tensor& q, const Tensor& k) {
  const int r = q.dim();
  if (r < 2 || k.dim() != r)
    throw ShapeError(std::string(what) + ": q and k must be [..., T, D] of one rank >= 2",
                     "q [..., Tq, D], k [..., Tk, D]", "q " + q.shape().str() + ", k " + k.shape().str(),
                     "keep the batch and head axes in front: [B, heads, T, head_dim]");
  int64_t N = 1;
  for (int d = 0; d < r - 2; ++d) N *= q.shape()[d];
  const AttentionDims a{N, q.shape()[r - 2], k.shape()[r - 2], q.shape()[r - 1]};
  if (a.D > kMaxAttentionHeadDim)
    throw ShapeError(std::string(what) + ": head dimension too large for the CUDA attention kernels",
                     "D <= " + std::to_string(kMaxAttentionHeadDim),
                     "D = " + std::to_string(a.D) + " (q " + q.shape().str() + ")",
                     "use more heads of at most 128 features each, or compute the attention as matmul + softmax + "
                     "matmul");
  return a;
}
}  // namespace

std::optional<AttnRows> attention_rows(const Tensor& t) {
  const int r = t.dim();
  if (r < 2) return std::nullopt;
  const Shape& sh = t.shape();
  const Shape& st = t.strides();
  if (sh[r - 1] > 1 && st[r - 1] != 1) return std::nullopt;
  // The leading axes of more than one element, adjacent ones merged where one stride steps over the other
  // (a contiguous [B, heads] is one axis of B * heads): at most two may remain, [batch, heads].
  std::vector<std::pair<int64_t, int64_t>> axes;  // (extent, stride), outermost first
  for (int d = 0; d < r - 2; ++d) {
    if (sh[d] == 1) continue;
    if (!axes.empty() && axes.back().second == st[d] * sh[d]) axes.back() = {axes.back().first * sh[d], st[d]};
    else axes.emplace_back(sh[d], st[d]);
  }
  if (axes.size() > 2) return std::nullopt;
  AttnRows rows;
  rows.row = sh[r - 2] > 1 ? st[r - 2] : 0;
  if (axes.size() == 2) rows.heads = axes[1].first, rows.head = axes[1].second;
  if (!axes.empty()) rows.batch = axes[0].second;
  return rows;
}

namespace {
// An attention operand as the kernels read it: t itself where attention_rows takes it, else a contiguous
// copy (an interleaved or transposed view).
struct AttnOperand {
  Tensor t;
  AttnRows rows;
};
AttnOperand attention_operand(const Tensor& t) {
  if (std::optional<AttnRows> r = attention_rows(t)) return {t, *r};
  Tensor c = t.detach().contiguous();
  return {c, *attention_rows(c)};
}
// An output: written in place where attention_rows takes it without a zero stride (no element twice).
AttnRows attention_output(const char* what, const Tensor& t) {
  const std::optional<AttnRows> r = attention_rows(t);
  bool ok = r.has_value();
  for (int d = 0; ok && d < t.dim(); ++d) ok = t.shape()[d] == 1 || t.strides()[d] != 0;
  if (!ok)
    throw ValueError(std::string(what) + ": an output's layout is not one the kernels write",
                     "[..., T, D] with contiguous rows and no broadcast axis (e.g. contiguous)",
                     t.shape().str() + " with strides " + t.strides().str(),
                     "allocate the output contiguous");
  return *r;
}
}  // namespace

void attention_forward(const Tensor& q0, const Tensor& k0, const Tensor& v0, bool causal, double scale, Tensor& o,
                       Tensor& lse) {
  const char* nm = "attention_forward";
  const Dt t = attention_dtype(nm, q0, {&k0, &v0, &o});
  attention_lse_f32(nm, lse);
  const AttentionDims a = attention_dims(nm, q0, k0);
  if (a.N == 0 || a.Tq == 0) return;  // o and lse are empty
  const AttnOperand q = attention_operand(q0), k = attention_operand(k0), v = attention_operand(v0);
  AttentionLayout L;
  L.q = q.rows, L.k = k.rows, L.v = v.rows, L.o = attention_output(nm, o);
  const void *qp = q.t.raw_data(), *kp = k.t.raw_data(), *vp = v.t.raw_data();
  const bool mma = attention_tensor_cores() &&
                   attention_mma_supported(t, a.D, scale, {qp, kp, vp, o.raw_data()}, {L.q, L.k, L.v, L.o});
  float* lp = static_cast<float*>(lse.raw_data());
  if (mma)
    check(launch_attention_forward_mma(t, qp, kp, vp, L, a.N, a.Tq, a.Tk, a.D, causal, scale, o.raw_data(), lp,
                                       attention_rows_per_warp() == 16, stream_of(o)),
          nm);
  else
    check(launch_attention_forward(t, qp, kp, vp, L, a.N, a.Tq, a.Tk, a.D, causal, scale, o.raw_data(), lp, stream_of(o)),
          nm);
}

void attention_backward(const Tensor& q0, const Tensor& k0, const Tensor& v0, const Tensor& o0, const Tensor& lse,
                        const Tensor& dout0, bool causal, double scale, Tensor& dq, Tensor& dk, Tensor& dv) {
  const char* nm = "attention_backward";
  const Dt t = attention_dtype(nm, q0, {&k0, &v0, &o0, &dout0, &dq, &dk, &dv});
  attention_lse_f32(nm, lse);
  const AttentionDims a = attention_dims(nm, q0, k0);
  if (a.N == 0) return;  // every gradient is empty
  const AttnOperand q = attention_operand(q0), k = attention_operand(k0), v = attention_operand(v0),
                    o = attention_operand(o0), dout = attention_operand(dout0);
  AttentionLayout L;
  L.q = q.rows, L.k = k.rows, L.v = v.rows, L.o = o.rows, L.dout = dout.rows;
  L.dq = attention_output(nm, dq), L.dk = attention_output(nm, dk), L.dv = attention_output(nm, dv);
  // delta_i = sum_d dout[i, d] o[i, d] (f32 scratch from the stream-ordered pool; released when this returns,
  // and any reuse is queued on the same stream after the kernels that read it).
  Tensor delta = empty(Shape{std::max<int64_t>(a.N * a.Tq, 1)}, DType::f32, q0.device());
  const void *qp = q.t.raw_data(), *kp = k.t.raw_data(), *vp = v.t.raw_data(), *op = o.t.raw_data(),
             *dop = dout.t.raw_data();
  const bool mma = attention_tensor_cores() &&
                   attention_mma_supported(t, a.D, scale, {qp, kp, vp, op, dop, dq.raw_data(), dk.raw_data(), dv.raw_data()},
                                           {L.q, L.k, L.v, L.o, L.dout, L.dq, L.dk, L.dv});
  const float* lp = static_cast<const float*>(lse.raw_data());
  float* dl = static_cast<float*>(delta.raw_data());
  if (!mma) {
    check(launch_attention_backward(t, qp, kp, vp, op, lp, dop, L, a.N, a.Tq, a.Tk, a.D, causal, scale, dq.raw_data(),
                                    dk.raw_data(), dv.raw_data(), dl, stream_of(dq)),
          nm);
    return;
  }
  // The fused backward's f32 dq accumulator (pool scratch, as delta).
  Tensor dq_accum;
  if (!attention_deterministic()) dq_accum = empty(Shape{std::max<int64_t>(a.N * a.Tq * a.D, 1)}, DType::f32, q0.device());
  float* acc = dq_accum.defined() ? static_cast<float*>(dq_accum.raw_data()) : nullptr;
  check(launch_attention_backward_mma(t, qp, kp, vp, op, lp, dop, L, a.N, a.Tq, a.Tk, a.D, causal, scale, dq.raw_data(),
                                      dk.raw_data(), dv.raw_data(), dl, acc, attention_rows_per_warp() == 16, stream_of(dq)),
        nm);
}

namespace {
// A switch that is on unless the environment variable says 0.
bool on_unless_zero(const char* var) {
  const char* e = std::getenv(var);
  return !(e && std::string(e) == "0");
}
std::atomic<bool> g_attention_mma{on_unless_zero("TITANAX_ATTENTION_MMA")};
std::atomic<bool> g_attention_deterministic{on_unless_zero("TITANAX_ATTENTION_DETERMINISTIC")};
std::atomic<int> g_attention_rows{32};
}  // namespace

bool attention_tensor_cores() { return g_attention_mma.load(); }
void set_attention_tensor_cores(bool on) { g_attention_mma.store(on); }

bool attention_deterministic() { return g_attention_deterministic.load(); }
void set_attention_deterministic(bool on) { g_attention_deterministic.store(on); }
int attention_rows_per_warp() { return g_attention_rows.load(); }
void set_attention_rows_per_warp(int rows) {
  if (rows != 16 && rows != 32)
    throw ValueError("set_attention_rows_per_warp: rows per warp of the tensor-core attention kernels", "16 or 32",
                     std::to_string(rows), "pass 32 (the default) or 16");
  g_attention_rows.store(rows);
}

namespace {
std::atomic<bool> g_tf32{false};

}  // namespace

bool allow_tf32() { return g_tf32.load(); }
void set_allow_tf32(bool on) { g_tf32.store(on); }

namespace {
// The device pointer of an update's scalars (f64 [UpdateScalars::size], contiguous, on like's device), or
// null for none.
const double* scalars_ptr(const Tensor* t, const Tensor& like, const char* what) {
  if (!t) return nullptr;
  if (t->dtype() != DType::f64 || t->numel() != UpdateScalars::size || !t->is_contiguous() || !(t->device() == like.device()))
    throw ValueError(std::string(what) + ": the step's scalars must be f64 [4], contiguous, on the parameters' GPU",
                     "f64[4] on " + like.device().str(), t->str());
  return static_cast<const double*>(t->raw_data());
}
}  // namespace

void adam_update(const std::vector<Tensor>& p, const std::vector<Tensor>& g, const std::vector<Tensor>& m,
                 const std::vector<Tensor>& v, const UpdateScalars& sc, double b1, double b2, double eps, double wd,
                 bool decoupled, const Tensor* device_scalars) {
  if (p.empty()) return;
  const Dt dt = floating(p[0], "adam_update");
  const double* sd = scalars_ptr(device_scalars, p[0], "adam_update");
  for (size_t s = 0; s < p.size(); s += kMaxTensors) {
    TensorChunk c;
    for (size_t i = s; i < std::min(p.size(), s + kMaxTensors); ++i, ++c.count) {
      c.p[c.count] = p[i].raw_data();
      c.g[c.count] = g[i].raw_data();
      c.m[c.count] = m[i].raw_data();
      c.v[c.count] = v[i].raw_data();
      c.n[c.count] = p[i].numel();
    }
    check(launch_adam(dt, c, sc, sd, b1, b2, eps, wd, decoupled, stream_of(p[0])), "adam_update");
  }
}

void sum_squares(const std::vector<Tensor>& xs, Tensor& out) {
  // The partials: tensor by tensor, kSquaresChunk elements each; launches group up to kMaxTensors tensors
  // of one dtype.
  std::vector<int64_t> first(xs.size());
  int64_t P = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    any_floating(xs[i], "sum_squares");
    first[i] = P;
    P += (xs[i].numel() + kSquaresChunk - 1) / kSquaresChunk;
  }
  const Tensor partial = empty(Shape{std::max<int64_t>(P, 1)}, DType::f64, out.device());
  auto* part = static_cast<double*>(partial.raw_data());
  for (size_t s = 0; s < xs.size();) {
    SquaresChunk c;
    const DType dt = xs[s].dtype();
    for (; s < xs.size() && c.count < kMaxTensors && xs[s].dtype() == dt; ++s, ++c.count) {
      c.x[c.count] = xs[s].raw_data();
      c.n[c.count] = xs[s].numel();
      c.first[c.count] = first[s];
    }
    check(launch_sum_squares(to_dt(dt, "sum_squares"), c, part, stream_of(out)), "sum_squares");
  }
  check(launch_sum_partials(part, P, static_cast<double*>(out.raw_data()), stream_of(out)), "sum_squares");
}

void sgd_update(const std::vector<Tensor>& p, const std::vector<Tensor>& g, const std::vector<Tensor>& buf,
                const UpdateScalars& sc, double mu, double wd, bool nesterov, const Tensor* device_scalars) {
  if (p.empty()) return;
  const Dt dt = floating(p[0], "sgd_update");
  const double* sd = scalars_ptr(device_scalars, p[0], "sgd_update");
  for (size_t s = 0; s < p.size(); s += kMaxTensors) {
    TensorChunk c;
    for (size_t i = s; i < std::min(p.size(), s + kMaxTensors); ++i, ++c.count) {
      c.p[c.count] = p[i].raw_data();
      c.g[c.count] = g[i].raw_data();
      c.m[c.count] = (i < buf.size() && buf[i].defined()) ? buf[i].raw_data() : nullptr;
      c.n[c.count] = p[i].numel();
    }
    check(launch_sgd(dt, c, sc, sd, mu, wd, nesterov, stream_of(p[0])), "sgd_update");
  }
}

void set_update_scalars(Tensor& dst, const UpdateScalars& s) {
  double* d = const_cast<double*>(scalars_ptr(&dst, dst, "set_update_scalars"));
  check(launch_set_update_scalars(d, s, stream_of(dst)), "set_update_scalars");
}

}  // namespace titanax::kernels::cuda
