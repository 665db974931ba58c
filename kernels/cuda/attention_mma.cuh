// Attention forward and backward on tensor cores (bf16 / f16, head dim 64 or 128): the FlashAttention-2
// algorithm of attention.cu (Dao 2023, arXiv 2307.08691; same layout, masks, lse and results up to
// rounding) with the products Q K^T, P V, dO V^T, dS K, P^T dO and dS^T Q on warp-level MMAs
// (mma.sync.aligned.m16n8k16, f32 accumulation: PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type"). Per lane, with g = lane / 4 and c = lane % 4, a 32-bit register holds two
// consecutive 16-bit elements (the lower index in the low half):
//   A 16x16, row-major:   a[0] = A[g][2c, 2c+1]   a[1] = A[g+8][2c, 2c+1]
//                         a[2] = A[g][2c+8, 2c+9] a[3] = A[g+8][2c+8, 2c+9]
//   B 16x8 (k x n):       b[0] = B[2c, 2c+1][g]   b[1] = B[2c+8, 2c+9][g]
//   C 16x8, f32:          c[0], c[1] = C[g][2c, 2c+1]   c[2], c[3] = C[g+8][2c, 2c+1]
// A C fragment of scores is, packed to 16 bits, the A fragment of the next product (FA2's register reuse:
// P never goes through shared memory). A product X Y^T with both operands row-major in shared memory
// reads B = Y^T as pairs of one Y row; a product X Y reads B = Y from a transposed copy of Y (pitch
// rows + 8) so that its pairs are contiguous too. Shared rows have a pitch of D + 8 elements (16-byte
// aligned rows; consecutive rows start 4 banks apart).
//
// Blocks of 4 warps; a warp owns 16 rows (queries in the forward and dq, keys in dk / dv), a block 64, and
// the other side streams through shared memory in tiles of 64. Softmax statistics stay in f32 (exp2 of
// scores pre-multiplied by scale * log2(e)); P and dS are rounded to the inputs' 16-bit type for their
// products, as FlashAttention does. Deterministic: fixed orders, no atomics (dq and dk / dv in separate
// kernels, as attention.cu). Causal blocks skip fully masked tiles as attention.cu does.
//
// The block bodies are written against a policy `Hw` of hardware primitives (kernels/cuda/hw_policy.h),
// so that the same code runs on the GPU (attention_mma.cu) and in tests/emulated/ (128 host threads per
// block, barriers, and the mma computed from the documented fragment layout), where CI checks it without a
// GPU. Every block runs kMmaThreads threads; `smem` holds the *_smem_bytes below.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernels/cuda/hw_policy.h"


namespace titanax::kernels::cuda::mma_attention {

constexpr int kMmaThreads = 128;  // 4 warps
constexpr int kMmaRows = 64;      // rows a block owns (16 per warp)
constexpr int kMmaTile = 64;      // rows of a streamed tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

/// Dynamic shared memory of each kernel, in bytes.
template <class T, int D>
constexpr size_t fwd_smem_bytes() {  // Q, K [64][D+8], V^T [D][72]
  return (size_t(kMmaRows + kMmaTile) * (D + 8) + size_t(D) * (kMmaTile + 8)) * sizeof(T);
}
template <class T, int D>
constexpr size_t dq_smem_bytes() {  // Q, dO, K, V [64][D+8], K^T [D][72]
  return (size_t(2 * kMmaRows + 2 * kMmaTile) * (D + 8) + size_t(D) * (kMmaTile + 8)) * sizeof(T);
}
template <class T, int D>
constexpr size_t dkdv_smem_bytes() {  // K, V, Q, dO [64][D+8], Q^T, dO^T [D][72], lse and delta [64] f32
  return (size_t(2 * kMmaRows + 2 * kMmaTile) * (D + 8) + size_t(2 * D) * (kMmaTile + 8)) * sizeof(T) +
         size_t(2 * kMmaTile) * sizeof(float);
}

// Two floats rounded to the 16-bit type, lo in the low half.
TX_HW_FN uint32_t pack2(float lo, float hi, __nv_bfloat16) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
TX_HW_FN uint32_t pack2(float lo, float hi, __half) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

// The A fragment of the 16 rows at `base` (pitch P), columns [k0, k0 + 16).
template <class Hw, class T>
TX_HW_FN void load_a(uint32_t (&a)[4], const T* base, int P, int k0, int g, int c) {
  a[0] = Hw::ld32(base + g * P + k0 + 2 * c);
  a[1] = Hw::ld32(base + (g + 8) * P + k0 + 2 * c);
  a[2] = Hw::ld32(base + g * P + k0 + 8 + 2 * c);
  a[3] = Hw::ld32(base + (g + 8) * P + k0 + 8 + 2 * c);
}

// The B fragment of B[k][n] = Y[n0 + n][k0 + k] for Y row-major at `y` (pitch P): B = Y^T.
template <class Hw, class T>
TX_HW_FN void load_bt(uint32_t (&b)[2], const T* y, int P, int n0, int k0, int g, int c) {
  b[0] = Hw::ld32(y + (n0 + g) * P + k0 + 2 * c);
  b[1] = Hw::ld32(y + (n0 + g) * P + k0 + 8 + 2 * c);
}

// The A fragment of a 16 x 16 block of a product's f32 C fragments: columns [16 kk, 16 kk + 16) are the
// n-tiles 2 kk (lo) and 2 kk + 1 (hi), rounded to T.
template <class T>
TX_HW_FN void a_from_c(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2(lo[0], lo[1], T{});
  a[1] = pack2(lo[2], lo[3], T{});
  a[2] = pack2(hi[0], hi[1], T{});
  a[3] = pack2(hi[2], hi[3], T{});
}

// Rows [r0, r0 + R) of a contiguous [rows, D] matrix into shared memory (pitch D + 8), 16 bytes at a time;
// rows at or beyond `limit` are zeros.
template <class Hw, class T, int D, int R>
TX_HW_FN void load_tile(T* dst, const T* src, int64_t r0, int64_t limit) {
  constexpr int V = D / 8;
  for (int e = Hw::thread(); e < R * V; e += kMmaThreads) {
    const int r = e / V, col = (e - r * V) * 8;
    if (r0 + r < limit) Hw::copy16(dst + r * (D + 8) + col, src + (r0 + r) * D + col);
    else Hw::zero16(dst + r * (D + 8) + col);
  }
}

// The same rows transposed: dst[d][r] (pitch R + 8). A thread reads 8 consecutive features of one row (16
// bytes) and writes them down 8 columns; consecutive threads take consecutive rows, so each of the 8
// 2-byte stores of a warp covers 64 consecutive bytes (no bank conflict).
template <class Hw, class T, int D, int R>
TX_HW_FN void load_tile_t(T* dst, const T* src, int64_t r0, int64_t limit) {
  constexpr int V = D / 8;
  for (int e = Hw::thread(); e < R * V; e += kMmaThreads) {
    const int r = e % R, d0 = (e / R) * 8;
    alignas(16) T vals[8];
    if (r0 + r < limit) Hw::copy16(vals, src + (r0 + r) * D + d0);
    else Hw::zero16(vals);
    TX_UNROLL
    for (int i = 0; i < 8; ++i) dst[(d0 + i) * (R + 8) + r] = vals[i];
  }
}

template <class Hw>
TX_HW_FN float quad_max(float v) {
  v = fmaxf(v, Hw::shfl_xor(v, 1));
  return fmaxf(v, Hw::shfl_xor(v, 2));
}
template <class Hw>
TX_HW_FN float quad_sum(float v) {
  v += Hw::shfl_xor(v, 1);
  return v + Hw::shfl_xor(v, 2);
}

TX_HW_FN bool visible(int64_t i, int64_t j, bool causal) { return !causal || j <= i; }

// For n-tile nt of two products over the D features, s = X1 Y1^T and t = X2 Y2^T: the warp's 16 rows of
// X1 / X2 at x1 / x2 against rows [8 nt, 8 nt + 8) of the tiles Y1 / Y2 (all row-major, pitch D + 8).
// The backward's S and dP (dq) or S^T and dP^T (dk / dv).
template <class Hw, class T, int D>
TX_HW_FN void two_products(float (&s)[4], float (&t)[4], const T* x1, const T* y1, const T* x2, const T* y2, int nt, int g,
                            int c) {
  TX_UNROLL
  for (int e = 0; e < 4; ++e) s[e] = t[e] = 0.f;
  TX_UNROLL
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4], b[2];
    load_a<Hw>(a, x1, D + 8, kk * 16, g, c);
    load_bt<Hw>(b, y1, D + 8, nt * 8, kk * 16, g, c);
    Hw::mma(s, a, b, T{});
    load_a<Hw>(a, x2, D + 8, kk * 16, g, c);
    load_bt<Hw>(b, y2, D + 8, nt * 8, kk * 16, g, c);
    Hw::mma(t, a, b, T{});
  }
}

// acc (the warp's 16 x D f32 C fragments) += X Y, where X is the warp's 16 x 64 product held as C
// fragments x (rounded to T for the MMA) and Y a 64 x D tile given transposed in shared memory:
// yt[d][row], pitch kMmaTile + 8. P V, dS K, P^T dO and dS^T Q.
template <class Hw, class T, int D>
TX_HW_FN void accumulate_product(float (&acc)[D / 8][4], const float (&x)[kMmaTile / 8][4], const T* yt, int g, int c) {
  TX_UNROLL
  for (int kk = 0; kk < kMmaTile / 16; ++kk) {
    uint32_t a[4];
    a_from_c<T>(a, x[2 * kk], x[2 * kk + 1]);
    TX_UNROLL
    for (int dt = 0; dt < D / 8; ++dt) {
      uint32_t b[2];
      load_bt<Hw>(b, yt, kMmaTile + 8, dt * 8, kk * 16, g, c);  // B[row][d] = yt[d][row]
      Hw::mma(acc[dt], a, b, T{});
    }
  }
}

// ------------------------------------------------------------------------------------ forward

// o = softmax(scale q k^T [+ mask]) v and lse, for the 64 query rows of block x (every n = block_y, +
// grid_y, ...). scale_log2 = scale * log2(e).
template <class Hw, class T, int D>
TX_HW_FN void forward(const T* q, const T* k, const T* v, T* o, float* lse, int64_t N, int64_t Tq, int64_t Tk,
                       bool causal, float scale_log2, unsigned char* smem) {
  constexpr int P = D + 8, KS = D / 16, NT = kMmaTile / 8, DT = D / 8;
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + kMmaRows * P;
  T* Vt = Ks + kMmaTile * P;
  const int lane = Hw::thread() & 31, w = Hw::thread() >> 5, g = lane >> 2, c = lane & 3;
  const int64_t q0 = int64_t(Hw::block_x()) * kMmaRows;
  const int64_t last = (q0 + kMmaRows < Tq ? q0 + kMmaRows : Tq) - 1;
  const int64_t kend = causal ? (Tk < last + 1 ? Tk : last + 1) : Tk;
  const int64_t row[2] = {q0 + w * 16 + g, q0 + w * 16 + g + 8};
  for (int64_t n = Hw::block_y(); n < N; n += Hw::grid_y()) {
    const T* kn = k + n * Tk * D;
    const T* vn = v + n * Tk * D;
    Hw::sync();
    load_tile<Hw, T, D, kMmaRows>(Qs, q + n * Tq * D, q0, Tq);
    Hw::sync();
    uint32_t qa[KS][4];
    TX_UNROLL
    for (int kk = 0; kk < KS; ++kk) load_a<Hw>(qa[kk], Qs + w * 16 * P, P, kk * 16, g, c);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, acc[DT][4];
    TX_UNROLL
    for (int dt = 0; dt < DT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
    for (int64_t k0 = 0; k0 < kend; k0 += kMmaTile) {
      Hw::sync();
      load_tile<Hw, T, D, kMmaTile>(Ks, kn, k0, Tk);
      load_tile_t<Hw, T, D, kMmaTile>(Vt, vn, k0, Tk);
      Hw::sync();
      float s[NT][4];
      TX_UNROLL
      for (int nt = 0; nt < NT; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
        TX_UNROLL
        for (int kk = 0; kk < KS; ++kk) {
          uint32_t b[2];
          load_bt<Hw>(b, Ks, P, nt * 8, kk * 16, g, c);
          Hw::mma(s[nt], qa[kk], b, T{});
        }
      }
      float mx[2] = {m[0], m[1]};
      TX_UNROLL
      for (int nt = 0; nt < NT; ++nt)
        TX_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int64_t j = k0 + nt * 8 + 2 * c + (e & 1);
          const bool vis = j < Tk && visible(row[e >> 1], j, causal);
          s[nt][e] = vis ? s[nt][e] * scale_log2 : -INFINITY;
          mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
        }
      float alpha[2], rs[2] = {0.f, 0.f};
      TX_UNROLL
      for (int r = 0; r < 2; ++r) {
        mx[r] = quad_max<Hw>(mx[r]);
        alpha[r] = m[r] == -INFINITY ? 0.f : exp2f(m[r] - mx[r]);  // nothing accumulated yet: no NaN
      }
      TX_UNROLL
      for (int nt = 0; nt < NT; ++nt)
        TX_UNROLL
        for (int e = 0; e < 4; ++e) {
          const float p = s[nt][e] == -INFINITY ? 0.f : exp2f(s[nt][e] - mx[e >> 1]);
          s[nt][e] = p;
          rs[e >> 1] += p;
        }
      TX_UNROLL
      for (int r = 0; r < 2; ++r) {
        l[r] = l[r] * alpha[r] + quad_sum<Hw>(rs[r]);
        m[r] = mx[r];
      }
      TX_UNROLL
      for (int dt = 0; dt < DT; ++dt) {
        acc[dt][0] *= alpha[0];
        acc[dt][1] *= alpha[0];
        acc[dt][2] *= alpha[1];
        acc[dt][3] *= alpha[1];
      }
      accumulate_product<Hw, T, D>(acc, s, Vt, g, c);  // o += P V
    }
    T* on = o + n * Tq * D;
    TX_UNROLL
    for (int r = 0; r < 2; ++r) {
      if (row[r] >= Tq) continue;
      // l == 0 only when no key is visible (Tk == 0): o = 0 and lse = -inf, as attention.cu.
      const float inv = l[r] == 0.f ? 0.f : 1.f / l[r];
      TX_UNROLL
      for (int dt = 0; dt < DT; ++dt)
        Hw::st32(on + row[r] * D + dt * 8 + 2 * c, pack2(acc[dt][2 * r] * inv, acc[dt][2 * r + 1] * inv, T{}));
      if (c == 0) lse[n * Tq + row[r]] = l[r] == 0.f ? -INFINITY : (m[r] + log2f(l[r])) * kLn2;
    }
  }
}

// ------------------------------------------------------------------------------------ backward

// dq_i = scale sum_j dS_ij k_j, dS = P (dP - delta), P = exp(scale q k^T - lse), dP = dout v^T, for the 64
// query rows of block x. delta_i = sum_d dout_id o_id (computed before).
template <class Hw, class T, int D>
TX_HW_FN void backward_dq(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta,
                           T* dq, int64_t N, int64_t Tq, int64_t Tk, bool causal, float scale_log2, float scale,
                           unsigned char* smem) {
  constexpr int P = D + 8, NT = kMmaTile / 8, DT = D / 8;
  T* Qs = reinterpret_cast<T*>(smem);
  T* Os = Qs + kMmaRows * P;
  T* Ks = Os + kMmaRows * P;
  T* Vs = Ks + kMmaTile * P;
  T* Kt = Vs + kMmaTile * P;
  const int lane = Hw::thread() & 31, w = Hw::thread() >> 5, g = lane >> 2, c = lane & 3;
  const int64_t q0 = int64_t(Hw::block_x()) * kMmaRows;
  const int64_t last = (q0 + kMmaRows < Tq ? q0 + kMmaRows : Tq) - 1;
  const int64_t kend = causal ? (Tk < last + 1 ? Tk : last + 1) : Tk;
  const int64_t row[2] = {q0 + w * 16 + g, q0 + w * 16 + g + 8};
  const T* qw = Qs + w * 16 * P;
  const T* ow = Os + w * 16 * P;
  for (int64_t n = Hw::block_y(); n < N; n += Hw::grid_y()) {
    const T* kn = k + n * Tk * D;
    const T* vn = v + n * Tk * D;
    Hw::sync();
    load_tile<Hw, T, D, kMmaRows>(Qs, q + n * Tq * D, q0, Tq);
    load_tile<Hw, T, D, kMmaRows>(Os, dout + n * Tq * D, q0, Tq);
    float l2[2], di[2], acc[DT][4];
    TX_UNROLL
    for (int r = 0; r < 2; ++r) {
      l2[r] = row[r] < Tq ? lse[n * Tq + row[r]] * kLog2e : 0.f;
      di[r] = row[r] < Tq ? delta[n * Tq + row[r]] : 0.f;
    }
    TX_UNROLL
    for (int dt = 0; dt < DT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
    for (int64_t k0 = 0; k0 < kend; k0 += kMmaTile) {
      Hw::sync();
      load_tile<Hw, T, D, kMmaTile>(Ks, kn, k0, Tk);
      load_tile<Hw, T, D, kMmaTile>(Vs, vn, k0, Tk);
      load_tile_t<Hw, T, D, kMmaTile>(Kt, kn, k0, Tk);
      Hw::sync();
      float s[NT][4], dp[NT][4];
      TX_UNROLL
      for (int nt = 0; nt < NT; ++nt) {
        two_products<Hw, T, D>(s[nt], dp[nt], qw, Ks, ow, Vs, nt, g, c);  // S = Q K^T, dP = dO V^T
        TX_UNROLL
        for (int e = 0; e < 4; ++e) {  // dS, into dp
          const int64_t i = row[e >> 1], j = k0 + nt * 8 + 2 * c + (e & 1);
          const bool vis = i < Tq && j < Tk && visible(i, j, causal);
          const float pij = vis ? exp2f(s[nt][e] * scale_log2 - l2[e >> 1]) : 0.f;
          dp[nt][e] = vis ? pij * (dp[nt][e] - di[e >> 1]) : 0.f;
        }
      }
      accumulate_product<Hw, T, D>(acc, dp, Kt, g, c);  // dq += dS K
    }
    T* dqn = dq + n * Tq * D;
    TX_UNROLL
    for (int r = 0; r < 2; ++r) {
      if (row[r] >= Tq) continue;
      TX_UNROLL
      for (int dt = 0; dt < DT; ++dt)
        Hw::st32(dqn + row[r] * D + dt * 8 + 2 * c, pack2(acc[dt][2 * r] * scale, acc[dt][2 * r + 1] * scale, T{}));
    }
  }
}

// dv_j = sum_i P_ij dout_i, dk_j = scale sum_i dS_ij q_i for the 64 keys of block x, query tiles of 64. The
// transposed products: S^T = K Q^T, dP^T = V dO^T, then dV += P^T dO, dK += dS^T Q.
template <class Hw, class T, int D>
TX_HW_FN void backward_dkdv(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta,
                             T* dk, T* dv, int64_t N, int64_t Tq, int64_t Tk, bool causal, float scale_log2, float scale,
                             unsigned char* smem) {
  constexpr int P = D + 8, TP = kMmaTile + 8, NT = kMmaTile / 8, DT = D / 8;
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + kMmaRows * P;
  T* Qs = Vs + kMmaRows * P;
  T* Os = Qs + kMmaTile * P;
  T* Qt = Os + kMmaTile * P;
  T* Ot = Qt + D * TP;
  float* Ls = reinterpret_cast<float*>(Ot + D * TP);  // lse * log2(e) of the tile
  float* Ds = Ls + kMmaTile;                          // delta of the tile
  const int lane = Hw::thread() & 31, w = Hw::thread() >> 5, g = lane >> 2, c = lane & 3;
  const int64_t j0 = int64_t(Hw::block_x()) * kMmaRows;
  const int64_t qbegin = causal ? (j0 / kMmaTile) * kMmaTile : 0;  // queries before j0 see none of the keys
  const int64_t key[2] = {j0 + w * 16 + g, j0 + w * 16 + g + 8};
  const T* kw = Ks + w * 16 * P;
  const T* vw = Vs + w * 16 * P;
  for (int64_t n = Hw::block_y(); n < N; n += Hw::grid_y()) {
    const T* qn = q + n * Tq * D;
    const T* on = dout + n * Tq * D;
    Hw::sync();
    load_tile<Hw, T, D, kMmaRows>(Ks, k + n * Tk * D, j0, Tk);
    load_tile<Hw, T, D, kMmaRows>(Vs, v + n * Tk * D, j0, Tk);
    float ak[DT][4], av[DT][4];
    TX_UNROLL
    for (int dt = 0; dt < DT; ++dt)
      TX_UNROLL
      for (int e = 0; e < 4; ++e) ak[dt][e] = av[dt][e] = 0.f;
    for (int64_t i0 = qbegin; i0 < Tq; i0 += kMmaTile) {
      Hw::sync();
      load_tile<Hw, T, D, kMmaTile>(Qs, qn, i0, Tq);
      load_tile<Hw, T, D, kMmaTile>(Os, on, i0, Tq);
      load_tile_t<Hw, T, D, kMmaTile>(Qt, qn, i0, Tq);
      load_tile_t<Hw, T, D, kMmaTile>(Ot, on, i0, Tq);
      if (Hw::thread() < kMmaTile) {
        const int64_t i = i0 + Hw::thread();
        Ls[Hw::thread()] = i < Tq ? lse[n * Tq + i] * kLog2e : 0.f;
        Ds[Hw::thread()] = i < Tq ? delta[n * Tq + i] : 0.f;
      }
      Hw::sync();
      float st[NT][4], dpt[NT][4];  // rows: the warp's keys; columns: the tile's queries
      TX_UNROLL
      for (int nt = 0; nt < NT; ++nt) {
        two_products<Hw, T, D>(st[nt], dpt[nt], kw, Qs, vw, Os, nt, g, c);  // S^T = K Q^T, dP^T = V dO^T
        TX_UNROLL
        for (int e = 0; e < 4; ++e) {  // P^T into st, dS^T into dpt
          const int qi = nt * 8 + 2 * c + (e & 1);
          const int64_t i = i0 + qi, j = key[e >> 1];
          const bool vis = i < Tq && j < Tk && visible(i, j, causal);
          const float pij = vis ? exp2f(st[nt][e] * scale_log2 - Ls[qi]) : 0.f;
          st[nt][e] = pij;
          dpt[nt][e] = vis ? pij * (dpt[nt][e] - Ds[qi]) : 0.f;
        }
      }
      accumulate_product<Hw, T, D>(av, st, Ot, g, c);   // dv += P^T dO
      accumulate_product<Hw, T, D>(ak, dpt, Qt, g, c);  // dk += dS^T Q (scaled at the end)
    }
    T* dkn = dk + n * Tk * D;
    T* dvn = dv + n * Tk * D;
    TX_UNROLL
    for (int r = 0; r < 2; ++r) {
      if (key[r] >= Tk) continue;
      TX_UNROLL
      for (int dt = 0; dt < DT; ++dt) {
        Hw::st32(dkn + key[r] * D + dt * 8 + 2 * c, pack2(ak[dt][2 * r] * scale, ak[dt][2 * r + 1] * scale, T{}));
        Hw::st32(dvn + key[r] * D + dt * 8 + 2 * c, pack2(av[dt][2 * r], av[dt][2 * r + 1], T{}));
      }
    }
  }
}

}  // namespace titanax::kernels::cuda::mma_attention
