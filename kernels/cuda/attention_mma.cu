// The tensor-core attention kernels (kernels/cuda/attention_mma.cuh holds the algorithm and its block
// bodies) on the GPU: the __global__ wrappers over the GPU's primitives (kernels/cuda/hw_policy.h) and the
// launchers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/attention_mma.cuh"
#include "kernels/cuda/common.cuh"

namespace titanax::kernels::cuda {
namespace {
namespace ma = mma_attention;

template <class T, int D, int M>
__global__ void __launch_bounds__(ma::kMmaThreads)
    k_attn_fwd_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                   float* __restrict__ lse, const AttentionLayout L, int64_t N, int64_t Tq, int64_t Tk, bool causal,
                   float scale_log2) {
  extern __shared__ __align__(16) unsigned char smem[];
  ma::forward<DevicePrim, T, D, M>(q, k, v, o, lse, L, N, Tq, Tk, causal, scale_log2, smem);
}

template <class T, int D, int M>
__global__ void __launch_bounds__(ma::kMmaThreads)
    k_attn_dq_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
                  const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq,
                  const AttentionLayout L, int64_t N, int64_t Tq, int64_t Tk, bool causal, float scale_log2, float scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  ma::backward_dq<DevicePrim, T, D, M>(q, k, v, dout, lse, delta, dq, L, N, Tq, Tk, causal, scale_log2, scale, smem);
}

// dk / dv with M m-tiles per warp; kFusedDq also adds dq into dq_accum (FA2's fused backward).
template <class T, int D, bool kFusedDq, int M>
__global__ void __launch_bounds__(ma::kMmaThreads)
    k_attn_dkdv_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                    T* __restrict__ dk, T* __restrict__ dv, const AttentionLayout L, int64_t N, int64_t Tq, int64_t Tk,
                    bool causal, float scale_log2, float scale, float* __restrict__ dq_accum) {
  extern __shared__ __align__(16) unsigned char smem[];
  ma::backward_dkdv<DevicePrim, T, D, kFusedDq, M>(q, k, v, dout, lse, delta, dk, dv, L, N, Tq, Tk, causal, scale_log2,
                                                   scale, smem, dq_accum);
}

// Shared memory of k_attn_dkdv_mma<T, D, kFusedDq, M>.
template <class T, int D, bool kFusedDq, int M>
constexpr size_t dkdv_bytes() {
  return kFusedDq ? ma::dkdv_dq_smem_bytes<T, D, M>() : ma::dkdv_smem_bytes<T, D, M>();
}

template <class T>
__global__ void k_dq_from_accum(const float* __restrict__ dq_accum, T* __restrict__ dq, const AttentionLayout L, int64_t N,
                                int64_t Tq, int D, float scale) {
  ma::dq_from_accum<DevicePrim, T>(dq_accum, dq, L, N, Tq, D, scale);
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

// body(std::integral_constant<int, M>{}) for the m-tiles per warp of the kernels at head dim D: mtiles<D>(),
// or 1 when `narrow`.
template <int D, class Body>
int with_mtiles(bool narrow, Body body) {
  constexpr int M = ma::mtiles<D>();
  if constexpr (M > 1)
    if (narrow) return body(std::integral_constant<int, 1>{});
  return body(std::integral_constant<int, M>{});
}

// Blocks of R rows over `rows`, by N (at most 65535: the blocks loop over n).
dim3 mma_grid(int64_t rows, int R, int64_t N) {
  return dim3(unsigned((rows + R - 1) / R), unsigned(N < 65535 ? N : 65535));
}

}  // namespace

bool attention_mma_supported(Dt t, int64_t D, double scale, std::initializer_list<const void*> ptrs,
                             std::initializer_list<AttnRows> rows) {
  if ((t != Dt::bf16 && t != Dt::f16) || (D != 64 && D != 128) || !(scale > 0)) return false;
  for (const void* p : ptrs)
    if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0) return false;
  for (const AttnRows& r : rows)
    if (r.batch % 8 != 0 || r.head % 8 != 0 || r.row % 8 != 0) return false;
  return true;
}

int launch_attention_forward_mma(Dt t, const void* q, const void* k, const void* v, const AttentionLayout& L, int64_t N,
                                 int64_t Tq, int64_t Tk, int64_t D, bool causal, double scale, void* o, float* lse,
                                 bool narrow, void* stream) {
  if (N == 0 || Tq == 0) return 0;
  const cudaStream_t st = as_stream(stream);
  return dispatch_mma(t, D, [&](auto tv, auto hd) -> int {
    using T = decltype(tv);
    constexpr int HD = decltype(hd)::value;
    return with_mtiles<HD>(narrow, [&](auto mt) -> int {
      constexpr int M = decltype(mt)::value;
      constexpr size_t bytes = ma::fwd_smem_bytes<T, HD, M>();
      if (int e = allow_smem(k_attn_fwd_mma<T, HD, M>, bytes)) return e;
      k_attn_fwd_mma<T, HD, M><<<mma_grid(Tq, ma::block_rows<M>(), N), ma::kMmaThreads, bytes, st>>>(
          static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(o), lse, L, N, Tq,
          Tk, causal, float(scale) * ma::kLog2e);
      return 0;
    });
  });
}

int launch_attention_backward_mma(Dt t, const void* q, const void* k, const void* v, const void* o, const float* lse,
                                  const void* dout, const AttentionLayout& L, int64_t N, int64_t Tq, int64_t Tk,
                                  int64_t D, bool causal, double scale, void* dq, void* dk, void* dv, float* delta,
                                  float* dq_accum, bool narrow, void* stream) {
  if (N == 0) return 0;
  const cudaStream_t st = as_stream(stream);
  if (Tq > 0)  // delta_i = sum_d dout[i, d] o[i, d], as the FP32 path computes it
    if (int e = launch_attention_delta(t, o, dout, L, N, Tq, D, delta, stream)) return e;
  return dispatch_mma(t, D, [&](auto tv, auto hd) -> int {
    using T = decltype(tv);
    constexpr int HD = decltype(hd)::value;
    const T* qt = static_cast<const T*>(q);
    const T* kt = static_cast<const T*>(k);
    const T* vt = static_cast<const T*>(v);
    const T* ot = static_cast<const T*>(dout);
    const float sl2 = float(scale) * ma::kLog2e;
    // dk and dv (fused: dq's accumulation too); every kernel with with_mtiles's m-tiles per warp.
    auto dkdv = [&](auto fused) -> int {
      return with_mtiles<HD>(narrow, [&](auto mt) -> int {
        constexpr bool F = decltype(fused)::value;
        constexpr int M = decltype(mt)::value;
        constexpr size_t bytes = dkdv_bytes<T, HD, F, M>();
        if (int e = allow_smem(k_attn_dkdv_mma<T, HD, F, M>, bytes)) return e;
        k_attn_dkdv_mma<T, HD, F, M><<<mma_grid(Tk, ma::block_rows<M>(), N), ma::kMmaThreads, bytes, st>>>(
            qt, kt, vt, ot, lse, delta, static_cast<T*>(dk), static_cast<T*>(dv), L, N, Tq, Tk, causal, sl2,
            float(scale), dq_accum);
        return 0;
      });
    };
    if (dq_accum) {  // FA2's fused backward: dq by atomic adds in the dk / dv pass, then rounded
      const int64_t count = N * Tq * HD;
      if (count > 0)
        if (cudaError_t e = cudaMemsetAsync(dq_accum, 0, size_t(count) * sizeof(float), st)) return int(e);
      if (Tk > 0)
        if (int e = dkdv(std::true_type{})) return e;
      if (count > 0) {
        const int64_t quads = count / 4, threads = 256;
        const unsigned grid = unsigned(std::min<int64_t>((quads + threads - 1) / threads, 65535));
        k_dq_from_accum<T><<<grid, threads, 0, st>>>(dq_accum, static_cast<T*>(dq), L, N, Tq, HD, float(scale));
      }
      return 0;
    }
    if (Tq > 0) {  // dq
      const int e = with_mtiles<HD>(narrow, [&](auto mt) -> int {
        constexpr int M = decltype(mt)::value;
        constexpr size_t bytes = ma::dq_smem_bytes<T, HD, M>();
        if (int e = allow_smem(k_attn_dq_mma<T, HD, M>, bytes)) return e;
        k_attn_dq_mma<T, HD, M><<<mma_grid(Tq, ma::block_rows<M>(), N), ma::kMmaThreads, bytes, st>>>(
            qt, kt, vt, ot, lse, delta, static_cast<T*>(dq), L, N, Tq, Tk, causal, sl2, float(scale));
        return 0;
      });
      if (e) return e;
    }
    if (Tk > 0)  // Tq == 0: no query tile, dk = dv = 0
      return dkdv(std::false_type{});
    return 0;
  });
}

}  // namespace titanax::kernels::cuda
