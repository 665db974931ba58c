// The reduction kernels of kernels/cuda/reduce.cu (which launches them) as block bodies over a policy of
// hardware primitives (kernels/cuda/hw_policy.h), so that tests/emulated/ runs them on the CPU too.
// Reductions over any set of axes (ReduceLayout: the kept and the reduced dims, sizes and strides), in
// one of three shapes that ReducePlan (launch.h, chosen by kernels::cuda::reduce_plan from the sizes
// alone) picks:
//  - rows, a warp or a block per (output, split): lanes stride over the reduced elements (coalesced when
//    they are contiguous) and combine by warp shuffles (a block: one partial per warp through shared
//    memory);
//  - columns, when the kept innermost axis is the contiguous one (a bias gradient: the sum over rows of
//    [rows, features]): a block is 32 outputs (one per lane, so a warp reads 32 neighbouring elements of
//    a row) by threads() / 32 row groups, combined through shared memory;
//  - split: with few outputs and many elements each (a full reduction, a norm), each output's elements
//    are cut into `splits` chunks reduced by different warps / blocks into an accumulator workspace
//    [splits, nout], which reduce_partials combines, a warp per output, in a fixed order.
// Every order is fixed by the plan (sizes only), so results repeat bitwise. Sums accumulate in double, as
// the CPU's; max / min in the compute type and let NaN win, as the CPU's. f16 / bf16 inputs widen to f32 on
// load; results round once to the storage type (through f32 for double sums: the CPU's run_in_f32 rounds
// the same way). argmax: a thread per output, the first index of the maximum (strict >, so NaN wins only
// at index 0, as the CPU).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cuda/half.cuh"
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

/// Offset of flat index i over `n` dims of sizes / strides (row-major: the last dim fastest); one dim
/// (the common case: reduce_layout merges adjacent axes) without a division.
TX_HW_FN int64_t unravel_offset(int64_t i, const int64_t* size, const int64_t* stride, int n) {
  if (n == 1) return i * stride[0];
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

/// The combined elements [s chunk, min(nred, (s + 1) chunk)) of output base, starting at `first` of them
/// and stepping by `step`.
template <class T, class A>
TX_HW_FN A chunk_of(int op, const T* base, const ReduceLayout& L, int64_t s, int64_t chunk, int64_t first, int64_t step) {
  A acc = identity<A>(op);
  const int64_t end = (s + 1) * chunk < L.nred ? (s + 1) * chunk : L.nred;
  TX_UNROLL_4  // four loads in flight per thread (the adds keep their order)
  for (int64_t r = s * chunk + first; r < end; r += step) acc = combine<A>(op, acc, A(widen(base[red_offset(L, r)])));
  return acc;
}

/// Output o's result of split s: into out (one split) or the workspace partial [splits, nout].
template <class T, class A>
TX_HW_FN void store_result(A v, T* out, A* partial, const ReduceLayout& L, int64_t splits, int64_t s, int64_t o) {
  if (splits == 1) out[o] = store_as<T>(v);
  else partial[s * L.nout + o] = v;
}

/// Rows: GROUP threads per (output, split): 32 (a warp; threads() / 32 items per block) or the block
/// (GROUP == threads(), a multiple of 32 up to 1024). A the accumulator (double for sums).
template <class Hw, class T, class A, int GROUP>
TX_HW_FN void reduce_rows(int op, const T* x, T* out, A* partial, const ReduceLayout& L, int64_t splits, int64_t chunk) {
  const int lane = Hw::thread() % GROUP;
  const int64_t per_block = Hw::threads() / GROUP, items = L.nout * splits;
  for (int64_t w = Hw::block_x() * per_block + Hw::thread() / GROUP; w < items; w += int64_t(Hw::grid_x()) * per_block) {
    const int64_t o = w % L.nout, s = w / L.nout;
    A acc = warp_combine<Hw>(op, chunk_of<T, A>(op, x + kept_offset(L, o), L, s, chunk, lane, GROUP));
    if constexpr (GROUP > 32) {
      TX_SHARED A sh[32];
      const int wp = Hw::thread() >> 5;
      Hw::sync();  // the previous item's partials have been read
      if ((Hw::thread() & 31) == 0) sh[wp] = acc;
      Hw::sync();
      if (Hw::thread() < 32) {
        A v = Hw::thread() < GROUP / 32 ? sh[Hw::thread()] : identity<A>(op);
        v = warp_combine<Hw>(op, v);
        if (Hw::thread() == 0) store_result(v, out, partial, L, splits, s, o);
      }
    } else {
      if (lane == 0) store_result(acc, out, partial, L, splits, s, o);
    }
  }
}

/// Columns: the kept innermost axis contiguous (kstride[nk - 1] == 1). A block covers 32 consecutive
/// outputs (lane tx: output 32 tile + tx) for split blockIdx.y; its threads() / 32 row groups (ty) take
/// every (threads() / 32)-th element of the split's chunk, then row group 0 combines the groups' partials
/// in order. Tiles stride over blockIdx.x, splits over blockIdx.y.
template <class Hw, class T, class A>
TX_HW_FN void reduce_cols(int op, const T* x, T* out, A* partial, const ReduceLayout& L, int64_t splits, int64_t chunk) {
  TX_SHARED A sh[32][33];
  const int tx = Hw::thread() & 31, ty = Hw::thread() >> 5, groups = Hw::threads() >> 5;
  for (int64_t tile = Hw::block_x(); tile * 32 < L.nout; tile += Hw::grid_x()) {
    const int64_t o = tile * 32 + tx;
    for (int64_t s = Hw::block_y(); s < splits; s += Hw::grid_y()) {
      const A acc = o < L.nout ? chunk_of<T, A>(op, x + kept_offset(L, o), L, s, chunk, ty, groups) : identity<A>(op);
      Hw::sync();  // the previous item's partials have been read
      sh[ty][tx] = acc;
      Hw::sync();
      if (ty == 0 && o < L.nout) {
        A v = sh[0][tx];
        for (int k = 1; k < groups; ++k) v = combine<A>(op, v, sh[k][tx]);
        store_result(v, out, partial, L, splits, s, o);
      }
    }
  }
}

/// out[o] = the splits' partials [splits, nout] of output o combined: a warp per output, lanes striding
/// over the splits, then the butterfly (a fixed order).
template <class Hw, class T, class A>
TX_HW_FN void reduce_partials(int op, const A* partial, T* out, int64_t nout, int64_t splits) {
  const int lane = Hw::thread() & 31;
  const int64_t per_block = Hw::threads() / 32;
  for (int64_t o = Hw::block_x() * per_block + Hw::thread() / 32; o < nout; o += int64_t(Hw::grid_x()) * per_block) {
    A acc = identity<A>(op);
    for (int64_t s = lane; s < splits; s += 32) acc = combine<A>(op, acc, partial[s * nout + o]);
    acc = warp_combine<Hw>(op, acc);
    if (lane == 0) out[o] = store_as<T>(acc);
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
