// Kernels written against a policy of hardware primitives, so that the same block bodies run on the GPU
// and, in tests/emulated/, on the CPU (where CI checks them without a GPU). A policy `Hw` provides, as
// static functions:
//   int thread(), threads()                         threadIdx.x, blockDim.x
//   int block_x(), block_y(), grid_x(), grid_y()    blockIdx.x / .y, gridDim.x / .y
//   void sync()                                     __syncthreads()
//   float / double shfl_xor(v, int lane_mask)       __shfl_xor_sync over the full warp
//   float shfl(float v, int src_lane)               __shfl_sync over the full warp
//   void report(const ReportSlot&, int code, int64_t index, int64_t value, int64_t bound, int64_t aux)
//                                                   bad input into the device's report slot (launch.h);
//                                                   the first report since the host's last check wins
//   void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], T)
//                                                   d += A B, mma.sync.aligned.m16n8k16 (T bf16 or f16)
//   void st32(void*, uint32_t)                      a 4-byte aligned store
//   void ldsm_x4(uint32_t (&r)[4], const void* row), ldsm_x4_trans(...)
//                                                   ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane
//                                                   8 m + i gives the shared address of row i of 8x8 matrix m
//                                                   (16 bytes, 16-byte aligned); lane 4 g + c receives in
//                                                   r[m] elements (g, 2c) and (g, 2c + 1) of matrix m, or
//                                                   with .trans (2c, g) and (2c + 1, g), the lower in the low
//                                                   half (PTX ISA, "Warp-level matrix load instruction")
//   void cp_async16(void* smem, const void* global, bool valid), cp_async4(...)
//                                                   cp.async of 16 (.cg) / 4 (.ca) bytes, global to shared;
//                                                   !valid writes zeros and reads nothing (src-size 0)
//   void cp_async_commit(); void cp_async_wait(int pending)
//                                                   cp.async.commit_group; cp.async.wait_group 0 or 1: the
//                                                   thread's copies, but for the `pending` newest committed
//                                                   groups, have landed (other threads see them after a sync)
//   float exp2_ftz(float x)                         2^x by ex2.approx.ftz.f32 (one MUFU.EX2: relative error
//                                                   about 2^-22, -inf gives 0, results below 2^-126 flush
//                                                   to 0), the softmax exponential of FlashAttention
//   void red_add_f32x2(float* p, float a, float b)  p[0] += a and p[1] += b, each atomic (no value
//                                                   returned), p global and 8-byte aligned:
//                                                   red.global.add.v2.f32 on sm_90, two atomicAdd before
// DevicePrim below is the GPU's policy (nvcc only); tests/emulated/ has the CPU's.
#pragma once

#include <cstdint>

#include "kernels/cuda/launch.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define TX_HW_FN __device__ __forceinline__
#define TX_UNROLL _Pragma("unroll")
#define TX_UNROLL_4 _Pragma("unroll 4")
#define TX_NO_UNROLL _Pragma("unroll 1")
// Block-shared storage declared inside a block body (the emulator runs one block at a time, so a static
// is shared by exactly one block's threads there).
#define TX_SHARED __shared__
#else
#include <vector_types.h>

#include <cstring>
#define TX_HW_FN inline
#define TX_UNROLL
#define TX_UNROLL_4
#define TX_NO_UNROLL
#define TX_SHARED static
#endif

namespace titanax::kernels::cuda {

#ifdef __CUDACC__
struct DevicePrim {
  static __device__ __forceinline__ int thread() { return int(threadIdx.x); }
  static __device__ __forceinline__ int threads() { return int(blockDim.x); }
  static __device__ __forceinline__ int block_x() { return int(blockIdx.x); }
  static __device__ __forceinline__ int block_y() { return int(blockIdx.y); }
  static __device__ __forceinline__ int grid_x() { return int(gridDim.x); }
  static __device__ __forceinline__ int grid_y() { return int(gridDim.y); }
  static __device__ __forceinline__ void sync() { __syncthreads(); }
  static __device__ __forceinline__ float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
  static __device__ __forceinline__ double shfl_xor(double v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
  static __device__ void report(const ReportSlot& slot, int code, int64_t index, int64_t value, int64_t bound, int64_t aux) {
    if (atomicCAS(slot.flag, 0, code) != 0) return;
    volatile DeviceReport* h = slot.host;
    h->index = index;
    h->value = value;
    h->bound = bound;
    h->aux = aux;
    __threadfence_system();
    h->code = code;
  }
  static __device__ __forceinline__ float shfl(float v, int lane) { return __shfl_sync(0xffffffffu, v, lane); }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __nv_bfloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __half) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  static __device__ __forceinline__ void st32(void* p, uint32_t v) { *static_cast<uint32_t*>(p) = v; }
  static __device__ __forceinline__ unsigned smem_addr(const void* p) { return unsigned(__cvta_generic_to_shared(p)); }
  static __device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
  }
  static __device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
  }
  static __device__ __forceinline__ void cp_async16(void* d, const void* s, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(d)), "l"(s), "r"(valid ? 16 : 0)
                 : "memory");
  }
  static __device__ __forceinline__ void cp_async4(void* d, const void* s, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(d)), "l"(s), "r"(valid ? 4 : 0)
                 : "memory");
  }
  static __device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
  }
  static __device__ __forceinline__ void red_add_f32x2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
  }
  static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
  static __device__ __forceinline__ void cp_async_wait(int pending) {
    if (pending == 0) asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    else asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  }
};
#endif

// ---- 16-byte accesses to global memory (16-byte aligned), the same code on the GPU and in the emulator

TX_HW_FN float4 load_f4(const float* p) {
#ifdef __CUDACC__
  return *reinterpret_cast<const float4*>(p);
#else
  float4 v;
  std::memcpy(&v, p, 16);
  return v;
#endif
}
TX_HW_FN void store_f4(float* p, float4 v) {
#ifdef __CUDACC__
  *reinterpret_cast<float4*>(p) = v;
#else
  std::memcpy(p, &v, 16);
#endif
}

// ---- grid-stride loops: a thread's first linear index over the grid, and the grid's stride

template <class Hw>
TX_HW_FN int64_t grid_index() {
  return int64_t(Hw::block_x()) * Hw::threads() + Hw::thread();
}
template <class Hw>
TX_HW_FN int64_t grid_stride() {
  return int64_t(Hw::grid_x()) * Hw::threads();
}

// ---- reductions over a policy's warps and blocks

/// x > m ? x : m: a max that ignores NaN comparisons, as the CPU's row_max.
template <class T>
TX_HW_FN T plain_max_of(T m, T x) { return x > m ? x : m; }

/// Sum / max over the 32 lanes of the warp (butterfly shuffles): every lane gets the result.
template <class Hw, class T>
TX_HW_FN T warp_sum_of(T v) {
  TX_UNROLL
  for (int o = 16; o > 0; o >>= 1) v += Hw::shfl_xor(v, o);
  return v;
}
template <class Hw, class T>
TX_HW_FN T warp_max_of(T v) {
  TX_UNROLL
  for (int o = 16; o > 0; o >>= 1) v = plain_max_of(v, Hw::shfl_xor(v, o));
  return v;
}

/// Sum / max over the whole block (threads() a multiple of 32, at most 1024): every thread gets the
/// result. Each call begins with a barrier, so consecutive calls never race on the shared partials.
template <class Hw, class T, class WarpOp>
TX_HW_FN T block_reduce_of(T v, T identity, WarpOp warp_op) {
  TX_SHARED T sh[32];
  const int lane = Hw::thread() & 31, w = Hw::thread() >> 5, nw = Hw::threads() >> 5;
  v = warp_op(v);
  Hw::sync();
  if (lane == 0) sh[w] = v;
  Hw::sync();
  const T r = lane < nw ? sh[lane] : identity;
  return warp_op(r);
}
template <class Hw, class T>
TX_HW_FN T block_sum_of(T v) {
  return block_reduce_of<Hw>(v, T(0), [](T x) { return warp_sum_of<Hw>(x); });
}
template <class Hw, class T>
TX_HW_FN T block_max_of(T v, T lowest) {
  return block_reduce_of<Hw>(v, lowest, [](T x) { return warp_max_of<Hw>(x); });
}

/// a + b rounded once and never merged with a product before it into an FMA (compilers contract a * b + c
/// by default: nvcc's --fmad, GCC's -ffp-contract=fast), so that a fused kernel adds bitwise as a separate
/// add kernel would: __fadd_rn / __dadd_rn on the GPU, a call the host compiler keeps in tests/emulated/.
#ifdef __CUDACC__
TX_HW_FN float add_rn(float a, float b) { return __fadd_rn(a, b); }
TX_HW_FN double add_rn(double a, double b) { return __dadd_rn(a, b); }
#else
[[gnu::noinline]] inline float add_rn(float a, float b) { return a + b; }
[[gnu::noinline]] inline double add_rn(double a, double b) { return a + b; }
#endif

/// a * b rounded once and never merged with an add after it into an FMA: __fmul_rn / __dmul_rn on the
/// GPU, a call the host compiler keeps in tests/emulated/ (as add_rn).
#ifdef __CUDACC__
TX_HW_FN float mul_rn(float a, float b) { return __fmul_rn(a, b); }
TX_HW_FN double mul_rn(double a, double b) { return __dmul_rn(a, b); }
#else
[[gnu::noinline]] inline float mul_rn(float a, float b) { return a * b; }
[[gnu::noinline]] inline double mul_rn(double a, double b) { return a * b; }
#endif

}  // namespace titanax::kernels::cuda
