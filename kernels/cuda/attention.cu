// Attention forward and backward on CUDA cores (FP32 FMAs): the FlashAttention-2 style block bodies of
// kernels/cuda/attention_fp32.cuh (algorithm, layout and tiling are described there) as __global__
// kernels over the GPU's primitives (kernels/cuda/hw_policy.h), the delta kernel of the backward, and the
// launchers. bf16 / f16 with head dim 64 or 128 normally take the tensor-core kernels instead
// (attention_mma.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/attention_fp32.cuh"
#include "kernels/cuda/common.cuh"

namespace titanax::kernels::cuda {
namespace {
using namespace fp32_attention;

// Blocks per SM the register allocation targets (4 x 128 threads; <= 128 registers a thread). With only the
// thread bound ptxas capped dq at 64 registers and spilled; 4 blocks of <= 49.8 KB shared also fit an SM.
constexpr int kMinBlocks = 4;

template <class T, int DC>
__global__ void __launch_bounds__(kAttnThreads, kMinBlocks)
    k_attn_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
               float* __restrict__ lse, const AttentionLayout L, int64_t N, int64_t Tq, int64_t Tk, int D, bool causal,
               float scale) {
  extern __shared__ float sm[];
  forward<DevicePrim, T, DC>(q, k, v, o, lse, L, N, Tq, Tk, D, causal, scale, sm);
}

template <class T, int DC>
__global__ void __launch_bounds__(kAttnThreads, kMinBlocks)
    k_attn_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
              const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq, const AttentionLayout L,
              int64_t N, int64_t Tq, int64_t Tk, int D, bool causal, float scale) {
  extern __shared__ float sm[];
  backward_dq<DevicePrim, T, DC>(q, k, v, dout, lse, delta, dq, L, N, Tq, Tk, D, causal, scale, sm);
}

template <class T, int DC>
__global__ void __launch_bounds__(kAttnThreads, kMinBlocks)
    k_attn_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                T* __restrict__ dk, T* __restrict__ dv, const AttentionLayout L, int64_t N, int64_t Tq, int64_t Tk, int D,
                bool causal, float scale) {
  extern __shared__ float sm[];
  backward_dkdv<DevicePrim, T, DC>(q, k, v, dout, lse, delta, dk, dv, L, N, Tq, Tk, D, causal, scale, sm);
}

template <class T>
__global__ void k_attn_delta(const T* __restrict__ o, const T* __restrict__ dout, const AttentionLayout L,
                             float* __restrict__ delta, int64_t N, int64_t Tq, int D) {
  attention_delta<DevicePrim>(o, dout, L, delta, N, Tq, D);
}

template <int C>
struct Chunks {
  static constexpr int value = C;
};

// body(T{}, Chunks<DC>{}) for the element type t and DC = ceil(D / 32) (1 for D = 0); body returns an error
// code (0 = success). Then the launch error.
template <class Body>
int dispatch_attention(Dt t, int64_t D, Body body) {
  if (D < 0 || D > 128) return int(cudaErrorInvalidValue);
  const int dc = D <= 32 ? 1 : D <= 64 ? 2 : D <= 96 ? 3 : 4;
  auto by_chunks = [&](auto tv) -> int {
    switch (dc) {
      case 1: return body(tv, Chunks<1>{});
      case 2: return body(tv, Chunks<2>{});
      case 3: return body(tv, Chunks<3>{});
      default: return body(tv, Chunks<4>{});
    }
  };
  int err = 0;
  switch (t) {
    case Dt::f32: err = by_chunks(float{}); break;
    case Dt::f16: err = by_chunks(__half{}); break;
    case Dt::bf16: err = by_chunks(__nv_bfloat16{}); break;
    default: return int(cudaErrorInvalidValue);
  }
  return err ? err : int(cudaGetLastError());
}

dim3 attention_grid(int64_t rows, int64_t N) {
  const int64_t bx = (rows + kBlockRows - 1) / kBlockRows;
  return dim3(unsigned(bx), unsigned(N < 65535 ? N : 65535));
}

}  // namespace

int launch_attention_forward(Dt t, const void* q, const void* k, const void* v, const AttentionLayout& L, int64_t N,
                             int64_t Tq, int64_t Tk, int64_t D, bool causal, double scale, void* o, float* lse,
                             void* stream) {
  if (N == 0 || Tq == 0) return 0;
  auto st = as_stream(stream);
  const size_t bytes = fwd_smem_floats(int(D)) * sizeof(float);
  return dispatch_attention(t, D, [&](auto tv, auto ch) -> int {
    using T = decltype(tv);
    constexpr int DC = decltype(ch)::value;
    if (int e = allow_smem(k_attn_fwd<T, DC>, bytes)) return e;
    k_attn_fwd<T, DC><<<attention_grid(Tq, N), kAttnThreads, bytes, st>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(o), lse, L, N,
        Tq, Tk, int(D), causal, float(scale));
    return 0;
  });
}

int launch_attention_delta(Dt t, const void* o, const void* dout, const AttentionLayout& L, int64_t N, int64_t Tq,
                           int64_t D, float* delta, void* stream) {
  if (N * Tq == 0) return 0;
  return dispatch_attention(t, D, [&](auto tv, auto) -> int {
    using T = decltype(tv);
    k_attn_delta<<<grid_for(N * Tq, kThreads / 32), kThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(o), static_cast<const T*>(dout), L, delta, N, Tq, int(D));
    return 0;
  });
}

int launch_attention_backward(Dt t, const void* q, const void* k, const void* v, const void* o, const float* lse,
                              const void* dout, const AttentionLayout& L, int64_t N, int64_t Tq, int64_t Tk, int64_t D,
                              bool causal, double scale, void* dq, void* dk, void* dv, float* delta, void* stream) {
  if (N == 0) return 0;
  auto st = as_stream(stream);
  const size_t bq = dq_smem_floats(int(D)) * sizeof(float), bkv = dkdv_smem_floats(int(D)) * sizeof(float);
  return dispatch_attention(t, D, [&](auto tv, auto ch) -> int {
    using T = decltype(tv);
    constexpr int DC = decltype(ch)::value;
    const T* qt = static_cast<const T*>(q);
    const T* kt = static_cast<const T*>(k);
    const T* vt = static_cast<const T*>(v);
    const T* ot = static_cast<const T*>(dout);
    if (Tq > 0) {
      if (int e = launch_attention_delta(t, o, dout, L, N, Tq, D, delta, stream)) return e;
      if (int e = allow_smem(k_attn_dq<T, DC>, bq)) return e;
      k_attn_dq<T, DC><<<attention_grid(Tq, N), kAttnThreads, bq, st>>>(qt, kt, vt, ot, lse, delta,
                                                                         static_cast<T*>(dq), L, N, Tq, Tk, int(D),
                                                                         causal, float(scale));
    }
    if (Tk > 0) {  // with Tq == 0 the loop over query tiles is empty: dk = dv = 0
      if (int e = allow_smem(k_attn_dkdv<T, DC>, bkv)) return e;
      k_attn_dkdv<T, DC><<<attention_grid(Tk, N), kAttnThreads, bkv, st>>>(
          qt, kt, vt, ot, lse, delta, static_cast<T*>(dk), static_cast<T*>(dv), L, N, Tq, Tk, int(D), causal,
          float(scale));
    }
    return 0;
  });
}

}  // namespace titanax::kernels::cuda
