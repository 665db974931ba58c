#include "kernels/cpu/optim.h"

#include <cmath>

#include "kernels/cpu/loops.h"

namespace titanax::kernels::cpu {
namespace {

// The loops below take their scalars by value and their arrays as restrict pointers (the four arrays of
// one parameter never overlap), so the compiler keeps the scalars in registers and vectorises: the
// division and square root of Adam in 16 lanes instead of one (the same IEEE operations in the same
// order per element, so the same bits; no FMA: -ffp-contract=off for this file).
template <class T, bool Decoupled>
void adam_loop(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v, int64_t s0, int64_t end,
               T factor, T decay, T l2, T tb1, T tb2, T ob1, T ob2, T step, T inv_sqrt_bc2, T e) {
  for (int64_t i = s0; i < end; ++i) {
    T gi = g[i] * factor;
    T pi = p[i];
    if constexpr (Decoupled) pi *= decay;
    else gi += l2 * pi;
    const T mi = tb1 * m[i] + ob1 * gi;
    const T vi = tb2 * v[i] + ob2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - step * mi / (std::sqrt(vi) * inv_sqrt_bc2 + e);
  }
}

template <class T>
void adam_impl(T* p, const T* g, T* m, T* v, int64_t n, const UpdateScalars& s, double b1, double b2, double eps, double wd,
               bool decoupled) {
  if (s.v[0] == 0) return;
  const T step = T(s.v[1]), inv_sqrt_bc2 = T(s.v[2]), e = T(eps), decay = T(s.v[3]), l2 = T(wd), factor = T(s.v[4]);
  const T tb1 = T(b1), tb2 = T(b2), ob1 = T(1 - b1), ob2 = T(1 - b2);
  parallel_for(n, 16, [=](int64_t s0, int64_t end) {
    if (decoupled) adam_loop<T, true>(p, g, m, v, s0, end, factor, decay, l2, tb1, tb2, ob1, ob2, step, inv_sqrt_bc2, e);
    else adam_loop<T, false>(p, g, m, v, s0, end, factor, decay, l2, tb1, tb2, ob1, ob2, step, inv_sqrt_bc2, e);
  });
}

template <class T, bool Momentum>
void sgd_loop(T* __restrict p, const T* __restrict g, T* __restrict buf, int64_t s0, int64_t end, T factor, T lr, T mu,
              T wd, bool first, bool nesterov) {
  for (int64_t i = s0; i < end; ++i) {
    T gi = g[i] * factor + wd * p[i];
    if constexpr (Momentum) {
      const T b = first ? gi : mu * buf[i] + gi;
      buf[i] = b;
      gi = nesterov ? gi + mu * b : b;
    }
    p[i] -= lr * gi;
  }
}

template <class T>
void sgd_impl(T* p, const T* g, T* buf, int64_t n, const UpdateScalars& s, double mu, double wd, bool nesterov) {
  if (s.v[0] == 0) return;
  const T tl = T(s.v[1]), tm = T(mu), tw = T(wd), factor = T(s.v[4]);
  const bool first = s.v[2] != 0;
  parallel_for(n, 8, [=](int64_t s0, int64_t end) {
    if (buf) sgd_loop<T, true>(p, g, buf, s0, end, factor, tl, tm, tw, first, nesterov);
    else sgd_loop<T, false>(p, g, buf, s0, end, factor, tl, tm, tw, first, nesterov);
  });
}

template <class T>
double sumsq_impl(const T* g, int64_t n) {
  double total = 0;
  // Fixed chunking so the result does not depend on the thread count.
  const int64_t chunk = 1 << 14, nchunks = (n + chunk - 1) / chunk;
  std::vector<double> part(size_t(std::max<int64_t>(nchunks, 1)), 0.0);
  parallel_for(nchunks, chunk, [&](int64_t s, int64_t e) {
    for (int64_t c = s; c < e; ++c) {
      const T* gc = g + c * chunk;
      const int64_t len = std::min(n, (c + 1) * chunk) - c * chunk;
      part[size_t(c)] = lane_sum(len, [gc](int64_t i) { return double(gc[i]) * double(gc[i]); });
    }
  });
  for (double v : part) total += v;
  return total;
}

}  // namespace

void adam_update(float* p, const float* g, float* m, float* v, int64_t n, const UpdateScalars& s, double b1, double b2,
                 double eps, double wd, bool decoupled) {
  adam_impl(p, g, m, v, n, s, b1, b2, eps, wd, decoupled);
}
void adam_update(double* p, const double* g, double* m, double* v, int64_t n, const UpdateScalars& s, double b1,
                 double b2, double eps, double wd, bool decoupled) {
  adam_impl(p, g, m, v, n, s, b1, b2, eps, wd, decoupled);
}
void sgd_update(float* p, const float* g, float* buf, int64_t n, const UpdateScalars& s, double mu, double wd, bool nesterov) {
  sgd_impl(p, g, buf, n, s, mu, wd, nesterov);
}
void sgd_update(double* p, const double* g, double* buf, int64_t n, const UpdateScalars& s, double mu, double wd,
                bool nesterov) {
  sgd_impl(p, g, buf, n, s, mu, wd, nesterov);
}
double sum_squares(const float* g, int64_t n) { return sumsq_impl(g, n); }
double sum_squares(const double* g, int64_t n) { return sumsq_impl(g, n); }
}  // namespace titanax::kernels::cpu
