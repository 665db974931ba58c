#include "kernels/cpu/optim.h"

#include <cmath>

#include "kernels/cpu/loops.h"

namespace titanax::kernels::cpu {
namespace {

template <class T>
void adam_impl(T* p, const T* g, T* m, T* v, int64_t n, double lr, double b1, double b2, double eps, double wd,
               int64_t t, bool decoupled) {
  const double bc1 = 1 - std::pow(b1, double(t)), bc2 = 1 - std::pow(b2, double(t));
  const T step = T(lr / bc1), inv_sqrt_bc2 = T(1 / std::sqrt(bc2)), e = T(eps);
  const T decay = T(1 - lr * wd), l2 = T(wd), tb1 = T(b1), tb2 = T(b2), ob1 = T(1 - b1), ob2 = T(1 - b2);
  parallel_for(n, 16, [&](int64_t s, int64_t end) {
    for (int64_t i = s; i < end; ++i) {
      T gi = g[i];
      if (decoupled) p[i] *= decay;
      else gi += l2 * p[i];
      m[i] = tb1 * m[i] + ob1 * gi;
      v[i] = tb2 * v[i] + ob2 * gi * gi;
      p[i] -= step * m[i] / (std::sqrt(v[i]) * inv_sqrt_bc2 + e);
    }
  });
}

template <class T>
void sgd_impl(T* p, const T* g, T* buf, int64_t n, double lr, double mu, double wd, bool nesterov, bool first) {
  const T tl = T(lr), tm = T(mu), tw = T(wd);
  parallel_for(n, 8, [&](int64_t s, int64_t end) {
    for (int64_t i = s; i < end; ++i) {
      T gi = g[i] + tw * p[i];
      if (buf) {
        buf[i] = first ? gi : tm * buf[i] + gi;
        gi = nesterov ? gi + tm * buf[i] : buf[i];
      }
      p[i] -= tl * gi;
    }
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
      double acc = 0;
      for (int64_t i = c * chunk; i < std::min(n, (c + 1) * chunk); ++i) acc += double(g[i]) * double(g[i]);
      part[size_t(c)] = acc;
    }
  });
  for (double v : part) total += v;
  return total;
}

}  // namespace

void adam_update(float* p, const float* g, float* m, float* v, int64_t n, double lr, double b1, double b2, double eps,
                 double wd, int64_t t, bool decoupled) {
  adam_impl(p, g, m, v, n, lr, b1, b2, eps, wd, t, decoupled);
}
void adam_update(double* p, const double* g, double* m, double* v, int64_t n, double lr, double b1, double b2,
                 double eps, double wd, int64_t t, bool decoupled) {
  adam_impl(p, g, m, v, n, lr, b1, b2, eps, wd, t, decoupled);
}
void sgd_update(float* p, const float* g, float* buf, int64_t n, double lr, double mu, double wd, bool nesterov, bool first) {
  sgd_impl(p, g, buf, n, lr, mu, wd, nesterov, first);
}
void sgd_update(double* p, const double* g, double* buf, int64_t n, double lr, double mu, double wd, bool nesterov,
                bool first) {
  sgd_impl(p, g, buf, n, lr, mu, wd, nesterov, first);
}
double sum_squares(const float* g, int64_t n) { return sumsq_impl(g, n); }
double sum_squares(const double* g, int64_t n) { return sumsq_impl(g, n); }
}  // namespace titanax::kernels::cpu
