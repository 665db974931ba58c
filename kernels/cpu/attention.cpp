#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/loops.h"
#include "kernels/cpu/vmath.h"

namespace titanax::kernels::cpu {
namespace {

constexpr int64_t kB = kAttentionTile;

struct Dims {
  int64_t N, Tq, Tk, D;
};
Dims dims(const Tensor& q, const Tensor& k) {
  const int r = q.dim();
  int64_t N = 1;
  for (int i = 0; i < r - 2; ++i) N *= q.shape()[i];
  return {N, q.shape()[r - 2], k.shape()[r - 2], q.shape()[r - 1]};
}

// The keys query tile [i0, i0 + br) has to look at: all of them, or for causal masking the ones up to
// its last row.
int64_t key_end(bool causal, int64_t i0, int64_t br, int64_t Tk) { return causal ? std::min(Tk, i0 + br) : Tk; }

template <class T>
void forward(const T* q, const T* k, const T* v, const Dims& d, bool causal, T scale, T* o, T* lse) {
  const int64_t nqb = (d.Tq + kB - 1) / kB, D = d.D;
  parallel_for(d.N * nqb, 4 * kB * d.Tk * D, [&](int64_t w0, int64_t w1) {
    std::vector<T> S(size_t(kB * kB)), acc(size_t(kB * D));
    std::vector<T> m(static_cast<size_t>(kB));
    std::vector<double> l(static_cast<size_t>(kB));
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t n = w / nqb, i0 = (w % nqb) * kB, br = std::min(kB, d.Tq - i0);
      const T* Q = q + (n * d.Tq + i0) * D;
      const T* K = k + n * d.Tk * D;
      const T* V = v + n * d.Tk * D;
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), 0.0);
      const int64_t kend = key_end(causal, i0, br, d.Tk);
      for (int64_t j0 = 0; j0 < kend; j0 += kB) {
        const int64_t bc = std::min(kB, kend - j0);
        gemm(false, true, br, bc, D, scale, Q, D, K + j0 * D, D, T(0), S.data(), bc);
        for (int64_t r = 0; r < br; ++r) {
          T* row = S.data() + r * bc;
          // Keys j0 + c > i are masked; the first tile always holds key 0, so m is finite after it.
          const int64_t vis = causal ? std::clamp<int64_t>(i0 + r - j0 + 1, 0, bc) : bc;
          T mx = m[size_t(r)];
          for (int64_t c = 0; c < vis; ++c) mx = std::max(mx, row[c]);
          const T alpha = fexp(T(m[size_t(r)] - mx));  // exp(-inf) = 0 on the first tile
          for (int64_t c = 0; c < vis; ++c) row[c] = fexp(T(row[c] - mx));  // vectorised (vmath.h) for f32
          const double s = lane_sum(vis, [row](int64_t c) { return double(row[c]); });
          std::fill(row + vis, row + bc, T(0));
          l[size_t(r)] = l[size_t(r)] * double(alpha) + s;
          m[size_t(r)] = mx;
          T* a = acc.data() + r * D;
          for (int64_t e = 0; e < D; ++e) a[e] *= alpha;
        }
        gemm(false, false, br, D, bc, T(1), S.data(), bc, V + j0 * D, D, T(1), acc.data(), D);
      }
      for (int64_t r = 0; r < br; ++r) {
        const T inv = T(1.0 / l[size_t(r)]);
        T* out = o + (n * d.Tq + i0 + r) * D;
        for (int64_t e = 0; e < D; ++e) out[e] = acc[size_t(r * D + e)] * inv;
        lse[n * d.Tq + i0 + r] = T(double(m[size_t(r)]) + std::log(l[size_t(r)]));
      }
    }
  });
}

template <class T>
void backward(const T* q, const T* k, const T* v, const T* o, const T* lse, const T* dout, const Dims& d, bool causal,
              T scale, T* dq, T* dk, T* dv) {
  const int64_t D = d.D;
  // One head per work item: dk / dv gather over every query tile, dq over every key tile.
  parallel_for(d.N, 8 * d.Tq * d.Tk * D, [&](int64_t n0, int64_t n1) {
    std::vector<T> P(size_t(kB * kB)), dS(size_t(kB * kB)), delta(size_t(d.Tq));
    for (int64_t n = n0; n < n1; ++n) {
      const T* Q = q + n * d.Tq * D;
      const T* K = k + n * d.Tk * D;
      const T* V = v + n * d.Tk * D;
      const T* O = o + n * d.Tq * D;
      const T* dO = dout + n * d.Tq * D;
      const T* L = lse + n * d.Tq;
      T* dQ = dq + n * d.Tq * D;
      T* dK = dk + n * d.Tk * D;
      T* dV = dv + n * d.Tk * D;
      std::fill(dQ, dQ + d.Tq * D, T(0));
      std::fill(dK, dK + d.Tk * D, T(0));
      std::fill(dV, dV + d.Tk * D, T(0));
      for (int64_t i = 0; i < d.Tq; ++i) {
        const T *dOi = dO + i * D, *Oi = O + i * D;
        delta[size_t(i)] = T(lane_sum(D, [dOi, Oi](int64_t e) { return double(dOi[e]) * double(Oi[e]); }));
      }
      for (int64_t i0 = 0; i0 < d.Tq; i0 += kB) {
        const int64_t br = std::min(kB, d.Tq - i0), kend = key_end(causal, i0, br, d.Tk);
        for (int64_t j0 = 0; j0 < kend; j0 += kB) {
          const int64_t bc = std::min(kB, kend - j0);
          gemm(false, true, br, bc, D, scale, Q + i0 * D, D, K + j0 * D, D, T(0), P.data(), bc);
          for (int64_t r = 0; r < br; ++r) {
            T* row = P.data() + r * bc;
            const int64_t vis = causal ? std::clamp<int64_t>(i0 + r - j0 + 1, 0, bc) : bc;
            for (int64_t c = 0; c < vis; ++c) row[c] = fexp(T(row[c] - L[i0 + r]));
            std::fill(row + vis, row + bc, T(0));
          }
          gemm(true, false, bc, D, br, T(1), P.data(), bc, dO + i0 * D, D, T(1), dV + j0 * D, D);
          gemm(false, true, br, bc, D, T(1), dO + i0 * D, D, V + j0 * D, D, T(0), dS.data(), bc);
          for (int64_t r = 0; r < br; ++r)
            for (int64_t c = 0; c < bc; ++c) {
              T& x = dS[size_t(r * bc + c)];
              x = P[size_t(r * bc + c)] * (x - delta[size_t(i0 + r)]);
            }
          gemm(false, false, br, D, bc, scale, dS.data(), bc, K + j0 * D, D, T(1), dQ + i0 * D, D);
          gemm(true, false, bc, D, br, scale, dS.data(), bc, Q + i0 * D, D, T(1), dK + j0 * D, D);
        }
      }
    }
  });
}

}  // namespace

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale, Tensor& o,
                       Tensor& lse) {
  const Dims d = dims(q, k);
  TX_DISPATCH_FLOAT(q.dtype(), "scaled_dot_product_attention", {
    using T = scalar_t;
    forward(q.data<T>(), k.data<T>(), v.data<T>(), d, causal, T(scale), o.data<T>(), lse.data<T>());
  });
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                        const Tensor& dout, bool causal, double scale, Tensor& dq, Tensor& dk, Tensor& dv) {
  const Dims d = dims(q, k);
  TX_DISPATCH_FLOAT(q.dtype(), "scaled_dot_product_attention_backward", {
    using T = scalar_t;
    backward(q.data<T>(), k.data<T>(), v.data<T>(), o.data<T>(), lse.data<T>(), dout.data<T>(), d, causal, T(scale),
             dq.data<T>(), dk.data<T>(), dv.data<T>());
  });
}

}  // namespace titanax::kernels::cpu
