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
// P never goes through shared memory). Every tile stays row-major in shared memory, and the fragments come
// from it by ldmatrix, four 8x8 matrices per instruction: an A fragment is the four quarters of a 16x16
// block; the B fragment of a product X Y^T is a plain load of Y's rows, and that of X Y a transposing load
// (.trans) of Y's rows, so no tile is ever stored transposed. Shared rows have a pitch of D + 8 elements:
// 16-byte aligned rows, and the 8 rows of an ldmatrix phase start 4 banks apart (no bank conflict).
//
// Blocks of 4 warps; a warp owns 16 rows, or 32 (mtiles below), of queries in the forward and dq, of keys
// in dk / dv, and the other side streams through shared memory in tiles of 64, FA2's software pipeline:
// tiles arrive by cp.async into two buffers, the next tile's copies in flight while the current one is
// computed on. Softmax statistics stay in f32 (exp2 of scores times scale * log2(e), by ex2.approx.ftz);
// P and dS are rounded to the inputs' 16-bit type for their products, as FlashAttention does.
// Deterministic by default: fixed orders, no atomics (dq and dk / dv in separate kernels, as attention.cu);
// backward_dkdv's kFusedDq is FA2's own backward, dq added by f32 atomics in the dk / dv pass. Causal
// blocks skip fully masked tiles as attention.cu does, and the forward and dq take their query blocks last
// first: under a causal mask the last see the most keys, so the grid ends on short blocks.
//
// The block bodies are written against a policy `Hw` of hardware primitives (kernels/cuda/hw_policy.h),
// so that the same code runs on the GPU (attention_mma.cu) and in tests/emulated/ (128 host threads per
// block, barriers, the mma and ldmatrix from the documented fragment layouts, cp.async whose destination
// is NaN until waited for), where CI checks it without a GPU. Every block runs kMmaThreads threads; `smem`
// holds the *_smem_bytes below.
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
constexpr int kMmaTile = 64;      // rows of a streamed tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

/// M-tiles (16 rows each) a warp owns. At D 64 every kernel takes two by default (FA2's 128-row blocks):
/// every B fragment read from shared memory then feeds two MMAs, so a block reads about half the shared
/// bytes per product, for more registers (sm_90, no spill: forward 230 against 127, dq 232 against 152,
/// dk / dv 253 against 180; half the blocks per SM). One stays available there (the template argument
/// M = 1) for comparison, with bitwise the same o, lse, dk and dv. The backward kernels compute a tile's
/// scores in passes of pass_width<M>() columns (keys in dq, queries in dk / dv) so that their
/// accumulators fit. At D 128 the accumulators leave no room for a second m-tile.
template <int D>
constexpr int mtiles() {
  return D == 64 ? 2 : 1;
}
/// Columns of a tile per pass of the backward kernels with M m-tiles (the width of their score fragments).
template <int M>
constexpr int pass_width() {
  return kMmaTile / M;
}
/// Rows a block of M m-tiles per warp owns.
template <int M>
constexpr int block_rows() {
  return 4 * 16 * M;
}

/// Bytes of `rows` rows of T in shared memory (pitch D + 8).
template <class T, int D>
constexpr size_t mma_rows_bytes(int rows) {
  return size_t(rows) * (D + 8) * sizeof(T);
}
/// Dynamic shared memory of each kernel, in bytes.
template <class T, int D, int M = mtiles<D>()>
constexpr size_t fwd_smem_bytes() {  // the block's Q rows; K, V twice
  return mma_rows_bytes<T, D>(block_rows<M>() + 4 * kMmaTile);
}
template <class T, int D, int M = mtiles<D>()>
constexpr size_t dq_smem_bytes() {  // the block's Q, dO rows; K, V twice
  return mma_rows_bytes<T, D>(2 * block_rows<M>() + 4 * kMmaTile);
}
template <class T, int D, int M = mtiles<D>()>
constexpr size_t dkdv_smem_bytes() {  // the block's K, V rows; Q, dO, and lse and delta [64] f32, twice
  return mma_rows_bytes<T, D>(2 * block_rows<M>() + 4 * kMmaTile) + size_t(4 * kMmaTile) * sizeof(float);
}

/// backward_dkdv with dq (kFusedDq): dk / dv's shared memory and the dS^T tile [the block's keys][64 + 8
/// queries].
template <class T, int D, int M = mtiles<D>()>
constexpr size_t dkdv_dq_smem_bytes() {
  return dkdv_smem_bytes<T, D, M>() + size_t(block_rows<M>()) * (kMmaTile + 8) * sizeof(T);
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

// The A fragment of the 16 rows at `x` (pitch P), columns [k0, k0 + 16): matrices 0..3 are the quarters
// (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15).
template <class Hw, class T>
TX_HW_FN void ldsm_a(uint32_t (&a)[4], const T* x, int P, int k0, int lane) {
  Hw::ldsm_x4(a, x + (lane & 15) * P + k0 + (lane >> 4) * 8);
}

// The A fragment of X = Y^T for X's rows [m0, m0 + 16) and columns [k0, k0 + 16), Y row-major at `y` (pitch
// P): a transposing load of Y's rows [k0, k0 + 16), columns [m0, m0 + 16); X's quarters (rows 0-7, cols
// 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) are Y's (k0, m0), (k0, m0 + 8), (k0 + 8, m0), (k0 + 8, m0 + 8).
template <class Hw, class T>
TX_HW_FN void ldsm_a_trans(uint32_t (&a)[4], const T* y, int P, int m0, int k0, int lane) {
  Hw::ldsm_x4_trans(a, y + (k0 + (lane & 7) + (lane >> 4) * 8) * P + m0 + ((lane >> 3) & 1) * 8);
}

// The B fragments of B = Y^T (B[k][n] = Y[n][k], Y row-major at `y`, pitch P) for the n-tiles [n0, n0 + 8)
// (b0) and [n0 + 8, n0 + 16) (b1), k in [k0, k0 + 16): matrices (Y rows, cols) (n0, k0), (n0, k0 + 8),
// (n0 + 8, k0), (n0 + 8, k0 + 8), loaded as stored.
template <class Hw, class T>
TX_HW_FN void ldsm_bt(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* y, int P, int n0, int k0, int lane) {
  uint32_t r[4];
  Hw::ldsm_x4(r, y + (n0 + (lane & 7) + (lane >> 4) * 8) * P + k0 + ((lane >> 3) & 1) * 8);
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// The B fragments of B = Y (Y[k][n] row-major at `y`, pitch P) for the n-tiles [n0, n0 + 8) (b0) and
// [n0 + 8, n0 + 16) (b1), k in [k0, k0 + 16): matrices (Y rows, cols) (k0, n0), (k0 + 8, n0), (k0, n0 + 8),
// (k0 + 8, n0 + 8), loaded transposed.
template <class Hw, class T>
TX_HW_FN void ldsm_b(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* y, int P, int k0, int n0, int lane) {
  uint32_t r[4];
  Hw::ldsm_x4_trans(r, y + (k0 + (lane & 15)) * P + n0 + (lane >> 4) * 8);
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
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

// Starts copying rows [r0, r0 + R) of a [rows, D] matrix (row i at src + i * ld, 16-byte aligned) into shared
// memory (pitch D + 8), 16 bytes per cp.async, consecutive threads along a row; rows at or beyond `limit`
// become zeros (a masked score's weight is 0, and 0 times a stale NaN would not be).
template <class Hw, class T, int D, int R>
TX_HW_FN void issue_tile(T* dst, const T* src, int64_t ld, int64_t r0, int64_t limit) {
  constexpr int V = D / 8;
  for (int e = Hw::thread(); e < R * V; e += kMmaThreads) {
    const int r = e / V, col = (e - r * V) * 8;
    const bool in = r0 + r < limit;
    Hw::cp_async16(dst + r * (D + 8) + col, in ? src + (r0 + r) * ld + col : src, in);
  }
}

// Starts copying the key tile at row k0 of K and of V (matrices kn, vn with rows as L.k, L.v) into `dst`
// (K's tile, then V's).
template <class Hw, class T, int D>
TX_HW_FN void issue_kv(T* dst, const T* kn, const T* vn, const AttentionLayout& L, int64_t k0, int64_t Tk) {
  issue_tile<Hw, T, D, kMmaTile>(dst, kn, L.k.row, k0, Tk);
  issue_tile<Hw, T, D, kMmaTile>(dst + kMmaTile * (D + 8), vn, L.v.row, k0, Tk);
}

// FA2's software pipeline over `tiles` tiles and two shared buffers: issue(t, b) starts the copies of tile
// t into buffer b, compute(t, b) uses them once every thread's copies have landed. Tile t + 1's copies are
// in flight while tile t is computed on. Copies the caller issued before the call (uncommitted) land with
// tile 0's; when the call returns, no copy is in flight.
template <class Hw, class Issue, class Compute>
TX_HW_FN void stream_tiles(int64_t tiles, Issue&& issue, Compute&& compute) {
  if (tiles > 0) issue(int64_t(0), 0);
  Hw::cp_async_commit();
  if (tiles == 0) Hw::cp_async_wait(0);
  for (int64_t t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) {
      if (t > 0) Hw::sync();  // every warp is done with buffer (t + 1) & 1, computed on at t - 1
      issue(t + 1, int((t + 1) & 1));
      Hw::cp_async_commit();
      Hw::cp_async_wait(1);
    } else {
      Hw::cp_async_wait(0);
    }
    Hw::sync();
    compute(t, int(t & 1));
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

// A warp's rows: with M m-tiles, warp w owns rows [16 M w, 16 M (w + 1)) of its block, m-tile m the 16 from
// 16 (M w + m). Lane (g, c) holds, in C fragments, rows 16 m + g (elements 0, 1) and 16 m + g + 8 (2, 3) of
// them: row slot 2 m + (e >> 1) of the lane's 2 M.

// Zeros C fragments.
template <int M, int N>
TX_HW_FN void zero_fragments(float (&x)[M][N][4]) {
  TX_UNROLL
  for (int m = 0; m < M; ++m)
    TX_UNROLL
    for (int i = 0; i < N; ++i) x[m][i][0] = x[m][i][1] = x[m][i][2] = x[m][i][3] = 0.f;
}

// s[m] += X_m Y^T over features [16 kk, 16 kk + 16): the A fragments a[m] of the warp's m-tiles against the
// N rows of Y (row-major at y, pitch D + 8; 64 by default, a streamed tile), as C fragments by n-tile.
// Each B fragment read from shared memory feeds M MMAs.
template <class Hw, class T, int D, int M, int N = kMmaTile>
TX_HW_FN void product_bt(float (&s)[M][N / 8][4], const uint32_t (&a)[M][4], const T* y, int kk, int lane) {
  TX_UNROLL
  for (int ntp = 0; ntp < N / 16; ++ntp) {
    uint32_t b0[2], b1[2];
    ldsm_bt<Hw>(b0, b1, y, D + 8, ntp * 16, kk * 16, lane);
    TX_UNROLL
    for (int m = 0; m < M; ++m) {
      Hw::mma(s[m][2 * ntp], a[m], b0, T{});
      Hw::mma(s[m][2 * ntp + 1], a[m], b1, T{});
    }
  }
}

// s = X1 Y1^T and t = X2 Y2^T: the warp's 16 M rows of X1 / X2 at x1 / x2 against N rows of Y1 / Y2 (all
// row-major, pitch D + 8). The backward's S and dP (dq) or S^T and dP^T (dk / dv).
template <class Hw, class T, int D, int M, int N = kMmaTile>
TX_HW_FN void two_products(float (&s)[M][N / 8][4], float (&t)[M][N / 8][4], const T* x1, const T* y1, const T* x2,
                            const T* y2, int lane) {
  zero_fragments(s);
  zero_fragments(t);
  TX_UNROLL
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[M][4];
    TX_UNROLL
    for (int m = 0; m < M; ++m) ldsm_a<Hw>(a[m], x1 + 16 * m * (D + 8), D + 8, kk * 16, lane);
    product_bt<Hw, T, D, M, N>(s, a, y1, kk, lane);
    TX_UNROLL
    for (int m = 0; m < M; ++m) ldsm_a<Hw>(a[m], x2 + 16 * m * (D + 8), D + 8, kk * 16, lane);
    product_bt<Hw, T, D, M, N>(t, a, y2, kk, lane);
  }
}

// acc[m] (the warp's 16 M x D f32 C fragments) += X_m Y, where X is the warp's 16 M x K product held as C
// fragments x (rounded to T for the MMA) and Y K x D, row-major in shared memory (pitch D + 8; K 64 by
// default, a streamed tile). P V, dS K, P^T dO and dS^T Q.
template <class Hw, class T, int D, int M, int K = kMmaTile>
TX_HW_FN void accumulate_product(float (&acc)[M][D / 8][4], const float (&x)[M][K / 8][4], const T* y, int lane) {
  TX_UNROLL
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[M][4];
    TX_UNROLL
    for (int m = 0; m < M; ++m) a_from_c<T>(a[m], x[m][2 * kk], x[m][2 * kk + 1]);
    TX_UNROLL
    for (int dtp = 0; dtp < D / 16; ++dtp) {
      uint32_t b0[2], b1[2];
      ldsm_b<Hw>(b0, b1, y, D + 8, kk * 16, dtp * 16, lane);
      TX_UNROLL
      for (int m = 0; m < M; ++m) {
        Hw::mma(acc[m][2 * dtp], a[m], b0, T{});
        Hw::mma(acc[m][2 * dtp + 1], a[m], b1, T{});
      }
    }
  }
}

// Stores the warp's 16 M x D accumulators times `scale`, rounded to T, as rows row[2 M] (the lane's row
// slots) of `out` (D columns, row i at out + i * ld); rows at or beyond `rows` are not stored.
template <class Hw, class T, int D, int M>
TX_HW_FN void store_rows(T* out, int64_t ld, const float (&acc)[M][D / 8][4], const int64_t (&row)[2 * M], int64_t rows,
                         const float (&scale)[2 * M], int c) {
  TX_UNROLL
  for (int rr = 0; rr < 2 * M; ++rr) {
    if (row[rr] >= rows) continue;
    const int m = rr >> 1, h = 2 * (rr & 1);
    TX_UNROLL
    for (int dt = 0; dt < D / 8; ++dt)
      Hw::st32(out + row[rr] * ld + dt * 8 + 2 * c, pack2(acc[m][dt][h] * scale[rr], acc[m][dt][h + 1] * scale[rr], T{}));
  }
}

// For each of the lane's query row slots (rows row[rr]), the column of the key tile at k0 holding its last
// visible key: the key before Tk, and under the causal mask at most the row itself; -1 when it sees none of
// the tile, clamped to 64.
template <int M>
TX_HW_FN void last_visible_cols(int (&last_col)[2 * M], const int64_t (&row)[2 * M], int64_t k0, int64_t Tk, bool causal) {
  TX_UNROLL
  for (int rr = 0; rr < 2 * M; ++rr) {
    const int64_t lv = (causal && row[rr] < Tk - 1 ? row[rr] : Tk - 1) - k0;
    last_col[rr] = int(lv < -1 ? -1 : (lv > kMmaTile ? kMmaTile : lv));
  }
}

// The first row of the block's R: block x, counted from the last block, so that under a causal mask the
// blocks that see the most keys start first.
template <class Hw>
TX_HW_FN int64_t last_first_row0(int R) {
  return int64_t(Hw::grid_x() - 1 - Hw::block_x()) * R;
}

// ------------------------------------------------------------------------------------ forward

// o = softmax(scale q k^T [+ mask]) v and lse, for the block_rows<M>() query rows of the block (every n =
// block_y, + grid_y, ...). scale_log2 = scale * log2(e) > 0.
template <class Hw, class T, int D, int M = mtiles<D>()>
TX_HW_FN void forward(const T* q, const T* k, const T* v, T* o, float* lse, const AttentionLayout& L, int64_t N,
                       int64_t Tq, int64_t Tk, bool causal, float scale_log2, unsigned char* smem) {
  constexpr int R = block_rows<M>(), P = D + 8, KS = D / 16, NT = kMmaTile / 8;
  T* Qs = reinterpret_cast<T*>(smem);
  auto k_buf = [&](int b) { return Qs + (R + 2 * b * kMmaTile) * P; };  // K of buffer b; its V follows
  const int lane = Hw::thread() & 31, w = Hw::thread() >> 5, g = lane >> 2, c = lane & 3;
  const int64_t q0 = last_first_row0<Hw>(R), w0 = q0 + w * 16 * M;  // the block's and the warp's first rows
  const int64_t last = (q0 + R < Tq ? q0 + R : Tq) - 1;
  const int64_t kend = causal ? (Tk < last + 1 ? Tk : last + 1) : Tk;
  int64_t row[2 * M];
  TX_UNROLL
  for (int rr = 0; rr < 2 * M; ++rr) row[rr] = w0 + 16 * (rr >> 1) + g + 8 * (rr & 1);
  for (int64_t n = Hw::block_y(); n < N; n += Hw::grid_y()) {
    const T* kn = k + L.k.matrix(n);
    const T* vn = v + L.v.matrix(n);
    Hw::sync();  // every warp is done with the buffers of the previous n
    issue_tile<Hw, T, D, R>(Qs, q + L.q.matrix(n), L.q.row, q0, Tq);
    uint32_t qa[KS][M][4];
    float rmax[2 * M], rsum[2 * M], acc[M][D / 8][4];  // each row slot's running max (unscaled) and sum
    TX_UNROLL
    for (int rr = 0; rr < 2 * M; ++rr) rmax[rr] = -INFINITY, rsum[rr] = 0.f;
    zero_fragments(acc);
    auto issue = [&](int64_t t, int b) { issue_kv<Hw, T, D>(k_buf(b), kn, vn, L, t * kMmaTile, Tk); };
    auto compute = [&](int64_t t, int b) {
      const T* Ks = k_buf(b);
      const int64_t k0 = t * kMmaTile;
      if (t == 0) {  // Q's fragments, kept in registers for every tile
        TX_UNROLL
        for (int kk = 0; kk < KS; ++kk)
          TX_UNROLL
          for (int m = 0; m < M; ++m) ldsm_a<Hw>(qa[kk][m], Qs + (w * M + m) * 16 * P, P, kk * 16, lane);
      }
      float s[M][NT][4];
      zero_fragments(s);
      TX_UNROLL
      for (int kk = 0; kk < KS; ++kk) product_bt<Hw, T, D, M>(s, qa[kk], Ks, kk, lane);  // S = Q K^T
      // Only a tile on an edge (past Tk, or reaching above the warp's first row under the causal mask)
      // tests its elements; the warp's others are all visible.
      if (k0 + kMmaTile > Tk || (causal && k0 + kMmaTile - 1 > w0)) {
        int last_col[2 * M];
        last_visible_cols<M>(last_col, row, k0, Tk, causal);
        TX_UNROLL
        for (int m = 0; m < M; ++m)
          TX_UNROLL
          for (int nt = 0; nt < NT; ++nt)
            TX_UNROLL
            for (int e = 0; e < 4; ++e)
              if (nt * 8 + 2 * c + (e & 1) > last_col[2 * m + (e >> 1)]) s[m][nt][e] = -INFINITY;
      }
      // FA2's softmax in the scores' own units (scale_log2 > 0, so the row max commutes with the scaling):
      // each probability is one FFMA and one MUFU.EX2 (exp2_ftz), a masked score's exp2(-inf) = 0.
      float mx[2 * M], ms[2 * M], alpha[2 * M], rs[2 * M];
      TX_UNROLL
      for (int rr = 0; rr < 2 * M; ++rr) mx[rr] = rmax[rr], rs[rr] = 0.f;
      TX_UNROLL
      for (int m = 0; m < M; ++m)
        TX_UNROLL
        for (int nt = 0; nt < NT; ++nt)
          TX_UNROLL
          for (int e = 0; e < 4; ++e) mx[2 * m + (e >> 1)] = fmaxf(mx[2 * m + (e >> 1)], s[m][nt][e]);
      TX_UNROLL
      for (int rr = 0; rr < 2 * M; ++rr) {
        mx[rr] = quad_max<Hw>(mx[rr]);
        ms[rr] = mx[rr] == -INFINITY ? 0.f : mx[rr] * scale_log2;  // no key visible yet: any finite value
        alpha[rr] = rmax[rr] == -INFINITY ? 0.f : Hw::exp2_ftz(rmax[rr] * scale_log2 - ms[rr]);  // nothing accumulated yet
      }
      TX_UNROLL
      for (int m = 0; m < M; ++m)
        TX_UNROLL
        for (int nt = 0; nt < NT; ++nt)
          TX_UNROLL
          for (int e = 0; e < 4; ++e) {
            const int rr = 2 * m + (e >> 1);
            const float p = Hw::exp2_ftz(s[m][nt][e] * scale_log2 - ms[rr]);
            s[m][nt][e] = p;
            rs[rr] += p;
          }
      TX_UNROLL
      for (int rr = 0; rr < 2 * M; ++rr) {
        rsum[rr] = rsum[rr] * alpha[rr] + quad_sum<Hw>(rs[rr]);
        rmax[rr] = mx[rr];
      }
      TX_UNROLL
      for (int m = 0; m < M; ++m)
        TX_UNROLL
        for (int dt = 0; dt < D / 8; ++dt)
          TX_UNROLL
          for (int e = 0; e < 4; ++e) acc[m][dt][e] *= alpha[2 * m + (e >> 1)];
      accumulate_product<Hw, T, D, M>(acc, s, Ks + kMmaTile * P, lane);  // o += P V
    };
    stream_tiles<Hw>((kend + kMmaTile - 1) / kMmaTile, issue, compute);
    // rsum == 0 only when no key is visible (Tk == 0): o = 0 and lse = -inf, as attention.cu.
    float inv[2 * M];
    TX_UNROLL
    for (int rr = 0; rr < 2 * M; ++rr) {
      inv[rr] = rsum[rr] == 0.f ? 0.f : 1.f / rsum[rr];
      if (c == 0 && row[rr] < Tq)
        lse[n * Tq + row[rr]] = rsum[rr] == 0.f ? -INFINITY : (rmax[rr] * scale_log2 + log2f(rsum[rr])) * kLn2;
    }
    store_rows<Hw, T, D, M>(o + L.o.matrix(n), L.o.row, acc, row, Tq, inv, c);
  }
}

// ------------------------------------------------------------------------------------ backward

// dq_i = scale sum_j dS_ij k_j, dS = P (dP - delta), P = exp(scale q k^T - lse), dP = dout v^T, for the
// block_rows<M>() query rows of the block (keys in passes of pass_width<M>()). delta_i = sum_d dout_id o_id
// (computed before).
template <class Hw, class T, int D, int M = mtiles<D>()>
TX_HW_FN void backward_dq(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta,
                           T* dq, const AttentionLayout& L, int64_t N, int64_t Tq, int64_t Tk, bool causal,
                           float scale_log2, float scale, unsigned char* smem) {
  constexpr int R = block_rows<M>(), P = D + 8, KN = pass_width<M>();
  T* Qs = reinterpret_cast<T*>(smem);
  T* Os = Qs + R * P;
  auto k_buf = [&](int b) { return Os + (R + 2 * b * kMmaTile) * P; };  // K of buffer b; its V follows
  const int lane = Hw::thread() & 31, w = Hw::thread() >> 5, g = lane >> 2, c = lane & 3;
  const int64_t q0 = last_first_row0<Hw>(R), w0 = q0 + w * 16 * M;  // the block's and the warp's first rows
  const int64_t last = (q0 + R < Tq ? q0 + R : Tq) - 1;
  const int64_t kend = causal ? (Tk < last + 1 ? Tk : last + 1) : Tk;
  int64_t row[2 * M];
  TX_UNROLL
  for (int rr = 0; rr < 2 * M; ++rr) row[rr] = w0 + 16 * (rr >> 1) + g + 8 * (rr & 1);
  const T* qw = Qs + w * 16 * M * P;
  const T* ow = Os + w * 16 * M * P;
  for (int64_t n = Hw::block_y(); n < N; n += Hw::grid_y()) {
    const T* kn = k + L.k.matrix(n);
    const T* vn = v + L.v.matrix(n);
    Hw::sync();  // every warp is done with the buffers of the previous n
    issue_tile<Hw, T, D, R>(Qs, q + L.q.matrix(n), L.q.row, q0, Tq);
    issue_tile<Hw, T, D, R>(Os, dout + L.dout.matrix(n), L.dout.row, q0, Tq);
    float l2[2 * M], di[2 * M], acc[M][D / 8][4];
    TX_UNROLL
    for (int rr = 0; rr < 2 * M; ++rr) {
      l2[rr] = row[rr] < Tq ? lse[n * Tq + row[rr]] * kLog2e : 0.f;
      di[rr] = row[rr] < Tq ? delta[n * Tq + row[rr]] : 0.f;
    }
    zero_fragments(acc);
    auto issue = [&](int64_t t, int b) { issue_kv<Hw, T, D>(k_buf(b), kn, vn, L, t * kMmaTile, Tk); };
    auto compute = [&](int64_t t, int b) {
      const T* Ks = k_buf(b);
      const T* Vs = Ks + kMmaTile * P;
      const int64_t k0 = t * kMmaTile;
      // Only a tile on an edge (keys past Tk, or the causal diagonal) tests its elements: row slot rr sees
      // the tile's keys up to last_col[rr] (-1: none). Rows past Tq have zero q, dout, lse and delta, so
      // their dS is 0 and they are not stored.
      const bool edge = k0 + kMmaTile > Tk || (causal && k0 + kMmaTile - 1 > w0);
      int last_col[2 * M];
      last_visible_cols<M>(last_col, row, k0, Tk, causal);
      TX_NO_UNROLL  // one pass's fragments live at a time
      for (int j0 = 0; j0 < kMmaTile; j0 += KN) {  // the tile's keys [j0, j0 + KN)
        float s[M][KN / 8][4], dp[M][KN / 8][4];
        two_products<Hw, T, D, M, KN>(s, dp, qw, Ks + j0 * P, ow, Vs + j0 * P, lane);  // S = Q K^T, dP = dO V^T
        TX_UNROLL
        for (int m = 0; m < M; ++m)
          TX_UNROLL
          for (int nt = 0; nt < KN / 8; ++nt)
            TX_UNROLL
            for (int e = 0; e < 4; ++e) {  // dS, into dp
              const int rr = 2 * m + (e >> 1);
              if (!edge || j0 + nt * 8 + 2 * c + (e & 1) <= last_col[rr])
                dp[m][nt][e] = Hw::exp2_ftz(s[m][nt][e] * scale_log2 - l2[rr]) * (dp[m][nt][e] - di[rr]);
              else
                dp[m][nt][e] = 0.f;
            }
        accumulate_product<Hw, T, D, M, KN>(acc, dp, Ks + j0 * P, lane);  // dq += dS K
      }
    };
    stream_tiles<Hw>((kend + kMmaTile - 1) / kMmaTile, issue, compute);
    float sc[2 * M];
    TX_UNROLL
    for (int rr = 0; rr < 2 * M; ++rr) sc[rr] = scale;
    store_rows<Hw, T, D, M>(dq + L.dq.matrix(n), L.dq.row, acc, row, Tq, sc, c);
  }
}

// FA2's dq in the dk / dv pass, in two steps. First each warp stores its dS^T fragments (rows: its 16 M
// keys; columns: queries [q0, q0 + N) of the tile) in the shared dS^T tile dSs (pitch 72), rounded to T as
// dk's product uses them.
template <class Hw, class T, int M, int N>
TX_HW_FN void store_dst(T* dSs, const float (&dst)[M][N / 8][4], int w, int q0, int lane) {
  constexpr int PS = kMmaTile + 8;
  const int g = lane >> 2, c = lane & 3;
  TX_UNROLL
  for (int m = 0; m < M; ++m)
    TX_UNROLL
    for (int nt = 0; nt < N / 8; ++nt) {
      T* r0 = dSs + ((w * M + m) * 16 + g) * PS + q0 + nt * 8 + 2 * c;
      Hw::st32(r0, pack2(dst[m][nt][0], dst[m][nt][1], T{}));
      Hw::st32(r0 + 8 * PS, pack2(dst[m][nt][2], dst[m][nt][3], T{}));
    }
}

// Then, once every warp has stored the whole tile, dq_accum rows [i0, i0 + 64) += dS K over the block's R
// keys (Ks, pitch D + 8): after a barrier warp w takes the tile's queries [16 w, 16 w + 16), loads their
// dS fragments transposed from dSs, multiplies them by K in chunks of 64 features and adds each chunk to
// dq_accum (f32, row-major, D columns) by vector reductions. Rows at or beyond Tq are not added. The
// caller's next write of dSs must follow a barrier (stream_tiles has one before each tile).
template <class Hw, class T, int D, int R>
TX_HW_FN void add_dq_tile(float* dq_accum, const T* dSs, const T* Ks, int64_t i0, int64_t Tq, int w, int lane) {
  constexpr int PS = kMmaTile + 8, P = D + 8, DC = D < 64 ? D : 64;
  const int g = lane >> 2, c = lane & 3;
  Hw::sync();
  TX_UNROLL
  for (int d0 = 0; d0 < D; d0 += DC) {
    float acc[DC / 8][4];
    TX_UNROLL
    for (int dt = 0; dt < DC / 8; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
    TX_UNROLL
    for (int kk = 0; kk < R / 16; ++kk) {
      uint32_t a[4];  // dS, rows: the warp's 16 queries; columns: keys [16 kk, 16 kk + 16)
      ldsm_a_trans<Hw>(a, dSs, PS, w * 16, kk * 16, lane);
      TX_UNROLL
      for (int dtp = 0; dtp < DC / 16; ++dtp) {
        uint32_t b0[2], b1[2];
        ldsm_b<Hw>(b0, b1, Ks, P, kk * 16, d0 + dtp * 16, lane);
        Hw::mma(acc[2 * dtp], a, b0, T{});
        Hw::mma(acc[2 * dtp + 1], a, b1, T{});
      }
    }
    TX_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int64_t i = i0 + w * 16 + g + 8 * r;
      if (i >= Tq) continue;
      TX_UNROLL
      for (int dt = 0; dt < DC / 8; ++dt) Hw::red_add_f32x2(dq_accum + i * D + d0 + dt * 8 + 2 * c, acc[dt][2 * r], acc[dt][2 * r + 1]);
    }
  }
}

// dq = scale * dq_accum rounded to T: dq_accum f32 [N, Tq, D] contiguous, dq laid out as L.dq (D a
// multiple of 4; both 16-byte aligned): the fused backward's last step. Any grid; threads() a multiple of 32.
template <class Hw, class T>
TX_HW_FN void dq_from_accum(const float* dq_accum, T* dq, const AttentionLayout& L, int64_t N, int64_t Tq, int D,
                            float scale) {
  const int64_t count = N * Tq * D;
  for (int64_t i = grid_index<Hw>() * 4; i < count; i += grid_stride<Hw>() * 4) {
    const int64_t r = i / D, n = r / Tq;
    T* out = dq + L.dq.matrix(n) + (r - n * Tq) * L.dq.row + (i - r * D);
    const float4 v = load_f4(dq_accum + i);
    Hw::st32(out, pack2(v.x * scale, v.y * scale, T{}));
    Hw::st32(out + 2, pack2(v.z * scale, v.w * scale, T{}));
  }
}

// dv_j = sum_i P_ij dout_i, dk_j = scale sum_i dS_ij q_i for the block_rows<M>() keys of block x, query
// tiles of 64 (in passes of pass_width<M>() queries). The transposed products: S^T = K Q^T,
// dP^T = V dO^T, then dV += P^T dO, dK += dS^T Q.
// kFusedDq (FA2's backward: five products per tile instead of the separate dq kernel's two more) also adds
// each tile's dq = dS K, unscaled, to dq_accum (f32 [N, Tq, D], zero before) by atomic reductions: the
// result depends on the order in which blocks add, so it is not deterministic; smem then holds
// dkdv_dq_smem_bytes.
template <class Hw, class T, int D, bool kFusedDq = false, int M = mtiles<D>()>
TX_HW_FN void backward_dkdv(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta,
                             T* dk, T* dv, const AttentionLayout& L, int64_t N, int64_t Tq, int64_t Tk, bool causal,
                             float scale_log2, float scale, unsigned char* smem, float* dq_accum = nullptr) {
  constexpr int R = block_rows<M>(), P = D + 8, QN = pass_width<M>();
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + R * P;
  auto q_buf = [&](int b) { return Vs + (R + 2 * b * kMmaTile) * P; };  // Q of buffer b; its dO follows
  // lse (natural log) of buffer b's queries; their delta follows.
  auto lse_buf = [&](int b) { return reinterpret_cast<float*>(Vs + (R + 4 * kMmaTile) * P) + 2 * b * kMmaTile; };
  [[maybe_unused]] T* dSs = reinterpret_cast<T*>(lse_buf(2));  // kFusedDq: the dS^T tile, after both buffers' lse and delta
  const int lane = Hw::thread() & 31, w = Hw::thread() >> 5, g = lane >> 2, c = lane & 3;
  const int64_t j0 = int64_t(Hw::block_x()) * R;  // under a causal mask the first keys are the heaviest
  const int64_t w0 = j0 + w * 16 * M;              // the warp's first key
  const int64_t qbegin = causal ? (j0 / kMmaTile) * kMmaTile : 0;  // queries before j0 see none of the keys
  auto key = [&](int rr) { return w0 + 16 * (rr >> 1) + g + 8 * (rr & 1); };  // the key of row slot rr
  const T* kw = Ks + w * 16 * M * P;
  const T* vw = Vs + w * 16 * M * P;
  for (int64_t n = Hw::block_y(); n < N; n += Hw::grid_y()) {
    const T* qn = q + L.q.matrix(n);
    const T* on = dout + L.dout.matrix(n);
    Hw::sync();  // every warp is done with the buffers of the previous n
    issue_tile<Hw, T, D, R>(Ks, k + L.k.matrix(n), L.k.row, j0, Tk);
    issue_tile<Hw, T, D, R>(Vs, v + L.v.matrix(n), L.v.row, j0, Tk);
    float ak[M][D / 8][4], av[M][D / 8][4];
    zero_fragments(ak);
    zero_fragments(av);
    auto issue = [&](int64_t t, int b) {
      const int64_t i0 = qbegin + t * kMmaTile;
      issue_tile<Hw, T, D, kMmaTile>(q_buf(b), qn, L.q.row, i0, Tq);
      issue_tile<Hw, T, D, kMmaTile>(q_buf(b) + kMmaTile * P, on, L.dout.row, i0, Tq);
      // Threads 0-63 copy the tile's lse, 64-127 its delta; rows at or beyond Tq become zeros (masked).
      const int r = Hw::thread() % kMmaTile;
      const float* src = (Hw::thread() < kMmaTile ? lse : delta) + n * Tq;
      const bool in = i0 + r < Tq;
      Hw::cp_async4(lse_buf(b) + Hw::thread(), in ? src + i0 + r : src, in);
    };
    auto compute = [&](int64_t t, int b) {
      const T* Qs = q_buf(b);
      const T* Os = Qs + kMmaTile * P;
      const float* Ls = lse_buf(b);
      const float* Ds = Ls + kMmaTile;
      const int64_t i0 = qbegin + t * kMmaTile;
      // Only a tile on an edge (queries past Tq, the warp's keys past Tk, or the causal diagonal) tests its
      // elements.
      const bool edge = i0 + kMmaTile > Tq || w0 + 16 * M > Tk || (causal && w0 + 16 * M - 1 > i0);
      // There, row slot rr sees the tile's queries [first[rr], qend): none past Tq, none for a key past Tk,
      // and under the causal mask none before the key.
      const int qend = int(Tq - i0 < kMmaTile ? Tq - i0 : kMmaTile);
      int first[2 * M];
      TX_UNROLL
      for (int rr = 0; rr < 2 * M; ++rr) {
        const int64_t f = key(rr) >= Tk ? kMmaTile : (causal ? key(rr) - i0 : 0);
        first[rr] = int(f < 0 ? 0 : (f > kMmaTile ? kMmaTile : f));
      }
      TX_NO_UNROLL  // one pass's fragments live at a time
      for (int q0 = 0; q0 < kMmaTile; q0 += QN) {  // the tile's queries [q0, q0 + QN)
        float st[M][QN / 8][4], dpt[M][QN / 8][4];  // rows: the warp's keys; columns: the pass's queries
        two_products<Hw, T, D, M, QN>(st, dpt, kw, Qs + q0 * P, vw, Os + q0 * P, lane);  // S^T = K Q^T, dP^T = V dO^T
        TX_UNROLL
        for (int m = 0; m < M; ++m)
          TX_UNROLL
          for (int nt = 0; nt < QN / 8; ++nt)
            TX_UNROLL
            for (int e = 0; e < 4; ++e) {  // P^T into st, dS^T into dpt
              const int qi = q0 + nt * 8 + 2 * c + (e & 1);
              const bool vis = !edge || (qi >= first[2 * m + (e >> 1)] && qi < qend);
              const float pij = vis ? Hw::exp2_ftz(st[m][nt][e] * scale_log2 - Ls[qi] * kLog2e) : 0.f;
              st[m][nt][e] = pij;
              dpt[m][nt][e] = vis ? pij * (dpt[m][nt][e] - Ds[qi]) : 0.f;
            }
        accumulate_product<Hw, T, D, M, QN>(av, st, Os + q0 * P, lane);   // dv += P^T dO
        accumulate_product<Hw, T, D, M, QN>(ak, dpt, Qs + q0 * P, lane);  // dk += dS^T Q (scaled at the end)
        if constexpr (kFusedDq) store_dst<Hw, T, M, QN>(dSs, dpt, w, q0, lane);
      }
      if constexpr (kFusedDq) add_dq_tile<Hw, T, D, R>(dq_accum + n * Tq * D, dSs, Ks, i0, Tq, w, lane);
    };
    stream_tiles<Hw>(Tq > qbegin ? (Tq - qbegin + kMmaTile - 1) / kMmaTile : 0, issue, compute);
    float sk[2 * M], one[2 * M];
    int64_t keys[2 * M];
    TX_UNROLL
    for (int rr = 0; rr < 2 * M; ++rr) sk[rr] = scale, one[rr] = 1.f, keys[rr] = key(rr);
    store_rows<Hw, T, D, M>(dk + L.dk.matrix(n), L.dk.row, ak, keys, Tk, sk, c);
    store_rows<Hw, T, D, M>(dv + L.dv.matrix(n), L.dv.row, av, keys, Tk, one, c);
  }
}

}  // namespace titanax::kernels::cuda::mma_attention
