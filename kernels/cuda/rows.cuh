// The row kernels of kernels/cuda/nn.cu (which launches them) as block bodies over a policy of hardware
// primitives (kernels/cuda/hw_policy.h), so that tests/emulated/ runs them on the CPU too: softmax /
// log-softmax over rows, cross-entropy (the labels' check and count, forward, backward, both fused, the
// total), layer norm forward and backward. One block per row (grid-stride over rows), block reductions
// by warp shuffles; row statistics accumulate in double as on the CPU (kernels/cpu/nn.h: the same
// formulas, in another summation order).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cuda/hw_policy.h"

namespace titanax::kernels::cuda::row_kernels {

template <class T> TX_HW_FN T dexp(T v) { return exp(v); }
template <> TX_HW_FN float dexp(float v) { return expf(v); }

// Row max (x > m ? x : m, as the CPU row_max) and sum of exp(x - max) in double, over the whole block, in
// one read of the row (online softmax: Milakov & Gimelshein 2018, arXiv 1805.02867): each thread keeps a
// running max and a sum relative to it, rescaled by exp(old - new) when the max grows; the block then
// rescales every thread's sum to the row's max and adds them. The same values as the CPU's two passes up
// to rounding; NaN and +inf propagate to s as there, and an all -inf row gives s = 0 (CPU: NaN), which
// every caller turns into the same NaN results.
template <class Hw, class T>
TX_HW_FN void row_stats(const T* xr, int64_t n, T& m, double& s) {
  T lm = T(-INFINITY);
  double ls = 0;
  TX_UNROLL_4
  for (int64_t j = Hw::thread(); j < n; j += Hw::threads()) {
    const T v = xr[j];
    if (v > lm) {
      ls = ls * double(dexp(T(lm - v))) + 1.0;
      lm = v;
    } else if (!(v == T(-INFINITY))) {  // -inf adds exp(-inf) = 0, even to a running max of -inf
      ls += double(dexp(T(v - lm)));
    }
  }
  m = block_max_of<Hw>(lm, T(-INFINITY));
  s = block_sum_of<Hw>(lm == T(-INFINITY) ? ls : ls * double(dexp(T(lm - m))));  // ls: 0, or NaN from a NaN
}

template <class Hw, class T>
TX_HW_FN void softmax_rows(const T* x, T* y, int64_t rows, int64_t n, bool log) {
  for (int64_t r = Hw::block_x(); r < rows; r += Hw::grid_x()) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    T m;
    double s;
    row_stats<Hw>(xr, n, m, s);
    if (log) {
      const T lse = T(::log(s));
      for (int64_t j = Hw::thread(); j < n; j += Hw::threads()) yr[j] = (xr[j] - m) - lse;
    } else {
      const T inv = T(1.0 / s);
      for (int64_t j = Hw::thread(); j < n; j += Hw::threads()) yr[j] = dexp(T(xr[j] - m)) * inv;
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

// Row r's loss (0 when ignored, NaN for a bad label: reported by k_ce_labels) from the row's statistics.
template <class T>
TX_HW_FN double ce_row_loss(const T* xr, int64_t l, int64_t C, int64_t ignore, T m, double s) {
  if (l == ignore) return 0;
  if (bad_label(l, C)) return double(NAN);
  return double(m) + ::log(s) - double(xr[l]);
}

// Row r's loss into out[r] (none) or rows[r] (summed later), by thread 0.
template <class Hw, class T>
TX_HW_FN void ce_store_loss(double loss, int64_t r, int red, T* out, double* rows) {
  if (Hw::thread() == 0) {
    if (red == 2) out[r] = T(loss);
    else rows[r] = loss;
  }
}

// The backward's scale of every row for sum / mean (none: ct[r] per row).
template <class T>
TX_HW_FN double ce_uniform_scale(const T* ct, int red, const int64_t* count) {
  if (red == 1) return double(ct[0]);
  if (red == 0) return *count > 0 ? double(ct[0]) / double(*count) : 0.0;
  return 0;
}

// Row r of dlogits: (softmax - onehot) * scale from the row's statistics; 0 for an ignored row, NaN for a
// bad label (reported by k_ce_labels).
template <class Hw, class T>
TX_HW_FN void ce_row_grad(const T* xr, int64_t label, int64_t C, int64_t ignore, double scale, T m, double s, T* dr) {
  if (label == ignore || bad_label(label, C)) {
    const T fill = label == ignore ? T(0) : T(double(NAN));
    for (int64_t j = Hw::thread(); j < C; j += Hw::threads()) dr[j] = fill;
    return;
  }
  const T k = T(scale / s);
  for (int64_t j = Hw::thread(); j < C; j += Hw::threads()) {
    T v = dexp(T(xr[j] - m)) * k;
    if (j == label) v -= T(scale);
    dr[j] = v;
  }
}

// Row statistics for the loss and gradient of a row whose label counts (zeros for an ignored or bad
// label, whose row needs none); block-uniform, as row_stats synchronises the block.
template <class Hw, class T>
TX_HW_FN void ce_row_stats(const T* xr, int64_t l, int64_t C, int64_t ignore, T& m, double& s) {
  m = T(0);
  s = 0;
  if (l != ignore && !bad_label(l, C)) row_stats<Hw>(xr, C, m, s);
}

// The forward, and with dx (and ct, count) the backward in the same pass over each row: its statistics
// once, then its loss and its gradient (the gradient bitwise what ce_backward gives).
template <class Hw, class T, class L>
TX_HW_FN void ce_fused(const T* x, const L* lab, const T* ct, int64_t R, int64_t C, int64_t ignore, int red,
                       const int64_t* count, T* out, double* rows, T* dx) {
  const double uniform = dx ? ce_uniform_scale(ct, red, count) : 0.0;
  for (int64_t r = Hw::block_x(); r < R; r += Hw::grid_x()) {
    const int64_t l = int64_t(lab[r]);
    const T* xr = x + r * C;
    T m;
    double s;
    ce_row_stats<Hw>(xr, l, C, ignore, m, s);
    ce_store_loss<Hw>(ce_row_loss(xr, l, C, ignore, m, s), r, red, out, rows);
    if (dx) ce_row_grad<Hw>(xr, l, C, ignore, red == 2 ? double(ct[r]) : uniform, m, s, dx + r * C);
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

template <class Hw, class T, class L>
TX_HW_FN void ce_backward(const T* x, const L* lab, const T* ct, int64_t R, int64_t C, int64_t ignore, int red,
                          const int64_t* count, T* dx) {
  const double uniform = ce_uniform_scale(ct, red, count);
  for (int64_t r = Hw::block_x(); r < R; r += Hw::grid_x()) {
    const int64_t l = int64_t(lab[r]);
    const T* xr = x + r * C;
    T m;
    double s;
    ce_row_stats<Hw>(xr, l, C, ignore, m, s);
    ce_row_grad<Hw>(xr, l, C, ignore, red == 2 ? double(ct[r]) : uniform, m, s, dx + r * C);
  }
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
    for (int64_t j = Hw::thread(); j < D; j += Hw::threads()) {
      T v = (xr[j] - tm) * ts;
      if (w) v *= w[j];
      if (b) v += b[j];
      yr[j] = v;
    }
  }
}

template <class Hw, class T>
TX_HW_FN void layer_norm_dx(const T* dy, const T* x, const T* w, int64_t R, int64_t D, double eps, T* dx,
                            double* stats) {
  for (int64_t r = Hw::block_x(); r < R; r += Hw::grid_x()) {
    const T* xr = x + r * D;
    const T* gr = dy + r * D;
    double mean, rstd;
    row_moments<Hw>(xr, D, eps, mean, rstd);
    if (Hw::thread() == 0 && stats) stats[2 * r] = mean, stats[2 * r + 1] = rstd;
    double s1 = 0, s2 = 0;
    for (int64_t j = Hw::thread(); j < D; j += Hw::threads()) {
      const double g = double(gr[j]) * (w ? double(w[j]) : 1.0);
      s1 += g;
      s2 += g * (double(xr[j]) - mean) * rstd;
    }
    s1 = block_sum_of<Hw>(s1);
    s2 = block_sum_of<Hw>(s2);
    const double m1 = s1 / double(D), m2 = s2 / double(D);
    T* dr = dx + r * D;
    for (int64_t j = Hw::thread(); j < D; j += Hw::threads()) {
      const double g = double(gr[j]) * (w ? double(w[j]) : 1.0);
      const double xh = (double(xr[j]) - mean) * rstd;
      dr[j] = T(rstd * (g - m1 - xh * m2));
    }
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
  for (int64_t c = Hw::block_x() * int64_t(Hw::threads()) + Hw::thread(); c < D; c += int64_t(Hw::grid_x()) * Hw::threads()) {
    double aw = 0, ab = 0;
    for (int64_t ch = 0; ch < chunks; ++ch) aw += partial[ch * D + c], ab += partial[(chunks + ch) * D + c];
    if (dw) dw[c] = T(aw);
    if (db) db[c] = T(ab);
  }
}

}  // namespace titanax::kernels::cuda::row_kernels
