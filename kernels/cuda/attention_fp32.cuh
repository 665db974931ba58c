// The FP32 (CUDA-core) attention kernels' block bodies (kernels/cuda/attention.cu launches them), written
// against a policy `Hw` of hardware primitives (kernels/cuda/hw_policy.h) so that tests/emulated/ runs them
// on the CPU too.
//
// Attention forward and backward in the FlashAttention-2 style (Dao 2023, "FlashAttention-2: Faster
// Attention with Better Parallelism and Work Partitioning", arXiv 2307.08691): tiles of keys stream through
// shared memory, the forward keeps an online softmax (running max m, running sum l, rescaled accumulator)
// per query row, and the backward recomputes P = exp(scale q k^T - lse) tile by tile, so no T x T matrix
// is ever stored. Everything accumulates in f32 registers; f16 / bf16 operands are widened on load and the
// results rounded to nearest on store. Deterministic: every sum has a fixed order and there are no atomics
// (the backward computes dq and dk / dv in two separate kernels instead of FA2's atomic dq).
//
// Layout: q [N, Tq, D], k, v [N, Tk, D], o, dout [N, Tq, D] with rows where their AttnRows in the
// AttentionLayout put them (kernels/cuda/launch.h: views such as q, k, v of one projection are read in place), lse,
// delta [N, Tq] (f32) contiguous.
// visible(i, j) = !causal || j <= i (top-left aligned). D <= 128: a lane owns features d = lane + 32 c,
// c < DC = ceil(D / 32) (a template parameter). Shared-memory rows hold floats with an odd pitch
// P = D | 1 >= D, so 32 lanes reading 32 different rows at the same column hit 32 different banks.
//
// Blocks of kAttnThreads = 128 threads = 4 warps; each warp owns kRowsPerWarp = 4 rows of its block:
//   forward        grid (ceil(Tq / 16), N): 16 query rows per block, key tiles of 32. Lane j computes the
//                  scores of key j of the tile for the warp's 4 rows, the warp reduces max / sum by
//                  shuffles, then each lane accumulates its features of p V (p_j broadcast by a shuffle).
//                  Shared: fwd_smem_floats(D) = (16 + 32 + 32) P floats (41,280 bytes at D = 128).
//   backward_dq    grid (ceil(Tq / 16), N): as the forward; dS = P * (dP - delta), dq = scale dS K.
//                  Shared: (16 + 16 + 32 + 32) P floats (49,536 bytes at D = 128: opt-in above 48 KB).
//   backward_dkdv  grid (ceil(Tk / 16), N): 16 keys per block, query tiles of 32 (lane i = query i of the
//                  tile); dv = P^T dout, dk = scale dS^T Q. Shared: (16 + 16 + 32 + 32) P + 64 floats.
// (delta_i = sum_d dout[i, d] o[i, d] comes first, from a kernel of its own in attention.cu.)
// Causal blocks skip the tiles that are masked for every row of the block: the forward and dq stop after
// the key tile holding key min(Tk - 1, last query row of the block); dk / dv start at the query tile
// holding query = the block's first key. grid.y is capped at 65535; blocks loop over n beyond it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/hw_policy.h"

namespace titanax::kernels::cuda::fp32_attention {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = 32 * kAttnWarps;
constexpr int kRowsPerWarp = 4;
constexpr int kBlockRows = kAttnWarps * kRowsPerWarp;  // 16 query rows (forward, dq) or keys (dk / dv) per block
constexpr int kTile = 32;                              // keys (forward, dq) or queries (dk / dv) per streamed tile

TX_HW_FN float ldf(const float* p, int64_t i) { return p[i]; }
TX_HW_FN float ldf(const __half* p, int64_t i) { return __half2float(p[i]); }
TX_HW_FN float ldf(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

// The backward's first step, for both kernel families: delta[n Tq + i] = sum_d dout[n, i, d] o[n, i, d] over
// the N * Tq rows of D (o, dout laid out as L.o, L.dout), in f32; one warp per row (any grid), lanes striding
// over d, then a fixed shuffle order.
template <class Hw, class T>
TX_HW_FN void attention_delta(const T* o, const T* dout, const AttentionLayout& L, float* delta, int64_t N, int64_t Tq,
                              int D) {
  const int lane = Hw::thread() & 31;
  const int64_t wpb = Hw::threads() >> 5, R = N * Tq;
  for (int64_t r = int64_t(Hw::block_x()) * wpb + (Hw::thread() >> 5); r < R; r += int64_t(Hw::grid_x()) * wpb) {
    const int64_t n = r / Tq, i = r - n * Tq;
    const T* orow = o + L.o.matrix(n) + i * L.o.row;
    const T* drow = dout + L.dout.matrix(n) + i * L.dout.row;
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s = fmaf(ldf(drow, d), ldf(orow, d), s);
    s = warp_sum_of<Hw>(s);
    if (lane == 0) delta[r] = s;
  }
}

TX_HW_FN void stf(float* p, int64_t i, float v) { p[i] = v; }
TX_HW_FN void stf(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
TX_HW_FN void stf(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// Rows [r0, r0 + nrows) of a [rows, D] matrix (row i at src + i * ld, its D features contiguous) into shared
// memory (pitch P), as floats; rows at or beyond `limit` are zeros (so that masked products are 0 * 0, never
// 0 * stale). Consecutive threads read consecutive elements of a row.
template <class Hw, class T>
TX_HW_FN void load_rows(float* dst, const T* src, int64_t ld, int64_t r0, int nrows, int64_t limit, int D, int P) {
  const int total = nrows * D;
  for (int e = Hw::thread(); e < total; e += kAttnThreads) {
    const int r = e / D, d = e - r * D;
    const int64_t gr = r0 + r;
    dst[r * P + d] = gr < limit ? ldf(src, gr * ld + d) : 0.f;
  }
}

TX_HW_FN bool visible(int64_t i, int64_t j, bool causal) { return !causal || j <= i; }

// Stores value(r, c) to row row0 + r (r < kRowsPerWarp: the warp's rows, those below `limit`), column
// lane + 32 c (those below D), of the [rows, D] `dst` (row i at dst + i * ld).
template <int DC, class T, class F>
TX_HW_FN void store_warp_rows(T* dst, int64_t ld, int64_t row0, int64_t limit, int D, int lane, F value) {
  TX_UNROLL
  for (int r = 0; r < kRowsPerWarp; ++r) {
    if (row0 + r >= limit) continue;
    TX_UNROLL
    for (int c = 0; c < DC; ++c) {
      const int d = lane + 32 * c;
      if (d < D) stf(dst, (row0 + r) * ld + d, value(r, c));
    }
  }
}

// For the warp's rows r: s[r] = sum_d a[r * P + d] * x[d] and t[r] = sum_d b[r * P + d] * y[d] (x, y: this
// lane's rows of the streamed tile). The scores and dP of the backward kernels.
TX_HW_FN void two_dots(float (&s)[kRowsPerWarp], const float* a, const float* x, float (&t)[kRowsPerWarp],
                       const float* b, const float* y, int P, int D) {
  TX_UNROLL
  for (int r = 0; r < kRowsPerWarp; ++r) s[r] = t[r] = 0.f;
  TX_UNROLL_4
  for (int d = 0; d < D; ++d) {
    const float xd = x[d], yd = y[d];
    TX_UNROLL
    for (int r = 0; r < kRowsPerWarp; ++r) {
      s[r] = fmaf(a[r * P + d], xd, s[r]);
      t[r] = fmaf(b[r * P + d], yd, t[r]);
    }
  }
}

// acc[r][c] += sum over the tile's rows jj of wt_r(jj) * tile[jj][lane + 32 c], where wt_r(jj) is lane jj's
// wt[r] (broadcast by __shfl_sync): the p V of the forward and the dS K of dq, for the warp's rows.
template <class Hw, int DC>
TX_HW_FN void accumulate_tile(float (&acc)[kRowsPerWarp][DC], const float (&wt)[kRowsPerWarp],
                                                const float* tile, int P, int D, int lane) {
  TX_UNROLL_4
  for (int jj = 0; jj < kTile; ++jj) {
    float t[DC];
    TX_UNROLL
    for (int c = 0; c < DC; ++c) {
      const int d = lane + 32 * c;
      t[c] = d < D ? tile[jj * P + d] : 0.f;
    }
    TX_UNROLL
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const float wj = Hw::shfl(wt[r], jj);
      TX_UNROLL
      for (int c = 0; c < DC; ++c) acc[r][c] = fmaf(wj, t[c], acc[r][c]);
    }
  }
}

// Forward: o = softmax(scale q k^T [+ mask]) v, lse = m + log(l).
template <class Hw, class T, int DC>
TX_HW_FN void forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                      float* __restrict__ lse, const AttentionLayout& L, int64_t N, int64_t Tq, int64_t Tk, int D,
                      bool causal, float scale, float* sm) {
  const int P = D | 1;
  float* Qs = sm;                    // [kBlockRows][P]
  float* Ks = Qs + kBlockRows * P;   // [kTile][P]
  float* Vs = Ks + kTile * P;        // [kTile][P]
  const int lane = Hw::thread() & 31, w = Hw::thread() >> 5;
  const int64_t q0 = int64_t(Hw::block_x()) * kBlockRows;
  const int64_t last = (q0 + kBlockRows < Tq ? q0 + kBlockRows : Tq) - 1;  // last valid query row of the block
  const int64_t kend = causal ? (Tk < last + 1 ? Tk : last + 1) : Tk;      // keys [0, kend) may be visible
  const float* qw = Qs + w * kRowsPerWarp * P;
  for (int64_t n = Hw::block_y(); n < N; n += Hw::grid_y()) {
    const T* kn = k + L.k.matrix(n);
    const T* vn = v + L.v.matrix(n);
    Hw::sync();  // the previous n's readers of Qs / Ks / Vs are done
    load_rows<Hw>(Qs, q + L.q.matrix(n), L.q.row, q0, kBlockRows, Tq, D, P);
    float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][DC];
    TX_UNROLL
    for (int r = 0; r < kRowsPerWarp; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.f;
      TX_UNROLL
      for (int c = 0; c < DC; ++c) acc[r][c] = 0.f;
    }
    for (int64_t k0 = 0; k0 < kend; k0 += kTile) {
      Hw::sync();  // everyone is done with the previous tile
      load_rows<Hw>(Ks, kn, L.k.row, k0, kTile, Tk, D, P);
      load_rows<Hw>(Vs, vn, L.v.row, k0, kTile, Tk, D, P);
      Hw::sync();
      // Scores of key j = k0 + lane for the warp's rows (one pass over K's row: reused by 4 rows).
      float s[kRowsPerWarp];
      TX_UNROLL
      for (int r = 0; r < kRowsPerWarp; ++r) s[r] = 0.f;
      const float* kr = Ks + lane * P;
      TX_UNROLL_4
      for (int d = 0; d < D; ++d) {
        const float kd = kr[d];
        TX_UNROLL
        for (int r = 0; r < kRowsPerWarp; ++r) s[r] = fmaf(qw[r * P + d], kd, s[r]);
      }
      const int64_t j = k0 + lane;
      float p[kRowsPerWarp];
      TX_UNROLL
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t i = q0 + w * kRowsPerWarp + r;
        const bool vis = j < Tk && visible(i, j, causal);
        const float sv = vis ? s[r] * scale : -INFINITY;
        const float mnew = fmaxf(m[r], warp_max_of<Hw>(sv));
        // m = -inf: nothing accumulated yet (l = acc = 0); guards exp(-inf - -inf) = NaN.
        const float alpha = m[r] == -INFINITY ? 0.f : expf(m[r] - mnew);
        p[r] = vis ? expf(sv - mnew) : 0.f;
        l[r] = l[r] * alpha + warp_sum_of<Hw>(p[r]);
        m[r] = mnew;
        TX_UNROLL
        for (int c = 0; c < DC; ++c) acc[r][c] *= alpha;
      }
      accumulate_tile<Hw, DC>(acc, p, Vs, P, D, lane);
    }
    // l == 0 only when no key is visible (Tk == 0): the empty sum, o = 0 and lse = -inf. A NaN l (NaN
    // inputs) propagates.
    const int64_t row0 = q0 + w * kRowsPerWarp;
    store_warp_rows<DC>(o + L.o.matrix(n), L.o.row, row0, Tq, D, lane, [&](int r, int c) { return l[r] == 0.f ? 0.f : acc[r][c] / l[r]; });
    TX_UNROLL
    for (int r = 0; r < kRowsPerWarp; ++r)
      if (lane == 0 && row0 + r < Tq) lse[n * Tq + row0 + r] = l[r] == 0.f ? -INFINITY : m[r] + logf(l[r]);
  }
}

// dq_i = scale sum_j dS_ij k_j with dS_ij = P_ij (dP_ij - delta_i), P_ij = exp(scale q_i.k_j - lse_i),
// dP_ij = dout_i.v_j. Same tiling as the forward.
template <class Hw, class T, int DC>
TX_HW_FN void backward_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
              const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq,
              const AttentionLayout& L, int64_t N, int64_t Tq, int64_t Tk, int D, bool causal, float scale, float* sm) {
  const int P = D | 1;
  float* Qs = sm;                    // [kBlockRows][P]
  float* Os = Qs + kBlockRows * P;   // dout rows [kBlockRows][P]
  float* Ks = Os + kBlockRows * P;   // [kTile][P]
  float* Vs = Ks + kTile * P;        // [kTile][P]
  const int lane = Hw::thread() & 31, w = Hw::thread() >> 5;
  const int64_t q0 = int64_t(Hw::block_x()) * kBlockRows;
  const int64_t last = (q0 + kBlockRows < Tq ? q0 + kBlockRows : Tq) - 1;
  const int64_t kend = causal ? (Tk < last + 1 ? Tk : last + 1) : Tk;
  const float* qw = Qs + w * kRowsPerWarp * P;
  const float* ow = Os + w * kRowsPerWarp * P;
  for (int64_t n = Hw::block_y(); n < N; n += Hw::grid_y()) {
    const T* kn = k + L.k.matrix(n);
    const T* vn = v + L.v.matrix(n);
    Hw::sync();
    load_rows<Hw>(Qs, q + L.q.matrix(n), L.q.row, q0, kBlockRows, Tq, D, P);
    load_rows<Hw>(Os, dout + L.dout.matrix(n), L.dout.row, q0, kBlockRows, Tq, D, P);
    float li[kRowsPerWarp], di[kRowsPerWarp], acc[kRowsPerWarp][DC];
    TX_UNROLL
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t i = q0 + w * kRowsPerWarp + r;
      li[r] = i < Tq ? lse[n * Tq + i] : 0.f;
      di[r] = i < Tq ? delta[n * Tq + i] : 0.f;
      TX_UNROLL
      for (int c = 0; c < DC; ++c) acc[r][c] = 0.f;
    }
    for (int64_t k0 = 0; k0 < kend; k0 += kTile) {
      Hw::sync();
      load_rows<Hw>(Ks, kn, L.k.row, k0, kTile, Tk, D, P);
      load_rows<Hw>(Vs, vn, L.v.row, k0, kTile, Tk, D, P);
      Hw::sync();
      float s[kRowsPerWarp], dp[kRowsPerWarp];
      two_dots(s, qw, Ks + lane * P, dp, ow, Vs + lane * P, P, D);  // s = q_i . k_j, dp = dout_i . v_j
      const int64_t j = k0 + lane;
      float ds[kRowsPerWarp];
      TX_UNROLL
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t i = q0 + w * kRowsPerWarp + r;
        const bool vis = i < Tq && j < Tk && visible(i, j, causal);
        const float pij = vis ? expf(s[r] * scale - li[r]) : 0.f;
        ds[r] = vis ? pij * (dp[r] - di[r]) : 0.f;
      }
      accumulate_tile<Hw, DC>(acc, ds, Ks, P, D, lane);
    }
    store_warp_rows<DC>(dq + L.dq.matrix(n), L.dq.row, q0 + w * kRowsPerWarp, Tq, D, lane, [&](int r, int c) { return acc[r][c] * scale; });
  }
}

// dv_j = sum_i P_ij dout_i, dk_j = scale sum_i dS_ij q_i: 16 keys per block (4 per warp), query tiles of 32
// with lane i = query q0 + i of the tile.
template <class Hw, class T, int DC>
TX_HW_FN void backward_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                T* __restrict__ dk, T* __restrict__ dv, const AttentionLayout& L, int64_t N, int64_t Tq, int64_t Tk,
                int D, bool causal, float scale, float* sm) {
  const int P = D | 1;
  float* Ks = sm;                    // the block's keys [kBlockRows][P]
  float* Vs = Ks + kBlockRows * P;   // [kBlockRows][P]
  float* Qs = Vs + kBlockRows * P;   // query tile [kTile][P]
  float* Os = Qs + kTile * P;        // dout tile [kTile][P]
  float* Ls = Os + kTile * P;        // lse of the tile [kTile]
  float* Ds = Ls + kTile;            // delta of the tile [kTile]
  const int lane = Hw::thread() & 31, w = Hw::thread() >> 5;
  const int64_t j0 = int64_t(Hw::block_x()) * kBlockRows;
  // Causal: queries i < j0 see none of the block's keys; start at the tile holding query j0.
  const int64_t qbegin = causal ? (j0 / kTile) * kTile : 0;
  const float* kw = Ks + w * kRowsPerWarp * P;
  const float* vw = Vs + w * kRowsPerWarp * P;
  for (int64_t n = Hw::block_y(); n < N; n += Hw::grid_y()) {
    const T* qn = q + L.q.matrix(n);
    const T* on = dout + L.dout.matrix(n);
    Hw::sync();
    load_rows<Hw>(Ks, k + L.k.matrix(n), L.k.row, j0, kBlockRows, Tk, D, P);
    load_rows<Hw>(Vs, v + L.v.matrix(n), L.v.row, j0, kBlockRows, Tk, D, P);
    float ak[kRowsPerWarp][DC], av[kRowsPerWarp][DC];
    TX_UNROLL
    for (int r = 0; r < kRowsPerWarp; ++r)
      TX_UNROLL
      for (int c = 0; c < DC; ++c) ak[r][c] = av[r][c] = 0.f;
    for (int64_t q0 = qbegin; q0 < Tq; q0 += kTile) {
      Hw::sync();
      load_rows<Hw>(Qs, qn, L.q.row, q0, kTile, Tq, D, P);
      load_rows<Hw>(Os, on, L.dout.row, q0, kTile, Tq, D, P);
      if (Hw::thread() < kTile) {
        const int64_t i = q0 + Hw::thread();
        Ls[Hw::thread()] = i < Tq ? lse[n * Tq + i] : 0.f;
        Ds[Hw::thread()] = i < Tq ? delta[n * Tq + i] : 0.f;
      }
      Hw::sync();
      const int64_t i = q0 + lane;
      const float li = Ls[lane], di = Ds[lane];
      float s[kRowsPerWarp], dp[kRowsPerWarp];
      two_dots(s, kw, Qs + lane * P, dp, vw, Os + lane * P, P, D);  // s = k_j . q_i, dp = v_j . dout_i
      float p[kRowsPerWarp], ds[kRowsPerWarp];
      TX_UNROLL
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t j = j0 + w * kRowsPerWarp + r;
        const bool vis = i < Tq && j < Tk && visible(i, j, causal);
        p[r] = vis ? expf(s[r] * scale - li) : 0.f;
        ds[r] = vis ? p[r] * (dp[r] - di) : 0.f;
      }
      TX_UNROLL_4
      for (int ii = 0; ii < kTile; ++ii) {
        float qq[DC], oo[DC];
        TX_UNROLL
        for (int c = 0; c < DC; ++c) {
          const int d = lane + 32 * c;
          qq[c] = d < D ? Qs[ii * P + d] : 0.f;
          oo[c] = d < D ? Os[ii * P + d] : 0.f;
        }
        TX_UNROLL
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const float pi = Hw::shfl(p[r], ii);
          const float dsi = Hw::shfl(ds[r], ii);
          TX_UNROLL
          for (int c = 0; c < DC; ++c) {
            av[r][c] = fmaf(pi, oo[c], av[r][c]);
            ak[r][c] = fmaf(dsi, qq[c], ak[r][c]);
          }
        }
      }
    }
    const int64_t row0 = j0 + w * kRowsPerWarp;
    store_warp_rows<DC>(dk + L.dk.matrix(n), L.dk.row, row0, Tk, D, lane, [&](int r, int c) { return ak[r][c] * scale; });
    store_warp_rows<DC>(dv + L.dv.matrix(n), L.dv.row, row0, Tk, D, lane, [&](int r, int c) { return av[r][c]; });
  }
}

/// Shared memory of each block body, in floats, for head dim D.
inline size_t fwd_smem_floats(int D) { return size_t(kBlockRows + 2 * kTile) * size_t(D | 1); }
inline size_t dq_smem_floats(int D) { return size_t(2 * kBlockRows + 2 * kTile) * size_t(D | 1); }
inline size_t dkdv_smem_floats(int D) { return dq_smem_floats(D) + size_t(2 * kTile); }

}  // namespace titanax::kernels::cuda::fp32_attention
