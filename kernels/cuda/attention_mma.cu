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
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cuda/common.cuh"

namespace titanax::kernels::cuda {
namespace {

constexpr int kMmaThreads = 128;  // 4 warps
constexpr int kMmaRows = 64;      // rows a block owns (16 per warp)
constexpr int kMmaTile = 64;      // rows of a streamed tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two floats rounded to the 16-bit type, lo in the low half.
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Two consecutive 16-bit elements (4-byte aligned).
template <class T>
__device__ __forceinline__ uint32_t ld2(const T* p) { return *reinterpret_cast<const uint32_t*>(p); }

// The A fragment of the 16 rows at `base` (pitch P), columns [k0, k0 + 16).
template <class T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* base, int P, int k0, int g, int c) {
  a[0] = ld2(base + g * P + k0 + 2 * c);
  a[1] = ld2(base + (g + 8) * P + k0 + 2 * c);
  a[2] = ld2(base + g * P + k0 + 8 + 2 * c);
  a[3] = ld2(base + (g + 8) * P + k0 + 8 + 2 * c);
}

// The B fragment of B[k][n] = Y[n0 + n][k0 + k] for Y row-major at `y` (pitch P): B = Y^T.
template <class T>
__device__ __forceinline__ void load_bt(uint32_t (&b)[2], const T* y, int P, int n0, int k0, int g, int c) {
  b[0] = ld2(y + (n0 + g) * P + k0 + 2 * c);
  b[1] = ld2(y + (n0 + g) * P + k0 + 8 + 2 * c);
}

// The A fragment of a 16 x 16 block of a product's f32 C fragments: columns [16 kk, 16 kk + 16) are the
// n-tiles 2 kk and 2 kk + 1, rounded to T.
template <class T>
__device__ __forceinline__ void a_from_c(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2(lo[0], lo[1], T{});
  a[1] = pack2(lo[2], lo[3], T{});
  a[2] = pack2(hi[0], hi[1], T{});
  a[3] = pack2(hi[2], hi[3], T{});
}

// Rows [r0, r0 + R) of a contiguous [rows, D] matrix into shared memory (pitch D + 8), 16 bytes at a time;
// rows at or beyond `limit` are zeros.
template <class T, int D, int R>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t r0, int64_t limit) {
  constexpr int V = D / 8;
  for (int e = threadIdx.x; e < R * V; e += blockDim.x) {
    const int r = e / V, col = (e - r * V) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r0 + r < limit) val = *reinterpret_cast<const uint4*>(src + (r0 + r) * D + col);
    *reinterpret_cast<uint4*>(dst + r * (D + 8) + col) = val;
  }
}

// The same rows transposed: dst[d][r] (pitch R + 8).
template <class T, int D, int R>
__device__ __forceinline__ void load_tile_t(T* dst, const T* src, int64_t r0, int64_t limit) {
  for (int e = threadIdx.x; e < R * D; e += blockDim.x) {
    const int r = e / D, d = e - r * D;
    dst[d * (R + 8) + r] = r0 + r < limit ? src[(r0 + r) * D + d] : T(0.f);
  }
}

// 16-bit pair store of two f32 values.
template <class T>
__device__ __forceinline__ void st2(T* p, float lo, float hi) { *reinterpret_cast<uint32_t*>(p) = pack2(lo, hi, T{}); }

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

__device__ __forceinline__ bool visible_mma(int64_t i, int64_t j, bool causal) { return !causal || j <= i; }

// ------------------------------------------------------------------------------------ forward

// o = softmax(scale q k^T [+ mask]) v and lse, for 64 query rows per block. Shared: Q [64][D+8],
// K [64][D+8], V^T [D][72].
template <class T, int D>
__global__ void __launch_bounds__(kMmaThreads)
    k_attn_fwd_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                   float* __restrict__ lse, int64_t N, int64_t Tq, int64_t Tk, bool causal, float scale_log2) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int P = D + 8, VP = kMmaTile + 8, KS = D / 16, NT = kMmaTile / 8, DT = D / 8;
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + kMmaRows * P;
  T* Vt = Ks + kMmaTile * P;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int64_t q0 = int64_t(blockIdx.x) * kMmaRows;
  const int64_t last = (q0 + kMmaRows < Tq ? q0 + kMmaRows : Tq) - 1;
  const int64_t kend = causal ? (Tk < last + 1 ? Tk : last + 1) : Tk;
  const int64_t row[2] = {q0 + w * 16 + g, q0 + w * 16 + g + 8};
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const T* kn = k + n * Tk * D;
    const T* vn = v + n * Tk * D;
    __syncthreads();
    load_tile<T, D, kMmaRows>(Qs, q + n * Tq * D, q0, Tq);
    __syncthreads();
    uint32_t qa[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) load_a(qa[kk], Qs + w * 16 * P, P, kk * 16, g, c);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, acc[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
    for (int64_t k0 = 0; k0 < kend; k0 += kMmaTile) {
      __syncthreads();
      load_tile<T, D, kMmaTile>(Ks, kn, k0, Tk);
      load_tile_t<T, D, kMmaTile>(Vt, vn, k0, Tk);
      __syncthreads();
      float s[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
          uint32_t b[2];
          load_bt(b, Ks, P, nt * 8, kk * 16, g, c);
          mma16816(s[nt], qa[kk], b, T{});
        }
      }
      float mx[2] = {m[0], m[1]};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t j = k0 + nt * 8 + 2 * c + (e & 1);
          const bool vis = j < Tk && visible_mma(row[e >> 1], j, causal);
          s[nt][e] = vis ? s[nt][e] * scale_log2 : -INFINITY;
          mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
        }
      float alpha[2], rs[2] = {0.f, 0.f};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = quad_max(mx[r]);
        alpha[r] = m[r] == -INFINITY ? 0.f : exp2f(m[r] - mx[r]);  // nothing accumulated yet: no NaN
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float p = s[nt][e] == -INFINITY ? 0.f : exp2f(s[nt][e] - mx[e >> 1]);
          s[nt][e] = p;
          rs[e >> 1] += p;
        }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        l[r] = l[r] * alpha[r] + quad_sum(rs[r]);
        m[r] = mx[r];
      }
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        acc[dt][0] *= alpha[0];
        acc[dt][1] *= alpha[0];
        acc[dt][2] *= alpha[1];
        acc[dt][3] *= alpha[1];
      }
#pragma unroll
      for (int kk = 0; kk < NT / 2; ++kk) {
        uint32_t pa[4];
        a_from_c<T>(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          uint32_t b[2];
          load_bt(b, Vt, VP, dt * 8, kk * 16, g, c);  // B[key][d] = V^T[d][key]
          mma16816(acc[dt], pa, b, T{});
        }
      }
    }
    T* on = o + n * Tq * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row[r] >= Tq) continue;
      // l == 0 only when no key is visible (Tk == 0): o = 0 and lse = -inf, as attention.cu.
      const float inv = l[r] == 0.f ? 0.f : 1.f / l[r];
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) st2(on + row[r] * D + dt * 8 + 2 * c, acc[dt][2 * r] * inv, acc[dt][2 * r + 1] * inv);
      if (c == 0) lse[n * Tq + row[r]] = l[r] == 0.f ? -INFINITY : (m[r] + log2f(l[r])) * kLn2;
    }
  }
}

// ------------------------------------------------------------------------------------ backward

// dq_i = scale sum_j dS_ij k_j, dS = P (dP - delta), P = exp(scale q k^T - lse), dP = dout v^T; 64 query
// rows per block. Shared: Q, dO [64][D+8], K, V [64][D+8], K^T [D][72].
template <class T, int D>
__global__ void __launch_bounds__(kMmaThreads)
    k_attn_dq_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
                  const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq, int64_t N,
                  int64_t Tq, int64_t Tk, bool causal, float scale_log2, float scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int P = D + 8, TP = kMmaTile + 8, KS = D / 16, NT = kMmaTile / 8, DT = D / 8;
  T* Qs = reinterpret_cast<T*>(smem);
  T* Os = Qs + kMmaRows * P;
  T* Ks = Os + kMmaRows * P;
  T* Vs = Ks + kMmaTile * P;
  T* Kt = Vs + kMmaTile * P;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int64_t q0 = int64_t(blockIdx.x) * kMmaRows;
  const int64_t last = (q0 + kMmaRows < Tq ? q0 + kMmaRows : Tq) - 1;
  const int64_t kend = causal ? (Tk < last + 1 ? Tk : last + 1) : Tk;
  const int64_t row[2] = {q0 + w * 16 + g, q0 + w * 16 + g + 8};
  const T* qw = Qs + w * 16 * P;
  const T* ow = Os + w * 16 * P;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const T* kn = k + n * Tk * D;
    const T* vn = v + n * Tk * D;
    __syncthreads();
    load_tile<T, D, kMmaRows>(Qs, q + n * Tq * D, q0, Tq);
    load_tile<T, D, kMmaRows>(Os, dout + n * Tq * D, q0, Tq);
    float l2[2], di[2], acc[DT][4];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l2[r] = row[r] < Tq ? lse[n * Tq + row[r]] * kLog2e : 0.f;
      di[r] = row[r] < Tq ? delta[n * Tq + row[r]] : 0.f;
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
    for (int64_t k0 = 0; k0 < kend; k0 += kMmaTile) {
      __syncthreads();
      load_tile<T, D, kMmaTile>(Ks, kn, k0, Tk);
      load_tile<T, D, kMmaTile>(Vs, vn, k0, Tk);
      load_tile_t<T, D, kMmaTile>(Kt, kn, k0, Tk);
      __syncthreads();
      float s[NT][4], dp[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
          uint32_t a[4], b[2];
          load_a(a, qw, P, kk * 16, g, c);
          load_bt(b, Ks, P, nt * 8, kk * 16, g, c);
          mma16816(s[nt], a, b, T{});
          load_a(a, ow, P, kk * 16, g, c);
          load_bt(b, Vs, P, nt * 8, kk * 16, g, c);
          mma16816(dp[nt], a, b, T{});
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {  // dS, into dp
          const int64_t i = row[e >> 1], j = k0 + nt * 8 + 2 * c + (e & 1);
          const bool vis = i < Tq && j < Tk && visible_mma(i, j, causal);
          const float pij = vis ? exp2f(s[nt][e] * scale_log2 - l2[e >> 1]) : 0.f;
          dp[nt][e] = vis ? pij * (dp[nt][e] - di[e >> 1]) : 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < NT / 2; ++kk) {
        uint32_t a[4];
        a_from_c<T>(a, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          uint32_t b[2];
          load_bt(b, Kt, TP, dt * 8, kk * 16, g, c);  // B[key][d] = K^T[d][key]
          mma16816(acc[dt], a, b, T{});
        }
      }
    }
    T* dqn = dq + n * Tq * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row[r] >= Tq) continue;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        st2(dqn + row[r] * D + dt * 8 + 2 * c, acc[dt][2 * r] * scale, acc[dt][2 * r + 1] * scale);
    }
  }
}

// dv_j = sum_i P_ij dout_i, dk_j = scale sum_i dS_ij q_i; 64 keys per block, query tiles of 64. The
// transposed products: S^T = K Q^T, dP^T = V dO^T, then dV += P^T dO, dK += dS^T Q. Shared: K, V
// [64][D+8], Q, dO [64][D+8], Q^T, dO^T [D][72], lse and delta of the tile [64] each.
template <class T, int D>
__global__ void __launch_bounds__(kMmaThreads)
    k_attn_dkdv_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                    T* __restrict__ dk, T* __restrict__ dv, int64_t N, int64_t Tq, int64_t Tk, bool causal,
                    float scale_log2, float scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int P = D + 8, TP = kMmaTile + 8, KS = D / 16, NT = kMmaTile / 8, DT = D / 8;
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + kMmaRows * P;
  T* Qs = Vs + kMmaRows * P;
  T* Os = Qs + kMmaTile * P;
  T* Qt = Os + kMmaTile * P;
  T* Ot = Qt + D * TP;
  float* Ls = reinterpret_cast<float*>(Ot + D * TP);  // lse * log2(e) of the tile
  float* Ds = Ls + kMmaTile;                          // delta of the tile
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int64_t j0 = int64_t(blockIdx.x) * kMmaRows;
  const int64_t qbegin = causal ? (j0 / kMmaTile) * kMmaTile : 0;  // queries before j0 see none of the keys
  const int64_t key[2] = {j0 + w * 16 + g, j0 + w * 16 + g + 8};
  const T* kw = Ks + w * 16 * P;
  const T* vw = Vs + w * 16 * P;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const T* qn = q + n * Tq * D;
    const T* on = dout + n * Tq * D;
    __syncthreads();
    load_tile<T, D, kMmaRows>(Ks, k + n * Tk * D, j0, Tk);
    load_tile<T, D, kMmaRows>(Vs, v + n * Tk * D, j0, Tk);
    float ak[DT][4], av[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) ak[dt][e] = av[dt][e] = 0.f;
    for (int64_t i0 = qbegin; i0 < Tq; i0 += kMmaTile) {
      __syncthreads();
      load_tile<T, D, kMmaTile>(Qs, qn, i0, Tq);
      load_tile<T, D, kMmaTile>(Os, on, i0, Tq);
      load_tile_t<T, D, kMmaTile>(Qt, qn, i0, Tq);
      load_tile_t<T, D, kMmaTile>(Ot, on, i0, Tq);
      if (threadIdx.x < kMmaTile) {
        const int64_t i = i0 + threadIdx.x;
        Ls[threadIdx.x] = i < Tq ? lse[n * Tq + i] * kLog2e : 0.f;
        Ds[threadIdx.x] = i < Tq ? delta[n * Tq + i] : 0.f;
      }
      __syncthreads();
      float st[NT][4], dpt[NT][4];  // rows: the warp's keys; columns: the tile's queries
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
          uint32_t a[4], b[2];
          load_a(a, kw, P, kk * 16, g, c);
          load_bt(b, Qs, P, nt * 8, kk * 16, g, c);
          mma16816(st[nt], a, b, T{});
          load_a(a, vw, P, kk * 16, g, c);
          load_bt(b, Os, P, nt * 8, kk * 16, g, c);
          mma16816(dpt[nt], a, b, T{});
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {  // P^T into st, dS^T into dpt
          const int qi = nt * 8 + 2 * c + (e & 1);
          const int64_t i = i0 + qi, j = key[e >> 1];
          const bool vis = i < Tq && j < Tk && visible_mma(i, j, causal);
          const float pij = vis ? exp2f(st[nt][e] * scale_log2 - Ls[qi]) : 0.f;
          st[nt][e] = pij;
          dpt[nt][e] = vis ? pij * (dpt[nt][e] - Ds[qi]) : 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < NT / 2; ++kk) {
        uint32_t pa[4], da[4];
        a_from_c<T>(pa, st[2 * kk], st[2 * kk + 1]);
        a_from_c<T>(da, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          uint32_t b[2];
          load_bt(b, Ot, TP, dt * 8, kk * 16, g, c);  // B[query][d] = dO^T[d][query]
          mma16816(av[dt], pa, b, T{});
          load_bt(b, Qt, TP, dt * 8, kk * 16, g, c);  // B[query][d] = Q^T[d][query]
          mma16816(ak[dt], da, b, T{});
        }
      }
    }
    T* dkn = dk + n * Tk * D;
    T* dvn = dv + n * Tk * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (key[r] >= Tk) continue;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        st2(dkn + key[r] * D + dt * 8 + 2 * c, ak[dt][2 * r] * scale, ak[dt][2 * r + 1] * scale);
        st2(dvn + key[r] * D + dt * 8 + 2 * c, av[dt][2 * r], av[dt][2 * r + 1]);
      }
    }
  }
}

template <int V>
struct HeadDim {
  static constexpr int value = V;
};

// body(T{}, HeadDim<D>{}) for t in {bf16, f16} and D in {64, 128}; then the launch error.
template <class Body>
int dispatch_mma(Dt t, int64_t D, Body body) {
  auto by_dim = [&](auto tv) -> int { return D == 64 ? body(tv, HeadDim<64>{}) : body(tv, HeadDim<128>{}); };
  int err = 0;
  if (t == Dt::bf16) err = by_dim(__nv_bfloat16{});
  else if (t == Dt::f16) err = by_dim(__half{});
  else return int(cudaErrorInvalidValue);
  return err ? err : int(cudaGetLastError());
}

template <class K>
int allow_smem_mma(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return 0;
  return int(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

dim3 mma_grid(int64_t rows, int64_t N) {
  return dim3(unsigned((rows + kMmaRows - 1) / kMmaRows), unsigned(N < 65535 ? N : 65535));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

bool attention_mma_supported(Dt t, int64_t D, std::initializer_list<const void*> ptrs) {
  if ((t != Dt::bf16 && t != Dt::f16) || (D != 64 && D != 128)) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

int launch_attention_forward_mma(Dt t, const void* q, const void* k, const void* v, int64_t N, int64_t Tq, int64_t Tk,
                                 int64_t D, bool causal, double scale, void* o, float* lse, void* stream) {
  if (N == 0 || Tq == 0) return 0;
  const cudaStream_t st = as_stream(stream);
  return dispatch_mma(t, D, [&](auto tv, auto hd) -> int {
    using T = decltype(tv);
    constexpr int HD = decltype(hd)::value;
    const size_t bytes = (size_t(kMmaRows + kMmaTile) * (HD + 8) + size_t(HD) * (kMmaTile + 8)) * sizeof(T);
    if (int e = allow_smem_mma(k_attn_fwd_mma<T, HD>, bytes)) return e;
    k_attn_fwd_mma<T, HD><<<mma_grid(Tq, N), kMmaThreads, bytes, st>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(o), lse, N, Tq, Tk,
        causal, float(scale) * kLog2e);
    return 0;
  });
}

int launch_attention_backward_mma(Dt t, const void* q, const void* k, const void* v, const void* o, const float* lse,
                                  const void* dout, int64_t N, int64_t Tq, int64_t Tk, int64_t D, bool causal,
                                  double scale, void* dq, void* dk, void* dv, float* delta, void* stream) {
  if (N == 0) return 0;
  const cudaStream_t st = as_stream(stream);
  if (Tq > 0)  // delta_i = sum_d dout[i, d] o[i, d], as the FP32 path computes it
    if (int e = launch_attention_delta(t, o, dout, N * Tq, D, delta, stream)) return e;
  return dispatch_mma(t, D, [&](auto tv, auto hd) -> int {
    using T = decltype(tv);
    constexpr int HD = decltype(hd)::value;
    const T* qt = static_cast<const T*>(q);
    const T* kt = static_cast<const T*>(k);
    const T* vt = static_cast<const T*>(v);
    const T* ot = static_cast<const T*>(dout);
    const float sl2 = float(scale) * kLog2e;
    if (Tq > 0) {
      const size_t bytes = (size_t(2 * kMmaRows + 2 * kMmaTile) * (HD + 8) + size_t(HD) * (kMmaTile + 8)) * sizeof(T);
      if (int e = allow_smem_mma(k_attn_dq_mma<T, HD>, bytes)) return e;
      k_attn_dq_mma<T, HD><<<mma_grid(Tq, N), kMmaThreads, bytes, st>>>(qt, kt, vt, ot, lse, delta, static_cast<T*>(dq), N,
                                                                        Tq, Tk, causal, sl2, float(scale));
    }
    if (Tk > 0) {  // Tq == 0: no query tile, dk = dv = 0
      const size_t bytes = (size_t(2 * kMmaRows + 2 * kMmaTile) * (HD + 8) + size_t(2 * HD) * (kMmaTile + 8)) * sizeof(T) +
                           size_t(2 * kMmaTile) * sizeof(float);
      if (int e = allow_smem_mma(k_attn_dkdv_mma<T, HD>, bytes)) return e;
      k_attn_dkdv_mma<T, HD><<<mma_grid(Tk, N), kMmaThreads, bytes, st>>>(
          qt, kt, vt, ot, lse, delta, static_cast<T*>(dk), static_cast<T*>(dv), N, Tq, Tk, causal, sl2, float(scale));
    }
    return 0;
  });
}

}  // namespace titanax::kernels::cuda
