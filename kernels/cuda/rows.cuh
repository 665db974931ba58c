// The row kernels of kernels/cuda/nn.cu (which launches them) as block bodies over a policy of hardware
// primitives (kernels/cuda/hw_policy.h), so that tests/emulated/ runs them on the CPU too: softmax /
// log-softmax over rows, cross-entropy (the labels' check and count, forward, backward, both fused, the
// total), layer norm forward and backward. One block per row (grid-stride over rows), block reductions
// by warp shuffles, an optional shared-memory copy of the row for a second pass; layer norm also a warp
// per row with the row in registers, and its dw / db in chunks of rows. Row statistics accumulate in
// double as on the CPU (kernels/cpu/nn.h: the same formulas, in another summation order).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/half.cuh"
#include "kernels/cuda/hw_policy.h"

namespace titanax::kernels::cuda::row_kernels {

template <class T> TX_HW_FN T dexp(T v) { return exp(v); }
template <> TX_HW_FN float dexp(float v) { return expf(v); }

// Row max (x > m ? x : m, as the CPU row_max) and sum of exp(x - max) in double, over the whole block, in
// one read of the row (online softmax: Milakov & Gimelshein 2018, arXiv 1805.02867): each thread keeps a
// running max and a sum relative to it, rescaled by exp(old - new) when the max grows; the block then
// rescales every thread's sum to the row's max and adds them. The same values as the CPU's two passes up
// to rounding; NaN and +inf propagate to s as there, and an all -inf row gives s = 0 (CPU: NaN), which
// every caller turns into the same NaN results. With a `cache` (shared memory for n elements), each thread
// also stores the elements it reads there, for the caller's next pass over the row: the same thread reads
// them back (the same j), so that pass needs no barrier and no second read of global memory.
// T: the storage type (f16 / bf16 elements widen to f32 on load, exactly; the cache keeps them as stored).
template <class Hw, class T>
TX_HW_FN void row_stats(const T* xr, int64_t n, compute_t<T>& m, double& s, T* cache) {
  using C = compute_t<T>;
  C lm = C(-INFINITY);
  double ls = 0;
  TX_UNROLL_4
  for (int64_t j = Hw::thread(); j < n; j += Hw::threads()) {
    const T raw = xr[j];
    if (cache) cache[j] = raw;
    const C v = widen(raw);
    if (v > lm) {
      ls = ls * double(dexp(C(lm - v))) + 1.0;
      lm = v;
    } else if (!(v == C(-INFINITY))) {  // -inf adds exp(-inf) = 0, even to a running max of -inf
      ls += double(dexp(C(v - lm)));
    }
  }
  m = block_max_of<Hw>(lm, C(-INFINITY));
  s = block_sum_of<Hw>(lm == C(-INFINITY) ? ls : ls * double(dexp(C(lm - m))));  // ls: 0, or NaN from a NaN
}

// `cache`: null, or shared memory for n elements (see row_stats).
template <class Hw, class T>
TX_HW_FN void softmax_rows(const T* x, T* y, int64_t rows, int64_t n, bool log, T* cache) {
  for (int64_t r = Hw::block_x(); r < rows; r += Hw::grid_x()) {
    T* yr = y + r * n;
    compute_t<T> m;
    double s;
    row_stats<Hw>(x + r * n, n, m, s, cache);
    const T* xr = cache ? cache : x + r * n;
    if (log) {
      const T lse = T(::log(s));
      for (int64_t j = Hw::thread(); j < n; j += Hw::threads()) yr[j] = (xr[j] - m) - lse;
    } else {
      const T inv = T(1.0 / s);
      for (int64_t j = Hw::thread(); j < n; j += Hw::threads()) yr[j] = dexp(T(xr[j] - m)) * inv;
    }
  }
}

// Softmax / log-softmax over the middle axis of [outer, n, inner] (inner > 1), one thread per column (any
// grid), as the CPU's column path: the column max, then the sum of exp in f64.
template <class Hw, class T>
TX_HW_FN void softmax_cols(const T* x, T* y, int64_t outer, int64_t n, int64_t inner, bool log) {
  for (int64_t c = grid_index<Hw>(); c < outer * inner; c += grid_stride<Hw>()) {
    const int64_t o = c / inner, b = c % inner;
    const T* xo = x + o * n * inner + b;
    T* yo = y + o * n * inner + b;
    T m = T(-INFINITY);
    for (int64_t i = 0; i < n; ++i) m = plain_max_of(m, xo[i * inner]);
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += double(dexp(T(xo[i * inner] - m)));
    if (log) {
      const T lse = T(::log(s));
      for (int64_t i = 0; i < n; ++i) yo[i * inner] = (xo[i * inner] - m) - lse;
    } else {
      const T inv = T(1.0 / s);
      for (int64_t i = 0; i < n; ++i) yo[i * inner] = dexp(T(xo[i * inner] - m)) * inv;
    }
  }
}

// One block: counts the labels that are not `ignore` into *count (mean's divisor) and reports one
// outside [0, C).
template <class Hw, class L>
TX_HW_FN void ce_labels(const L* lab, int64_t R, int64_t C, int64_t ignore, int64_t* count, ReportSlot slot) {
  double n = 0;
  for (int64_t r = Hw::thread(); r < R; r += Hw::threads()) {
    const int64_t l = int64_t(lab[r]);
    if (l == ignore) continue;
    if (l < 0 || l >= C) Hw::report(slot, kLabelOutOfRange, r, l, C, ignore);
    else n += 1;
  }
  n = block_sum_of<Hw>(n);
  if (Hw::thread() == 0) *count = int64_t(n);
}

TX_HW_FN bool bad_label(int64_t l, int64_t C) { return l < 0 || l >= C; }

// The cross-entropy of logits stored as T computes in compute_t<T> (f32 for f16 / bf16 logits): its loss
// (and so the cotangent of the loss) has that type, the gradient is rounded to T once, so that 16-bit
// logits give bitwise the loss and the rounded gradient of their f32 copy, without the copy.

// Row r's loss (0 when ignored, NaN for a bad label: reported by k_ce_labels) from the row's statistics.
template <class T>
TX_HW_FN double ce_row_loss(const T* xr, int64_t l, int64_t C, int64_t ignore, compute_t<T> m, double s) {
  if (l == ignore) return 0;
  if (bad_label(l, C)) return double(NAN);
  return double(m) + ::log(s) - double(widen(xr[l]));
}

// Row r's loss into out[r] (none) or rows[r] (summed later), by thread 0. LT: the loss type.
template <class Hw, class LT>
TX_HW_FN void ce_store_loss(double loss, int64_t r, int red, LT* out, double* rows) {
  if (Hw::thread() == 0) {
    if (red == 2) out[r] = LT(loss);
    else rows[r] = loss;
  }
}

// The backward's scale of every row for sum / mean (none: ct[r] per row). LT: the loss type.
template <class LT>
TX_HW_FN double ce_uniform_scale(const LT* ct, int red, const int64_t* count) {
  if (red == 1) return double(ct[0]);
  if (red == 0) return *count > 0 ? double(ct[0]) / double(*count) : 0.0;
  return 0;
}

// A row of dlogits: softmax(x) * scale from the row's statistics (max m, sum s of exp(x - m) over the
// whole vocabulary), minus scale at column `hot` (none when hot is outside [0, C)).
template <class Hw, class T>
TX_HW_FN void softmax_xent_row_grad(const T* xr, int64_t C, int64_t hot, double scale, compute_t<T> m, double s, T* dr) {
  using CT = compute_t<T>;
  const CT k = CT(scale / s);
  for (int64_t j = Hw::thread(); j < C; j += Hw::threads()) {
    CT v = dexp(CT(widen(xr[j]) - m)) * k;
    if (j == hot) v -= CT(scale);
    dr[j] = narrow<T>(v);
  }
}
template <class Hw, class T>
TX_HW_FN void fill_row(T* dr, int64_t C, T v) {
  for (int64_t j = Hw::thread(); j < C; j += Hw::threads()) dr[j] = v;
}

// Row r of dlogits: (softmax - onehot) * scale from the row's statistics; 0 for an ignored row, NaN for a
// bad label (reported by k_ce_labels).
template <class Hw, class T>
TX_HW_FN void ce_row_grad(const T* xr, int64_t label, int64_t C, int64_t ignore, double scale, compute_t<T> m, double s,
                          T* dr) {
  if (label == ignore || bad_label(label, C)) fill_row<Hw>(dr, C, store_as<T>(label == ignore ? 0.0 : double(NAN)));
  else softmax_xent_row_grad<Hw>(xr, C, label, scale, m, s, dr);
}

// Row statistics for the loss and gradient of a row whose label counts (zeros for an ignored or bad
// label, whose row needs none); block-uniform, as row_stats synchronises the block.
// Returns where the row's gradient pass reads it: `cache` when given (and filled), else xr.
template <class Hw, class T>
TX_HW_FN const T* ce_row_stats(const T* xr, int64_t l, int64_t C, int64_t ignore, compute_t<T>& m, double& s, T* cache) {
  m = compute_t<T>(0);
  s = 0;
  if (l != ignore && !bad_label(l, C)) row_stats<Hw>(xr, C, m, s, cache);
  return cache ? cache : xr;
}

// The forward, and with dx (and ct, count) the backward in the same pass over each row: its statistics
// once, then its loss and its gradient (the gradient bitwise what ce_backward gives). `cache`: null, or
// shared memory for C elements (see row_stats; only the gradient reads the row again).
template <class Hw, class T, class L>
TX_HW_FN void ce_fused(const T* x, const L* lab, const compute_t<T>* ct, int64_t R, int64_t C, int64_t ignore, int red,
                       const int64_t* count, compute_t<T>* out, double* rows, T* dx, T* cache) {
  const double uniform = dx ? ce_uniform_scale(ct, red, count) : 0.0;
  for (int64_t r = Hw::block_x(); r < R; r += Hw::grid_x()) {
    const int64_t l = int64_t(lab[r]);
    const T* xr = x + r * C;
    compute_t<T> m;
    double s;
    const T* src = ce_row_stats<Hw>(xr, l, C, ignore, m, s, dx ? cache : nullptr);
    ce_store_loss<Hw>(ce_row_loss(xr, l, C, ignore, m, s), r, red, out, rows);
    if (dx) ce_row_grad<Hw>(src, l, C, ignore, red == 2 ? double(ct[r]) : uniform, m, s, dx + r * C);
    Hw::sync();
  }
}

// Sum of the row losses by one block with a fixed partition: deterministic run to run.
template <class Hw, class T>
TX_HW_FN void ce_total(const double* rows, int64_t R, int red, const int64_t* count, T* out) {
  double s = 0;
  for (int64_t r = Hw::thread(); r < R; r += Hw::threads()) s += rows[r];
  s = block_sum_of<Hw>(s);
  if (Hw::thread() == 0) {
    if (red == 0) s = *count > 0 ? s / double(*count) : 0.0;
    out[0] = T(s);
  }
}

// `cache`: null, or shared memory for C elements (see row_stats).
template <class Hw, class T, class L>
TX_HW_FN void ce_backward(const T* x, const L* lab, const compute_t<T>* ct, int64_t R, int64_t C, int64_t ignore, int red,
                          const int64_t* count, T* dx, T* cache) {
  const double uniform = ce_uniform_scale(ct, red, count);
  for (int64_t r = Hw::block_x(); r < R; r += Hw::grid_x()) {
    const int64_t l = int64_t(lab[r]);
    const T* xr = x + r * C;
    compute_t<T> m;
    double s;
    const T* src = ce_row_stats<Hw>(xr, l, C, ignore, m, s, cache);
    ce_row_grad<Hw>(src, l, C, ignore, red == 2 ? double(ct[r]) : uniform, m, s, dx + r * C);
  }
}

// ---- the vocabulary-parallel cross-entropy's shard kernels (parallel/tp.cpp): a block per row of this
// rank's logits [R, C] (columns lo .. lo + C - 1 of the vocabulary); the all-reduces between them run on
// the host's communicator. The same quantities as kernels/cpu/nn.h ce_shard_*.

/// gmax[r] = the row's maximum (x > m ? x : m, as the CPU's row_max), as a double.
template <class Hw, class T>
TX_HW_FN void ce_shard_max(const T* x, int64_t R, int64_t C, double* gmax) {
  for (int64_t r = Hw::block_x(); r < R; r += Hw::grid_x()) {
    T lm = T(-INFINITY);
    for (int64_t j = Hw::thread(); j < C; j += Hw::threads()) lm = plain_max_of(lm, x[r * C + j]);
    const T m = block_max_of<Hw>(lm, T(-INFINITY));
    if (Hw::thread() == 0) gmax[r] = double(m);
  }
}

/// With the global row maxima gmax: part[r] = sum_j exp(x[r, j] - gmax[r]) (exp in T, summed in double)
/// and part[R + r] = x[r, label_r - lo] when the label falls in this shard, else 0.
template <class Hw, class T, class L>
TX_HW_FN void ce_shard_partials(const T* x, const L* lab, int64_t R, int64_t C, int64_t lo, const double* gmax, double* part) {
  for (int64_t r = Hw::block_x(); r < R; r += Hw::grid_x()) {
    const T m = T(gmax[r]);
    double ls = 0;
    for (int64_t j = Hw::thread(); j < C; j += Hw::threads()) ls += double(dexp(T(x[r * C + j] - m)));
    const double s = block_sum_of<Hw>(ls);
    if (Hw::thread() == 0) {
      const int64_t j = int64_t(lab[r]) - lo;
      part[r] = s;
      part[R + r] = j >= 0 && j < C ? double(x[r * C + j]) : 0.0;
    }
  }
}

/// dx [R, C] = (exp(x - gmax_r) / sumexp_r - [lo + j == label_r]) * scale_r from stats f64 [2, R] =
/// (gmax, sumexp); scale_r = ct[r] (red 2, none), ct[0] (1, sum) or ct[0] / count (0, mean; 0 when count
/// is 0); 0 on ignored rows. The labels were checked on the host.
template <class Hw, class T, class L>
TX_HW_FN void ce_shard_backward(const T* x, const L* lab, const T* ct, int64_t R, int64_t C, int64_t lo, const double* stats,
                                int64_t ignore, int red, int64_t count, T* dx) {
  const double uniform = red == 1 ? double(ct[0]) : red == 0 && count > 0 ? double(ct[0]) / double(count) : 0.0;
  for (int64_t r = Hw::block_x(); r < R; r += Hw::grid_x()) {
    const int64_t l = int64_t(lab[r]);
    if (l == ignore) fill_row<Hw>(dx + r * C, C, T(0));
    else softmax_xent_row_grad<Hw>(x + r * C, C, l - lo, red == 2 ? double(ct[r]) : uniform, T(stats[r]), stats[R + r], dx + r * C);
  }
}

// The per-element formulas of layer norm, shared by the block-per-row and warp-per-row bodies: y from x,
// the weighted gradient g = dy * w, and dx from g (xh = (x - mean) * rstd, m1 = mean(g), m2 = mean(g xh)).
template <class T>
TX_HW_FN T ln_y(T x, T tm, T ts, const T* w, const T* b, int64_t j) {
  T v = (x - tm) * ts;
  if (w) v *= w[j];
  if (b) v += b[j];
  return v;
}
template <class T>
TX_HW_FN double ln_g(T dy, const T* w, int64_t j) { return double(dy) * (w ? double(w[j]) : 1.0); }
template <class T>
TX_HW_FN T ln_dx(double g, T x, double mean, double rstd, double m1, double m2) {
  const double xh = (double(x) - mean) * rstd;
  return T(rstd * (g - m1 - xh * m2));
}
// dx as stored: plus the residual gradient's element when there is one, added in T after dx is rounded
// and never contracted with dx's product (add_rn: bitwise what a separate add of the two gives).
template <class T>
TX_HW_FN T ln_dx_plus(T dx, const T* res, int64_t j) {
  return res ? add_rn(dx, res[j]) : dx;
}

template <class Hw, class T>
TX_HW_FN void row_moments(const T* xr, int64_t D, double eps, double& mean, double& rstd) {
  double s = 0;
  for (int64_t j = Hw::thread(); j < D; j += Hw::threads()) s += double(xr[j]);
  mean = block_sum_of<Hw>(s) / double(D);
  double v = 0;
  for (int64_t j = Hw::thread(); j < D; j += Hw::threads()) {
    const double d = double(xr[j]) - mean;
    v += d * d;
  }
  rstd = 1.0 / ::sqrt(block_sum_of<Hw>(v) / double(D) + eps);
}

template <class Hw, class T>
TX_HW_FN void layer_norm(const T* x, const T* w, const T* b, int64_t R, int64_t D, double eps, T* y) {
  for (int64_t r = Hw::block_x(); r < R; r += Hw::grid_x()) {
    const T* xr = x + r * D;
    T* yr = y + r * D;
    double mean, rstd;
    row_moments<Hw>(xr, D, eps, mean, rstd);
    const T tm = T(mean), ts = T(rstd);
    for (int64_t j = Hw::thread(); j < D; j += Hw::threads()) yr[j] = ln_y(xr[j], tm, ts, w, b, j);
  }
}

template <class Hw, class T>
TX_HW_FN void layer_norm_dx(const T* dy, const T* x, const T* w, const T* res, int64_t R, int64_t D, double eps, T* dx,
                            double* stats) {
  for (int64_t r = Hw::block_x(); r < R; r += Hw::grid_x()) {
    const T* xr = x + r * D;
    const T* gr = dy + r * D;
    double mean, rstd;
    row_moments<Hw>(xr, D, eps, mean, rstd);
    if (Hw::thread() == 0 && stats) stats[2 * r] = mean, stats[2 * r + 1] = rstd;
    double s1 = 0, s2 = 0;
    for (int64_t j = Hw::thread(); j < D; j += Hw::threads()) {
      const double g = ln_g(gr[j], w, j);
      s1 += g;
      s2 += g * (double(xr[j]) - mean) * rstd;
    }
    const double m1 = block_sum_of<Hw>(s1) / double(D), m2 = block_sum_of<Hw>(s2) / double(D);
    T* dr = dx + r * D;
    const T* rr = res ? res + r * D : nullptr;
    for (int64_t j = Hw::thread(); j < D; j += Hw::threads())
      dr[j] = ln_dx_plus(ln_dx(ln_g(gr[j], w, j), xr[j], mean, rstd, m1, m2), rr, j);
  }
}

// ---- layer norm, a warp per row: f32, D a multiple of 4 and at most 128 kLnWarpVecs, every pointer 16-byte
// aligned (ln_warp_rows). A lane holds its row's elements in registers (float4 lane + 32 i), so the row is
// read from memory once and the reductions are warp shuffles, with no block barrier; a block of W warps
// has W rows in flight. Same formulas as above (a summation order of their own).
constexpr int kLnWarpVecs = 8;  // D <= 1024: GPT-2's 768, BERT's 1024
constexpr bool ln_warp_rows(int64_t D) { return D % 4 == 0 && D > 0 && D <= 128 * kLnWarpVecs; }
/// The float4 per lane (KV) the warp bodies are instantiated with for a width D that ln_warp_rows takes:
/// the fewest of 2, 4, 6, 8 that hold the row, so that its registers leave room for more blocks per SM
/// (GPT-2's 768 takes 6).
constexpr int ln_warp_vecs(int64_t D) {
  const int64_t v = (D + 127) / 128;
  return v <= 2 ? 2 : v <= 4 ? 4 : v <= 6 ? 6 : 8;
}
/// body(std::integral_constant<int, KV>{}) with KV = ln_warp_vecs(D).
template <class Body>
void with_ln_warp_vecs(int64_t D, Body body) {
  static_assert(kLnWarpVecs == 8, "the instantiations below cover up to 8 float4 per lane");
  switch (ln_warp_vecs(D)) {
    case 2: body(std::integral_constant<int, 2>{}); break;
    case 4: body(std::integral_constant<int, 4>{}); break;
    case 6: body(std::integral_constant<int, 6>{}); break;
    default: body(std::integral_constant<int, 8>{}); break;
  }
}

TX_HW_FN float f4_at(const float4& v, int e) { return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w; }

// The row's KV float4 at `row` (those at lane + 32 i < D / 4; zeros beyond).
template <int KV>
TX_HW_FN void warp_row_load(float4 (&v)[KV], const float* row, int64_t D, int lane) {
  TX_UNROLL
  for (int i = 0; i < KV; ++i) v[i] = lane + 32 * i < D / 4 ? load_f4(row + 4 * (lane + 32 * i)) : float4{0.f, 0.f, 0.f, 0.f};
}

template <class Hw, int KV>
TX_HW_FN void warp_row_moments(const float4 (&v)[KV], int64_t D, int lane, double eps, double& mean, double& rstd) {
  double s = 0;
  TX_UNROLL
  for (int i = 0; i < KV; ++i)
    TX_UNROLL
    for (int e = 0; e < 4; ++e) s += double(f4_at(v[i], e));  // the zeros beyond D add nothing
  mean = warp_sum_of<Hw>(s) / double(D);
  double q = 0;
  TX_UNROLL
  for (int i = 0; i < KV; ++i)
    if (lane + 32 * i < D / 4)
      TX_UNROLL
      for (int e = 0; e < 4; ++e) {
        const double d = double(f4_at(v[i], e)) - mean;
        q += d * d;
      }
  rstd = 1.0 / ::sqrt(warp_sum_of<Hw>(q) / double(D) + eps);
}

// Stores f(i, e, j) (element e of the lane's float4 i, at column j) to the lane's share of `row`.
template <int KV, class F>
TX_HW_FN void warp_row_store(float* row, int64_t D, int lane, F f) {
  TX_UNROLL
  for (int i = 0; i < KV; ++i) {
    const int64_t j = 4 * (lane + 32 * i);
    if (j >= D) continue;
    float o[4];
    TX_UNROLL
    for (int e = 0; e < 4; ++e) o[e] = f(i, e, j + e);
    store_f4(row + j, float4{o[0], o[1], o[2], o[3]});
  }
}

// The warp's first row and the rows' stride over the grid.
template <class Hw>
TX_HW_FN int64_t warp_row0() { return int64_t(Hw::block_x()) * (Hw::threads() >> 5) + (Hw::thread() >> 5); }
template <class Hw>
TX_HW_FN int64_t warp_rows_stride() { return int64_t(Hw::grid_x()) * (Hw::threads() >> 5); }

template <class Hw, int KV>
TX_HW_FN void layer_norm_warp(const float* x, const float* w, const float* b, int64_t R, int64_t D, double eps, float* y) {
  const int lane = Hw::thread() & 31;
  for (int64_t r = warp_row0<Hw>(); r < R; r += warp_rows_stride<Hw>()) {
    float4 v[KV];
    warp_row_load(v, x + r * D, D, lane);
    double mean, rstd;
    warp_row_moments<Hw>(v, D, lane, eps, mean, rstd);
    const float tm = float(mean), ts = float(rstd);
    warp_row_store<KV>(y + r * D, D, lane, [&](int i, int e, int64_t j) { return ln_y(f4_at(v[i], e), tm, ts, w, b, j); });
  }
}

template <class Hw, int KV>
TX_HW_FN void layer_norm_dx_warp(const float* dy, const float* x, const float* w, const float* res, int64_t R, int64_t D,
                                 double eps, float* dx, double* stats) {
  const int lane = Hw::thread() & 31;
  for (int64_t r = warp_row0<Hw>(); r < R; r += warp_rows_stride<Hw>()) {
    float4 xv[KV], gv[KV];
    warp_row_load(xv, x + r * D, D, lane);
    warp_row_load(gv, dy + r * D, D, lane);
    double mean, rstd;
    warp_row_moments<Hw>(xv, D, lane, eps, mean, rstd);
    if (lane == 0 && stats) stats[2 * r] = mean, stats[2 * r + 1] = rstd;
    double s1 = 0, s2 = 0;
    TX_UNROLL
    for (int i = 0; i < KV; ++i) {
      const int64_t j = 4 * (lane + 32 * i);
      if (j >= D) continue;
      TX_UNROLL
      for (int e = 0; e < 4; ++e) {
        const double g = ln_g(f4_at(gv[i], e), w, j + e);
        s1 += g;
        s2 += g * (double(f4_at(xv[i], e)) - mean) * rstd;
      }
    }
    const double m1 = warp_sum_of<Hw>(s1) / double(D), m2 = warp_sum_of<Hw>(s2) / double(D);
    const float* rr = res ? res + r * D : nullptr;
    warp_row_store<KV>(dx + r * D, D, lane, [&](int i, int e, int64_t j) {
      return ln_dx_plus(ln_dx(ln_g(f4_at(gv[i], e), w, j), f4_at(xv[i], e), mean, rstd, m1, m2), rr, j);
    });
  }
}

// dw / db in two deterministic stages (fixed assignment and order, no atomics). Stage 1: block (x: a tile
// of 32 columns, y: a chunk of kLnChunkRows rows); lane = column, so each warp's loads are coalesced, and
// warp w sums rows w, w + warps, ... of the chunk; the warps' sums are added in warp order into
// partial[chunk][column] (dw's, then db's after ln_chunks(R) * D of them). Stage 2 adds a column's chunks
// in chunk order. (Summing each column over all rows in one thread left D threads, 768 for GPT-2, walking
// B*T rows one dependent load after another.)
constexpr int64_t kLnChunkRows = 256;
constexpr int64_t ln_chunks(int64_t R) { return (R + kLnChunkRows - 1) / kLnChunkRows; }

template <class Hw, class T>
TX_HW_FN void layer_norm_dwdb_partial(const T* dy, const T* x, const double* stats, int64_t R, int64_t D,
                                      double* partial) {
  TX_SHARED double sw[32][32], sb[32][32];  // [warp][lane]
  const int lane = Hw::thread() & 31, w = Hw::thread() >> 5, nw = Hw::threads() >> 5;
  const int64_t chunks = ln_chunks(R), tiles = (D + 31) / 32;
  for (int64_t tile = Hw::block_x(); tile < tiles; tile += Hw::grid_x())
    for (int64_t ch = Hw::block_y(); ch < chunks; ch += Hw::grid_y()) {
      const int64_t c = tile * 32 + lane, end = (ch + 1) * kLnChunkRows < R ? (ch + 1) * kLnChunkRows : R;
      double aw = 0, ab = 0;
      if (c < D) {
        TX_UNROLL_4
        for (int64_t r = ch * kLnChunkRows + w; r < end; r += nw) {
          const double g = double(dy[r * D + c]);
          aw += g * (double(x[r * D + c]) - stats[2 * r]) * stats[2 * r + 1];
          ab += g;
        }
      }
      Hw::sync();  // every warp has read the previous (tile, chunk)'s sums
      sw[w][lane] = aw;
      sb[w][lane] = ab;
      Hw::sync();
      if (w == 0 && c < D) {
        double tw = 0, tb = 0;
        for (int i = 0; i < nw; ++i) tw += sw[i][lane], tb += sb[i][lane];
        partial[ch * D + c] = tw;
        partial[(chunks + ch) * D + c] = tb;
      }
    }
}

template <class Hw, class T>
TX_HW_FN void layer_norm_dwdb_total(const double* partial, int64_t R, int64_t D, T* dw, T* db) {
  const int64_t chunks = ln_chunks(R);
  for (int64_t c = grid_index<Hw>(); c < D; c += grid_stride<Hw>()) {
    double aw = 0, ab = 0;
    for (int64_t ch = 0; ch < chunks; ++ch) aw += partial[ch * D + c], ab += partial[(chunks + ch) * D + c];
    if (dw) dw[c] = T(aw);
    if (db) db[c] = T(ab);
  }
}

}  // namespace titanax::kernels::cuda::row_kernels
