// The CPU elementwise engine: iterate N operands of one shape (broadcast strides allowed) with adjacent
// dimensions coalesced, calling an inner functor on 1-D runs, split across OpenMP threads by element
// ranges. Internal to kernels/cpu.
#pragma once

#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>

#include "core/tensor.h"

namespace titanax::kernels::cpu {

/// Threads to use for `work` elements of cheap work: 1 below the grain, else up to OpenMP's maximum.
inline int threads_for(int64_t work, int64_t grain = 1 << 15) {
  if (work < grain * 2) return 1;
  int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
  return int(std::max<int64_t>(1, std::min<int64_t>(nt, work / grain)));
}

/// The sum over j in [0, n) of f(j) in double, in kSumLanes running sums (j into lane j % kSumLanes)
/// added pairwise at the end, then the tail in order: independent add chains the compiler keeps in
/// vector registers (one chain waits for every add: ~4 cycles an element), in a fixed order on every
/// machine and thread count.
constexpr int kSumLanes = 16;
template <class F>
[[gnu::always_inline]] inline double lane_sum(int64_t n, F&& f) {
  double lane[kSumLanes] = {};
  int64_t j = 0;
  for (; j + kSumLanes <= n; j += kSumLanes)
    for (int k = 0; k < kSumLanes; ++k) lane[k] += f(j + k);
  for (int w = kSumLanes / 2; w >= 1; w /= 2)
    for (int k = 0; k < w; ++k) lane[k] += lane[k + w];
  double acc = lane[0];
  for (; j < n; ++j) acc += f(j);
  return acc;
}

/// Strides of `t` (in elements) broadcast to `shape` (0 on broadcast axes, right-aligned).
inline Shape broadcast_strides(const Tensor& t, const Shape& shape) {
  Shape s;
  s.resize(shape.rank());
  int off = shape.rank() - t.dim();
  for (int i = 0; i < shape.rank(); ++i) {
    int j = i - off;
    s[i] = (j < 0 || t.shape()[j] == 1) ? 0 : t.strides()[j];
  }
  return s;
}

template <int N>
struct Layout {
  int rank = 0;
  int64_t size[kMaxRank] = {};
  int64_t stride[N][kMaxRank] = {};  // bytes
};

/// Drops size-1 axes and merges axes that are contiguous with their inner neighbour in every operand.
template <int N>
Layout<N> make_layout(const Shape& shape, const std::array<Shape, N>& strides, const std::array<int64_t, N>& itemsz) {
  Layout<N> L;
  for (int i = 0; i < shape.rank(); ++i) {
    if (shape[i] == 1) continue;
    L.size[L.rank] = shape[i];
    for (int k = 0; k < N; ++k) L.stride[k][L.rank] = strides[k][i] * itemsz[k];
    ++L.rank;
  }
  // Coalesce from the inside out: axis r-1 (outer) merges into axis r when stride[r-1] == stride[r]*size[r].
  int w = L.rank - 1;
  for (int r = L.rank - 2; r >= 0; --r) {
    bool ok = true;
    for (int k = 0; k < N; ++k) ok = ok && L.stride[k][r] == L.stride[k][w] * L.size[w];
    if (ok) {
      L.size[w] *= L.size[r];
    } else {
      --w;
      L.size[w] = L.size[r];
      for (int k = 0; k < N; ++k) L.stride[k][w] = L.stride[k][r];
    }
  }
  if (L.rank > 0) {
    int n = L.rank - w;
    for (int r = 0; r < n; ++r) {
      L.size[r] = L.size[r + w];
      for (int k = 0; k < N; ++k) L.stride[k][r] = L.stride[k][r + w];
    }
    L.rank = n;
  }
  return L;
}

/// Calls inner(n, ptrs, inner_strides_bytes) over runs of the innermost axis covering every element.
template <int N, class F>
void strided_loop(const Layout<N>& L, std::array<char*, N> base, F&& inner, int64_t grain = 1 << 15) {
  if (L.rank == 0) {
    int64_t zero[N] = {};
    inner(int64_t(1), base.data(), zero);
    return;
  }
  const int last = L.rank - 1;
  const int64_t inner_n = L.size[last];
  int64_t total = inner_n;
  for (int r = 0; r < last; ++r) total *= L.size[r];
  if (total == 0) return;  // an empty tensor: nothing to visit
  int64_t istr[N];
  for (int k = 0; k < N; ++k) istr[k] = L.stride[k][last];

  auto run = [&](int64_t s, int64_t e) {
    int64_t o = s / inner_n, i = s % inner_n;
    int64_t idx[kMaxRank] = {};
    std::array<char*, N> p = base;
    for (int r = last - 1; r >= 0; --r) {
      idx[r] = o % L.size[r];
      o /= L.size[r];
      for (int k = 0; k < N; ++k) p[k] += idx[r] * L.stride[k][r];
    }
    while (s < e) {
      int64_t n = std::min(inner_n - i, e - s);
      std::array<char*, N> q;
      for (int k = 0; k < N; ++k) q[k] = p[k] + i * istr[k];
      inner(n, q.data(), istr);
      s += n;
      i = 0;
      for (int r = last - 1; r >= 0; --r) {  // odometer step over the outer axes
        for (int k = 0; k < N; ++k) p[k] += L.stride[k][r];
        if (++idx[r] < L.size[r]) break;
        for (int k = 0; k < N; ++k) p[k] -= L.stride[k][r] * L.size[r];
        idx[r] = 0;
      }
    }
  };

  int nt = threads_for(total, grain);
  if (nt <= 1) {
    run(0, total);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    int64_t chunk = (total + n - 1) / n;
    chunk = (chunk + 15) / 16 * 16;
    int64_t s = std::min(total, chunk * t), e = std::min(total, s + chunk);
    if (s < e) run(s, e);
  }
}

/// Splits [0, n) into contiguous ranges over threads (when n * cost_per_item exceeds the grain).
template <class F>
void parallel_for(int64_t n, int64_t cost_per_item, F&& body) {
  int nt = threads_for(n * std::max<int64_t>(1, cost_per_item));
  nt = int(std::min<int64_t>(nt, n));
  if (nt <= 1) {
    if (n > 0) body(int64_t(0), n);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num(), m = omp_get_num_threads();
    int64_t chunk = (n + m - 1) / m;
    int64_t s = std::min(n, chunk * t), e = std::min(n, s + chunk);
    if (s < e) body(s, e);
  }
}

}  // namespace titanax::kernels::cpu
