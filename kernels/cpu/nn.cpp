#include "kernels/cpu/nn.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/loops.h"
#include "kernels/cpu/vmath.h"

namespace titanax::kernels::cpu {
namespace {

// "[1, 2]": the multi-index of row-major element `flat` in `shape` (for error messages).
std::string position(int64_t flat, const Shape& shape) {
  std::vector<int64_t> idx(size_t(shape.rank()));
  for (int d = shape.rank() - 1; d >= 0; --d) {
    int64_t s = std::max<int64_t>(shape[d], 1);
    idx[size_t(d)] = flat % s;
    flat /= s;
  }
  std::string s = "[";
  for (size_t i = 0; i < idx.size(); ++i) s += (i ? ", " : "") + std::to_string(idx[i]);
  return s + "]";
}

// Integer labels / indices as int64 (one allocation per call).
std::vector<int64_t> read_ints(const Tensor& t, const char* what) {
  const int64_t n = t.numel();
  std::vector<int64_t> v(static_cast<size_t>(n));
  if (t.dtype() == DType::i64) {
    const int64_t* p = t.data<int64_t>();
    std::copy(p, p + n, v.begin());
  } else if (t.dtype() == DType::i32) {
    const int32_t* p = t.data<int32_t>();
    std::copy(p, p + n, v.begin());
  } else {
    unsupported_dtype(what, t.dtype(), "i32, i64");
  }
  return v;
}

// Max of a row (NaN-blind: a NaN element still makes the result NaN through exp()).
template <class T>
inline T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// sum_j exp(x[j] - m), accumulated in double (vectorised: lane_sum's fixed order, so the result does not
// depend on threads or the machine; exp is kernels/cpu/vmath.h's for f32). With `e`, the terms are also
// stored there (e[j] = exp(x[j] - m)): the same sum, for a caller that reuses them.
template <class T>
inline double row_sumexp(const T* x, int64_t n, T m, T* e = nullptr) {
  if (!e) return lane_sum(n, [x, m](int64_t j) { return double(fexp(T(x[j] - m))); });
  for (int64_t j = 0; j < n; ++j) e[j] = fexp(T(x[j] - m));
  return lane_sum(n, [e](int64_t j) { return double(e[j]); });
}

template <class T>
void softmax_rows(const T* x, T* y, int64_t rows, int64_t n, bool log) {
  parallel_for(rows, 4 * n, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      T* yr = y + r * n;
      const T m = row_max(xr, n);
      if (log) {
        const T lse = T(std::log(row_sumexp(xr, n, m)));
        for (int64_t j = 0; j < n; ++j) yr[j] = (xr[j] - m) - lse;
      } else {
        double s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < n; ++j) {
          T e = fexp(T(xr[j] - m));
          yr[j] = e;
          s += double(e);
        }
        const T inv = T(1.0 / s);
        for (int64_t j = 0; j < n; ++j) yr[j] *= inv;
      }
    }
  });
}

// Softmax along the middle axis of [outer, n, inner], in blocks of inner-contiguous columns.
template <class T>
void softmax_columns(const T* x, T* y, int64_t outer, int64_t n, int64_t inner, bool log) {
  constexpr int64_t kBlock = 256;
  const int64_t nblk = (inner + kBlock - 1) / kBlock;
  parallel_for(outer * nblk, 4 * n * std::min(inner, kBlock), [&](int64_t t0, int64_t t1) {
    T m[kBlock];
    double s[kBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o = t / nblk, b0 = (t % nblk) * kBlock, nb = std::min(kBlock, inner - b0);
      const T* xo = x + o * n * inner + b0;
      T* yo = y + o * n * inner + b0;
      for (int64_t b = 0; b < nb; ++b) m[b] = -std::numeric_limits<T>::infinity(), s[b] = 0;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t b = 0; b < nb; ++b) m[b] = xo[i * inner + b] > m[b] ? xo[i * inner + b] : m[b];
      for (int64_t i = 0; i < n; ++i)
        for (int64_t b = 0; b < nb; ++b) s[b] += double(std::exp(xo[i * inner + b] - m[b]));
      if (log) {
        T lse[kBlock];
        for (int64_t b = 0; b < nb; ++b) lse[b] = T(std::log(s[b]));
        for (int64_t i = 0; i < n; ++i)
          for (int64_t b = 0; b < nb; ++b) yo[i * inner + b] = (xo[i * inner + b] - m[b]) - lse[b];
      } else {
        T inv[kBlock];
        for (int64_t b = 0; b < nb; ++b) inv[b] = T(1.0 / s[b]);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t b = 0; b < nb; ++b) yo[i * inner + b] = std::exp(xo[i * inner + b] - m[b]) * inv[b];
      }
    }
  });
}

}  // namespace

void softmax(const Tensor& x, int64_t outer, int64_t n, int64_t inner, bool log, Tensor& y) {
  if (x.numel() == 0) return;
  TX_DISPATCH_FLOAT(x.dtype(), log ? "log_softmax" : "softmax", {
    if (inner == 1) softmax_rows(x.data<scalar_t>(), y.data<scalar_t>(), outer, n, log);
    else softmax_columns(x.data<scalar_t>(), y.data<scalar_t>(), outer, n, inner, log);
  });
}

// ------------------------------------------------------------------------------------ cross-entropy

void throw_label_out_of_range(const std::string& what, int64_t classes, int64_t ignore_index, int64_t label,
                              const std::string& position) {
  throw ValueError(what + ": label out of range",
                   "labels in [0, " + std::to_string(classes) + ") or ignore_index (" + std::to_string(ignore_index) + ")",
                   "label " + std::to_string(label) + " at position " + position,
                   "check the number of classes of the last layer, or pass the padding label as ignore_index");
}

int64_t check_labels(const Tensor& labels, int64_t classes, int64_t ignore_index, const Shape& labels_shape,
                     const char* what) {
  std::vector<int64_t> lab = read_ints(labels, what);
  int64_t count = 0;
  for (size_t i = 0; i < lab.size(); ++i) {
    if (lab[i] == ignore_index) continue;
    if (lab[i] < 0 || lab[i] >= classes) throw_label_out_of_range(what, classes, ignore_index, lab[i], position(int64_t(i), labels_shape));
    ++count;
  }
  return count;
}

namespace {

// The losses of the rows: out[r] (none), or their sum in row order (independent of the thread count),
// divided by count for mean. stats(r, xr) gives the row's max and sum of exp(x - max).
template <class T, class L, class Stats>
void ce_losses(const T* x, const L* lab, int64_t R, int64_t C, int64_t ignore, LossReduction red, int64_t count, T* out,
               Stats stats) {
  std::vector<double> rows;
  if (red != LossReduction::none) rows.assign(size_t(R), 0.0);
  parallel_for(R, 3 * C, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double loss = 0;
      if (int64_t(lab[r]) != ignore) {
        const T* xr = x + r * C;
        const auto [m, sumexp] = stats(r, xr);
        loss = double(m) + std::log(sumexp) - double(xr[lab[r]]);
      }
      if (red == LossReduction::none) out[r] = T(loss);
      else rows[size_t(r)] = loss;
    }
  });
  if (red == LossReduction::none) return;
  double s = 0;
  for (double v : rows) s += v;
  if (red == LossReduction::mean) s = count > 0 ? s / double(count) : 0.0;
  out[0] = T(s);
}

// A row's max and sum of exp(x - max) (the sum in double, its terms in T, kept in e when given).
template <class T>
std::pair<T, double> ce_row_stats(const T* xr, int64_t C, T* e = nullptr) {
  const T m = row_max(xr, C);
  return {m, row_sumexp(xr, C, m, e)};
}

template <class T, class L>
void ce_forward(const T* x, const L* lab, int64_t R, int64_t C, int64_t ignore, LossReduction red, int64_t count,
                T* out) {
  ce_losses(x, lab, R, C, ignore, red, count, out, [C](int64_t, const T* xr) { return ce_row_stats(xr, C); });
}

// d(loss)/d(logits) row by row: softmax(x_r) * scale, minus scale at the label (its column `lab - lo` when
// it falls in this block of C columns). stats(r, xr) gives the row's max and sum of exp(x - max) over the
// full vocabulary (computed here for whole rows; all-reduced ones for a vocabulary shard). Stored: dx
// already holds exp(x - max) for the rows not ignored (ce_fused), which are scaled instead of recomputed.
template <class T, class L, class Stats, bool Stored = false>
void softmax_xent_grad(const T* x, const L* lab, const T* ct, int64_t R, int64_t C, int64_t lo, int64_t ignore,
                       LossReduction red, int64_t count, T* dx, Stats stats) {
  double uniform = 0;
  if (red == LossReduction::sum) uniform = double(ct[0]);
  if (red == LossReduction::mean) uniform = count > 0 ? double(ct[0]) / double(count) : 0.0;
  parallel_for(R, 4 * C, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* dr = dx + r * C;
      if (int64_t(lab[r]) == ignore) {
        std::fill(dr, dr + C, T(0));
        continue;
      }
      const double scale = red == LossReduction::none ? double(ct[r]) : uniform;
      const T* xr = x + r * C;
      const auto [m, sumexp] = stats(r, xr);
      const T k = T(scale / sumexp);
      if constexpr (Stored) {
        for (int64_t j = 0; j < C; ++j) dr[j] *= k;
      } else {
        for (int64_t j = 0; j < C; ++j) dr[j] = fexp(T(xr[j] - m)) * k;
      }
      const int64_t j = int64_t(lab[r]) - lo;
      if (j >= 0 && j < C) dr[j] -= T(scale);
    }
  });
}

template <class T, class L>
void ce_backward(const T* x, const L* lab, const T* ct, int64_t R, int64_t C, int64_t ignore, LossReduction red,
                 int64_t count, T* dx) {
  softmax_xent_grad(x, lab, ct, R, C, 0, ignore, red, count, dx, [C](int64_t, const T* xr) { return ce_row_stats(xr, C); });
}

// Both: the rows' statistics once (for the non-ignored rows), keeping each exp(x - max) in dx, then the
// losses, and the gradient by scaling those: one exp per logit, the same bits as computing them twice.
template <class T, class L>
void ce_fused(const T* x, const L* lab, const T* ct, int64_t R, int64_t C, int64_t ignore, LossReduction red,
              int64_t count, T* out, T* dx) {
  std::vector<std::pair<T, double>> st(static_cast<size_t>(R));
  parallel_for(R, 2 * C, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      if (int64_t(lab[r]) != ignore) st[size_t(r)] = ce_row_stats(x + r * C, C, dx + r * C);
  });
  auto stats = [&](int64_t r, const T*) { return st[size_t(r)]; };
  ce_losses(x, lab, R, C, ignore, red, count, out, stats);
  softmax_xent_grad<T, L, decltype(stats), true>(x, lab, ct, R, C, 0, ignore, red, count, dx, stats);
}

}  // namespace

void cross_entropy(const Tensor& logits, const Tensor& labels, int64_t ignore_index, LossReduction red,
                   int64_t count, Tensor& out) {
  const int64_t C = logits.shape().back(), R = C > 0 ? logits.numel() / C : labels.numel();
  TX_DISPATCH_FLOAT(logits.dtype(), "cross_entropy", {
    using T = scalar_t;
    if (labels.dtype() == DType::i64)
      ce_forward(logits.data<T>(), labels.data<int64_t>(), R, C, ignore_index, red, count, out.data<T>());
    else
      ce_forward(logits.data<T>(), labels.data<int32_t>(), R, C, ignore_index, red, count, out.data<T>());
  });
}

void cross_entropy_fused(const Tensor& logits, const Tensor& labels, const Tensor& ct, int64_t ignore_index,
                         LossReduction red, int64_t count, Tensor& out, Tensor& dlogits) {
  const int64_t C = logits.shape().back(), R = C > 0 ? logits.numel() / C : labels.numel();
  TX_DISPATCH_FLOAT(logits.dtype(), "cross_entropy", {
    using T = scalar_t;
    if (labels.dtype() == DType::i64)
      ce_fused(logits.data<T>(), labels.data<int64_t>(), ct.data<T>(), R, C, ignore_index, red, count, out.data<T>(),
               dlogits.data<T>());
    else
      ce_fused(logits.data<T>(), labels.data<int32_t>(), ct.data<T>(), R, C, ignore_index, red, count, out.data<T>(),
               dlogits.data<T>());
  });
}

void cross_entropy_backward(const Tensor& logits, const Tensor& labels, const Tensor& ct, int64_t ignore_index,
                            LossReduction red, int64_t count, Tensor& dlogits) {
  const int64_t C = logits.shape().back(), R = C > 0 ? logits.numel() / C : 0;
  TX_DISPATCH_FLOAT(logits.dtype(), "cross_entropy_backward", {
    using T = scalar_t;
    if (labels.dtype() == DType::i64)
      ce_backward(logits.data<T>(), labels.data<int64_t>(), ct.data<T>(), R, C, ignore_index, red, count,
                  dlogits.data<T>());
    else
      ce_backward(logits.data<T>(), labels.data<int32_t>(), ct.data<T>(), R, C, ignore_index, red, count,
                  dlogits.data<T>());
  });
}

// ------------------------------------------------------------------------------------ vocab-parallel CE
namespace {

template <class T, class L>
void shard_partials(const T* x, const L* lab, int64_t R, int64_t C, int64_t lo, const double* gmax, double* part) {
  parallel_for(R, 3 * C, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * C;
      const T m = T(gmax[r]);
      part[r] = row_sumexp(xr, C, m);
      const int64_t j = int64_t(lab[r]) - lo;
      part[R + r] = (j >= 0 && j < C) ? double(xr[j]) : 0.0;
    }
  });
}

template <class T, class L>
void shard_backward(const T* x, const L* lab, int64_t R, int64_t C, int64_t lo, const double* stats, const T* ct,
                    int64_t ignore, LossReduction red, int64_t count, T* dx) {
  softmax_xent_grad(x, lab, ct, R, C, lo, ignore, red, count, dx, [stats, R](int64_t r, const T*) {
    return std::pair<T, double>(T(stats[r]), stats[R + r]);
  });
}

}  // namespace

void ce_shard_max(const Tensor& logits, Tensor& rowmax) {
  const int64_t C = logits.shape().back(), R = C > 0 ? logits.numel() / C : 0;
  double* out = rowmax.data<double>();
  TX_DISPATCH_FLOAT(logits.dtype(), "vocab_parallel_cross_entropy", {
    using T = scalar_t;
    const T* x = logits.data<T>();
    parallel_for(R, C, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) out[r] = double(row_max(x + r * C, C));
    });
  });
}

void ce_shard_partials(const Tensor& logits, const Tensor& labels, int64_t lo, const Tensor& gmax, Tensor& partial) {
  const int64_t C = logits.shape().back(), R = C > 0 ? logits.numel() / C : 0;
  TX_DISPATCH_FLOAT(logits.dtype(), "vocab_parallel_cross_entropy", {
    using T = scalar_t;
    if (labels.dtype() == DType::i64)
      shard_partials(logits.data<T>(), labels.data<int64_t>(), R, C, lo, gmax.data<double>(), partial.data<double>());
    else
      shard_partials(logits.data<T>(), labels.data<int32_t>(), R, C, lo, gmax.data<double>(), partial.data<double>());
  });
}

void ce_shard_backward(const Tensor& logits, const Tensor& labels, int64_t lo, const Tensor& stats, const Tensor& ct,
                       int64_t ignore_index, LossReduction red, int64_t count, Tensor& dlogits) {
  const int64_t C = logits.shape().back(), R = C > 0 ? logits.numel() / C : 0;
  TX_DISPATCH_FLOAT(logits.dtype(), "vocab_parallel_cross_entropy_backward", {
    using T = scalar_t;
    if (labels.dtype() == DType::i64)
      shard_backward(logits.data<T>(), labels.data<int64_t>(), R, C, lo, stats.data<double>(), ct.data<T>(), ignore_index,
                     red, count, dlogits.data<T>());
    else
      shard_backward(logits.data<T>(), labels.data<int32_t>(), R, C, lo, stats.data<double>(), ct.data<T>(), ignore_index,
                     red, count, dlogits.data<T>());
  });
}

// ------------------------------------------------------------------------------------ layer norm
namespace {

template <class T>
inline void row_moments(const T* x, int64_t D, double eps, double& mean, double& rstd) {
  mean = lane_sum(D, [x](int64_t j) { return double(x[j]); }) / double(D);
  const double m = mean;
  const double v = lane_sum(D, [x, m](int64_t j) {
    const double d = double(x[j]) - m;
    return d * d;
  });
  rstd = 1.0 / std::sqrt(v / double(D) + eps);
}

template <class T>
void ln_forward(const T* x, const T* w, const T* b, int64_t R, int64_t D, double eps, T* y) {
  parallel_for(R, 4 * D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      T* yr = y + r * D;
      double mean, rstd;
      row_moments(xr, D, eps, mean, rstd);
      const T tm = T(mean), ts = T(rstd);
      for (int64_t j = 0; j < D; ++j) {
        T v = (xr[j] - tm) * ts;
        if (w) v *= w[j];
        if (b) v += b[j];
        yr[j] = v;
      }
    }
  });
}

template <class T>
void ln_backward(const T* dy, const T* x, const T* w, const T* res, int64_t R, int64_t D, double eps, T* dx, T* dw,
                 T* db) {
  std::vector<double> stats(size_t(2 * R));  // mean, rstd per row (reused by the column pass)
  parallel_for(R, 6 * D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      const T* gr = dy + r * D;
      double mean, rstd;
      row_moments(xr, D, eps, mean, rstd);
      stats[size_t(2 * r)] = mean;
      stats[size_t(2 * r + 1)] = rstd;
      // sum(dxhat), sum(dxhat * xhat)
      auto dxhat = [gr, w](int64_t j) { return double(gr[j]) * (w ? double(w[j]) : 1.0); };
      const double s1 = lane_sum(D, dxhat);
      const double s2 = lane_sum(D, [&](int64_t j) { return dxhat(j) * (double(xr[j]) - mean) * rstd; });
      const double m1 = s1 / double(D), m2 = s2 / double(D);
      T* dr = dx + r * D;
      for (int64_t j = 0; j < D; ++j) {
        double g = double(gr[j]) * (w ? double(w[j]) : 1.0);
        double xh = (double(xr[j]) - mean) * rstd;
        dr[j] = T(rstd * (g - m1 - xh * m2));
      }
      // The residual gradient in a loop of its own over the stored row: in the loop above GCC would contract
      // the f64 product and the add into an FMA (-ffp-contract=fast), and the sum would no longer be
      // bitwise that of a separate add.
      if (res)
        for (int64_t j = 0; j < D; ++j) dr[j] = T(dr[j] + res[r * D + j]);
    }
  });
  if (!dw && !db) return;
  constexpr int64_t kBlock = 64;
  const int64_t nblk = (D + kBlock - 1) / kBlock;
  parallel_for(nblk, 3 * R * kBlock, [&](int64_t b0, int64_t b1) {
    double aw[kBlock], ab[kBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * kBlock, nc = std::min(kBlock, D - c0);
      std::fill(aw, aw + nc, 0.0);
      std::fill(ab, ab + nc, 0.0);
      for (int64_t r = 0; r < R; ++r) {
        const T* xr = x + r * D + c0;
        const T* gr = dy + r * D + c0;
        const double mean = stats[size_t(2 * r)], rstd = stats[size_t(2 * r + 1)];
        for (int64_t j = 0; j < nc; ++j) {
          aw[j] += double(gr[j]) * (double(xr[j]) - mean) * rstd;
          ab[j] += double(gr[j]);
        }
      }
      for (int64_t j = 0; j < nc; ++j) {
        if (dw) dw[c0 + j] = T(aw[j]);
        if (db) db[c0 + j] = T(ab[j]);
      }
    }
  });
}

}  // namespace

void layer_norm(const Tensor& x, const Tensor* w, const Tensor* b, double eps, Tensor& y) {
  const int64_t D = x.shape().back(), R = D > 0 ? x.numel() / D : 0;
  TX_DISPATCH_FLOAT(x.dtype(), "layer_norm", {
    using T = scalar_t;
    ln_forward(x.data<T>(), w ? w->data<T>() : (const T*)nullptr, b ? b->data<T>() : (const T*)nullptr, R, D, eps,
               y.data<T>());
  });
}

void layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor* w, double eps, Tensor& dx, Tensor* dw,
                         Tensor* db, const Tensor* residual) {
  const int64_t D = x.shape().back(), R = D > 0 ? x.numel() / D : 0;
  TX_DISPATCH_FLOAT(x.dtype(), "layer_norm_backward", {
    using T = scalar_t;
    if (D == 0) break;
    if (R == 0) {  // no rows: zero parameter gradients
      if (dw) std::fill(dw->data<T>(), dw->data<T>() + D, T(0));
      if (db) std::fill(db->data<T>(), db->data<T>() + D, T(0));
      break;
    }
    ln_backward(dy.data<T>(), x.data<T>(), w ? w->data<T>() : (const T*)nullptr,
                residual ? residual->data<T>() : (const T*)nullptr, R, D, eps, dx.data<T>(),
                dw ? dw->data<T>() : (T*)nullptr, db ? db->data<T>() : (T*)nullptr);
  });
}

// ------------------------------------------------------------------------------------ dropout

void dropout(const Tensor& x, double p, RngKey key, Tensor& out) {
  const int64_t n = x.numel();
  TX_DISPATCH_FLOAT(x.dtype(), "dropout", {
    using T = scalar_t;
    const T* px = x.data<T>();
    T* po = out.data<T>();
    const T scale = T(1.0 / (1.0 - p));
    parallel_for((n + 3) / 4, 64, [&](int64_t s, int64_t e) {
      for (int64_t blk = s; blk < e; ++blk) {
        // The counter uniform_at(key, i) uses for i = 4 * blk + k.
        auto r = philox4x32({uint32_t(uint64_t(blk)), uint32_t(uint64_t(blk) >> 32), 0, 0}, key);
        for (int k = 0; k < 4; ++k) {
          const int64_t i = blk * 4 + k;
          if (i >= n) break;
          po[i] = double(u32_to_unit_float(r[size_t(k)])) >= p ? px[i] * scale : T(0);
        }
      }
    });
  });
}

// ------------------------------------------------------------------------------------ gather / scatter

void throw_index_out_of_range(const std::string& what, int64_t n, int64_t index, const std::string& position) {
  throw ValueError(what + ": index out of range", "indices in [0, " + std::to_string(n) + ")",
                   "index " + std::to_string(index) + " at position " + position,
                   what.rfind("embedding", 0) == 0 ? "check the vocabulary size of the table against the ids"
                                                   : "indices must be non-negative and below the axis size");
}

void check_indices(const Tensor& idx, int64_t n, const Shape& idx_shape, const char* what) {
  std::vector<int64_t> v = read_ints(idx, what);
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i] < 0 || v[i] >= n) throw_index_out_of_range(what, n, v[i], position(int64_t(i), idx_shape));
}

void gather(const Tensor& x, const Tensor& idx, int64_t A, int64_t n, int64_t B, Tensor& out) {
  std::vector<int64_t> id = read_ints(idx, "gather");
  const int64_t K = int64_t(id.size());
  TX_DISPATCH_FLOAT(x.dtype(), "gather", {
    using T = scalar_t;
    const T* px = x.data<T>();
    T* po = out.data<T>();
    parallel_for(A * K, B, [&](int64_t s, int64_t e) {
      for (int64_t t = s; t < e; ++t) {
        const int64_t a = t / K, k = t % K;
        std::memcpy(po + t * B, px + (a * n + id[size_t(k)]) * B, size_t(B) * sizeof(T));
      }
    });
  });
}

void scatter_add(const Tensor& g, const Tensor& idx, int64_t A, int64_t n, int64_t B, Tensor& out) {
  std::vector<int64_t> id = read_ints(idx, "scatter_add");
  const int64_t K = int64_t(id.size());
  // Counting sort of k by target row: bucket r holds its k in increasing order.
  std::vector<int64_t> start(static_cast<size_t>(n + 1), 0), order(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) ++start[size_t(id[size_t(k)] + 1)];
  for (int64_t r = 0; r < n; ++r) start[size_t(r + 1)] += start[size_t(r)];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t k = 0; k < K; ++k) order[size_t(fill[size_t(id[size_t(k)])]++)] = k;
  }
  const int64_t avg = n > 0 ? std::max<int64_t>(1, K / n) : 1;
  TX_DISPATCH_FLOAT(g.dtype(), "scatter_add", {
    using T = scalar_t;
    const T* pg = g.data<T>();
    T* po = out.data<T>();
    parallel_for(A * n, B * avg, [&](int64_t s, int64_t e) {
      for (int64_t t = s; t < e; ++t) {
        const int64_t a = t / n, r = t % n;
        T* dst = po + t * B;
        std::fill(dst, dst + B, T(0));
        for (int64_t q = start[size_t(r)]; q < start[size_t(r + 1)]; ++q) {
          const T* src = pg + (a * K + order[size_t(q)]) * B;
          for (int64_t b = 0; b < B; ++b) dst[b] += src[b];
        }
      }
    });
  });
}

}  // namespace titanax::kernels::cpu
