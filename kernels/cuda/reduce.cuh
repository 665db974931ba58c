// The reduction kernels of kernels/cuda/reduce.cu (which launches them) as block bodies over a policy of
// hardware primitives (kernels/cuda/hw_policy.h), so that tests/emulated/ runs them on the CPU too.
// Reductions over any set of axes (ReduceLayout: the kept and the reduced dims, sizes and strides): a
// group of GROUP threads per output element (a warp, or the whole block when there are few outputs and
// many reduced elements), strided over the reduced elements and combined by warp shuffles (and, for a
// block, one partial per warp through shared memory). Sums accumulate in double, as the CPU's; max / min
// let NaN win, as the CPU's. argmax: a thread per output, the first index of the maximum (strict >, so
// NaN wins only at index 0, as the CPU).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cuda/hw_policy.h"

namespace titanax::kernels::cuda::reduce_kernels {

/// Max / min that let NaN win (as the CPU reductions).
template <class T>
TX_HW_FN T nan_max(T a, T b) { return (a != a || a >= b) ? a : b; }
template <class T>
TX_HW_FN T nan_min(T a, T b) { return (a != a || a <= b) ? a : b; }

/// op: 0 sum, 1 max, 2 min.
template <class A>
TX_HW_FN A combine(int op, A a, A b) {
  if (op == 0) return a + b;
  return op == 1 ? nan_max(a, b) : nan_min(a, b);
}

/// op's identity in the accumulator type: 0, the lowest value (max) or the highest (min).
template <class A>
TX_HW_FN A identity(int op) { return op == 0 ? A(0) : A(op == 1 ? -INFINITY : INFINITY); }

/// Offset of flat index i over `n` dims of sizes / strides (row-major: the last dim fastest).
TX_HW_FN int64_t unravel_offset(int64_t i, const int64_t* size, const int64_t* stride, int n) {
  int64_t off = 0;
  for (int d = n - 1; d >= 0; --d) {
    off += (i % size[d]) * stride[d];
    i /= size[d];
  }
  return off;
}
TX_HW_FN int64_t kept_offset(const ReduceLayout& L, int64_t o) { return unravel_offset(o, L.ksize, L.kstride, L.nk); }
TX_HW_FN int64_t red_offset(const ReduceLayout& L, int64_t r) { return unravel_offset(r, L.rsize, L.rstride, L.nr); }

template <class Hw, class A>
TX_HW_FN A warp_combine(int op, A v) {
  TX_UNROLL
  for (int o = 16; o > 0; o >>= 1) v = combine<A>(op, v, Hw::shfl_xor(v, o));
  return v;
}

/// GROUP threads per output: 32 (a warp; threads() / 32 outputs per block) or the block (GROUP ==
/// threads(), a multiple of 32 up to 1024: one output per block). A the accumulator (double for sums).
template <class Hw, class T, class A, int GROUP>
TX_HW_FN void reduce(int op, const T* x, T* out, const ReduceLayout& L) {
  const int lane = Hw::thread() % GROUP;
  const int64_t groups_per_block = Hw::threads() / GROUP;
  const A init = identity<A>(op);
  for (int64_t o = Hw::block_x() * groups_per_block + Hw::thread() / GROUP; o < L.nout;
       o += int64_t(Hw::grid_x()) * groups_per_block) {
    const T* base = x + kept_offset(L, o);
    A acc = init;
    for (int64_t r = lane; r < L.nred; r += GROUP) acc = combine<A>(op, acc, A(base[red_offset(L, r)]));
    acc = warp_combine<Hw>(op, acc);
    if constexpr (GROUP > 32) {
      TX_SHARED A sh[32];
      const int w = Hw::thread() >> 5;
      Hw::sync();  // the previous output's partials have been read
      if ((Hw::thread() & 31) == 0) sh[w] = acc;
      Hw::sync();
      if (Hw::thread() < 32) {
        A v = Hw::thread() < GROUP / 32 ? sh[Hw::thread()] : init;
        v = warp_combine<Hw>(op, v);
        if (Hw::thread() == 0) out[o] = T(v);
      }
    } else {
      if (lane == 0) out[o] = T(acc);
    }
  }
}

/// out[o] = the first index of the maximum along the one reduced axis of output o.
template <class Hw, class T>
TX_HW_FN void argmax(const T* x, int64_t* out, const ReduceLayout& L) {
  for (int64_t o = grid_index<Hw>(); o < L.nout; o += grid_stride<Hw>()) {
    const T* base = x + kept_offset(L, o);
    const int64_t n = L.rsize[0], st = L.rstride[0];
    int64_t best = 0;
    T bv = base[0];
    for (int64_t j = 1; j < n; ++j) {
      const T v = base[j * st];
      if (v > bv) bv = v, best = j;
    }
    out[o] = best;
  }
}

}  // namespace titanax::kernels::cuda::reduce_kernels
