// The fused multi-tensor optimizer updates of kernels/cuda/optim.cu (which launches them) as block bodies
// over a policy of hardware primitives (kernels/cuda/hw_policy.h), so that tests/emulated/ runs them on
// the CPU too. One launch updates up to kMaxTensors parameters of a TensorChunk (block_y picks the
// tensor; blocks stride over its elements), in place, with the formulas of kernels/cpu/optim.h; the
// gradient norm's sums of squares take the same multi-tensor shape (SquaresChunk).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cuda/half.cuh"
#include "kernels/cuda/hw_policy.h"

namespace titanax::kernels::cuda::optim_kernels {

// The step's scalars: from device memory when given (a captured launch), else the launch's own copy.
TX_HW_FN const double* scalars_of(const UpdateScalars& s, const double* sd) { return sd ? sd : s.v; }

// Elements i of tensor block_y handled by this thread: body(i) for each.
template <class Hw, class Body>
TX_HW_FN void for_elements(int64_t n, Body body) {
  for (int64_t i = grid_index<Hw>(); i < n; i += grid_stride<Hw>())
    body(i);
}

/// AdamW (decoupled) / Adam (L2 added to the gradient) with scalars {apply, step size, 1 / sqrt(1 - b2^t),
/// decay factor, gradient factor} (kernels/update_scalars.h); e = eps, ob1 = 1 - b1, ob2 = 1 - b2.
template <class Hw, class T>
TX_HW_FN void adam(const TensorChunk& c, const UpdateScalars& s, const double* sd, T e, T l2, T b1, T b2, T ob1, T ob2,
                   bool decoupled) {
  const double* sc = scalars_of(s, sd);
  if (sc[0] == 0) return;  // a skipped step
  const T step = T(sc[1]), inv_sqrt_bc2 = T(sc[2]), decay = T(sc[3]), factor = T(sc[4]);
  const int t = Hw::block_y();
  T* p = static_cast<T*>(c.p[t]);
  const T* g = static_cast<const T*>(c.g[t]);
  T* m = static_cast<T*>(c.m[t]);
  T* v = static_cast<T*>(c.v[t]);
  for_elements<Hw>(c.n[t], [&](int64_t i) {
    T gi = mul_rn(g[i], factor), pi = p[i];  // rounded as a separate scaling of g would be
    if (decoupled) pi *= decay;
    else gi += l2 * pi;
    const T mi = b1 * m[i] + ob1 * gi;
    const T vi = b2 * v[i] + ob2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - step * mi / (sqrt(vi) * inv_sqrt_bc2 + e);
  });
}

/// SGD with momentum (torch.optim.SGD) with scalars {apply, lr, first step, unused, gradient factor};
/// the momentum buffer (c.m) may be null (no momentum).
template <class Hw, class T>
TX_HW_FN void sgd(const TensorChunk& c, const UpdateScalars& s, const double* sd, T mu, T wd, bool nesterov) {
  const double* sc = scalars_of(s, sd);
  if (sc[0] == 0) return;
  const T lr = T(sc[1]), factor = T(sc[4]);
  const bool first = sc[2] != 0;
  const int t = Hw::block_y();
  T* p = static_cast<T*>(c.p[t]);
  const T* g = static_cast<const T*>(c.g[t]);
  T* buf = static_cast<T*>(c.m[t]);
  for_elements<Hw>(c.n[t], [&](int64_t i) {
    T gi = mul_rn(g[i], factor) + wd * p[i];
    if (buf) {
      const T b = first ? gi : mu * buf[i] + gi;
      buf[i] = b;
      gi = nesterov ? gi + mu * b : b;
    }
    p[i] -= lr * gi;
  });
}

/// The sums of squares of a gradient norm: block (k, t) sums, in double, the squares of chunk k
/// (kSquaresChunk elements) of tensor t = block_y of c into partial[c.first[t] + k]; blocks stride over
/// the chunks. Every chunk's sum has a fixed order (a fixed partition over the block, then its tree).
template <class Hw, class T>
TX_HW_FN void sum_squares(const SquaresChunk& c, double* partial) {
  const int t = Hw::block_y();
  const T* x = static_cast<const T*>(c.x[t]);
  const int64_t n = c.n[t], chunks = (n + kSquaresChunk - 1) / kSquaresChunk;
  for (int64_t k = Hw::block_x(); k < chunks; k += Hw::grid_x()) {
    const int64_t end = (k + 1) * kSquaresChunk < n ? (k + 1) * kSquaresChunk : n;
    double acc = 0;
    TX_UNROLL_4  // four loads in flight per thread (the adds keep their order)
    for (int64_t i = k * kSquaresChunk + Hw::thread(); i < end; i += Hw::threads()) {
      const double v = double(widen(x[i]));
      acc += v * v;
    }
    acc = block_sum_of<Hw>(acc);
    if (Hw::thread() == 0) partial[c.first[t] + k] = acc;
  }
}

/// out[0] = the sum of partial[0 .. P) by one block: thread i takes i, i + threads(), ..., then the tree.
template <class Hw>
TX_HW_FN void sum_partials(const double* partial, int64_t P, double* out) {
  double acc = 0;
  for (int64_t i = Hw::thread(); i < P; i += Hw::threads()) acc += partial[i];
  acc = block_sum_of<Hw>(acc);
  if (Hw::thread() == 0) out[0] = acc;
}

}  // namespace titanax::kernels::cuda::optim_kernels
