// Gather / deterministic scatter-add (take, embedding and their adjoints), one-hot and dropout, written
// against the hardware-primitive policy of kernels/cuda/hw_policy.h, so that nn.cu runs them on the GPU
// and tests/emulated/ on the CPU. Grid-stride loops over any grid. CUDA headers only.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cuda/half.cuh"
#include "kernels/cuda/hw_policy.h"
#include "kernels/cuda/random.cuh"

namespace titanax::kernels::cuda::index_kernels {

/// out[a, k, b] = x[a, idx[k], b], x viewed as [A, n, B], out as [A, K, B]. An index outside [0, n) is
/// reported into `slot` (kIndexOutOfRange, aux `op`) and its outputs are NaN.
template <class Hw, class T, class I>
TX_HW_FN void gather(const T* x, const I* idx, int64_t A, int64_t n, int64_t B, int64_t K, int op, const ReportSlot& slot,
                     T* out) {
  const int64_t total = A * K * B;
  for (int64_t i = grid_index<Hw>(); i < total; i += grid_stride<Hw>()) {
    const int64_t b = i % B, k = (i / B) % K, a = i / (B * K), r = int64_t(idx[k]);
    if (r >= 0 && r < n) {
      out[i] = x[(a * n + r) * B + b];
    } else {
      if (a == 0 && b == 0) Hw::report(slot, kIndexOutOfRange, k, r, n, op);
      out[i] = T(NAN);
    }
  }
}

/// The scatter-add's sort keys: keys[k] = the row of index k (n for one out of range, which is reported),
/// ks[k] = k. A stable sort of (keys, ks) by key then lists each row's indices in increasing k.
template <class Hw, class I>
TX_HW_FN void scatter_keys(const I* idx, int64_t K, int64_t n, int op, const ReportSlot& slot, uint64_t* keys, int64_t* ks) {
  for (int64_t k = grid_index<Hw>(); k < K; k += grid_stride<Hw>()) {
    const int64_t r = int64_t(idx[k]);
    const bool bad = r < 0 || r >= n;
    if (bad) Hw::report(slot, kIndexOutOfRange, k, r, n, op);
    keys[k] = uint64_t(bad ? n : r);
    ks[k] = k;
  }
}

/// row_start[r] = the first position of row r in the sorted keys (a lower bound), r in [0, n]: rows never
/// indexed get an empty run, and the out-of-range keys (n) sort after row_start[n].
template <class Hw>
TX_HW_FN void row_starts(const uint64_t* sorted, int64_t K, int64_t n, int64_t* row_start) {
  for (int64_t r = grid_index<Hw>(); r <= n; r += grid_stride<Hw>()) {
    int64_t lo = 0, hi = K;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (sorted[mid] < uint64_t(r)) lo = mid + 1;
      else hi = mid;
    }
    row_start[r] = lo;
  }
}

/// out[a, r, b] = sum over the sorted positions e of row r (increasing k) of g[a, ks[e], b]: g [A, K, B],
/// out [A, n, B], every element written (zero for rows no index hits). Deterministic: fixed order, no
/// atomics.
template <class Hw, class T>
TX_HW_FN void scatter_add(const T* g, const int64_t* row_start, const int64_t* ks, int64_t A, int64_t n, int64_t B,
                          int64_t K, T* out) {
  const int64_t total = A * n * B;
  for (int64_t i = grid_index<Hw>(); i < total; i += grid_stride<Hw>()) {
    const int64_t b = i % B, r = (i / B) % n, a = i / (B * n);
    T acc = T(0);
    for (int64_t e = row_start[r]; e < row_start[r + 1]; ++e) acc += g[(a * K + ks[e]) * B + b];
    out[i] = acc;
  }
}

/// out [R, C] = the one-hot rows of lab [R]: out[r, c] = 1 when lab[r] == c, else 0 (T any element type).
/// A label outside [0, C) is reported into `slot` (kIndexOutOfRange, aux kOneHot) and its row is zeros.
template <class Hw, class T, class I>
TX_HW_FN void one_hot(const I* lab, int64_t R, int64_t C, const ReportSlot& slot, T* out) {
  for (int64_t e = grid_index<Hw>(); e < R * C; e += grid_stride<Hw>()) {
    const int64_t r = e / C, c = e % C, l = int64_t(lab[r]);
    if (c == 0 && (l < 0 || l >= C)) Hw::report(slot, kIndexOutOfRange, r, l, C, kOneHot);
    out[e] = store_as<T>(l == c ? 1 : 0);
  }
}

/// Inverted dropout over n elements, one thread per block of 4: the Philox block of counter (blk, 0, 0, 0)
/// and key (k0, k1) gives elements 4 blk .. 4 blk + 3 their uniforms (kernels/cpu/random.h uniform_at);
/// out[i] = u >= p ? x[i] * scale : 0, computed in compute_t<T> (f16 / bf16: in f32, rounded once).
template <class Hw, class T>
TX_HW_FN void dropout(const T* x, T* out, int64_t n, double p, compute_t<T> scale, uint32_t k0, uint32_t k1) {
  random_kernels::philox_blocks<Hw>(n, 0, k0, k1, [&](int64_t blk, const philox::Words& r) {
    TX_UNROLL
    for (int k = 0; k < 4; ++k) {
      const int64_t i = blk * 4 + k;
      if (i < n) out[i] = narrow<T>(double(philox::unit_float(r.w[k])) >= p ? widen(x[i]) * scale : compute_t<T>(0));
    }
  });
}

}  // namespace titanax::kernels::cuda::index_kernels
