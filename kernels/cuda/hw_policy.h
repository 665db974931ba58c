// Kernels written against a policy of hardware primitives, so that the same block bodies run on the GPU
// and, in tests/emulated/, on the CPU (where CI checks them without a GPU). A policy `Hw` provides, as
// static functions:
//   int thread(), block_x(), block_y(), grid_y()   threadIdx.x, blockIdx.x / .y, gridDim.y
//   void sync()                                     __syncthreads()
//   float shfl_xor(float v, int lane_mask)          __shfl_xor_sync over the full warp
//   float shfl(float v, int src_lane)               __shfl_sync over the full warp
//   void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], T)
//                                                   d += A B, mma.sync.aligned.m16n8k16 (T bf16 or f16)
//   uint32_t ld32(const void*); void st32(void*, uint32_t); void copy16(void*, const void*); void zero16(void*)
//                                                   4- and 16-byte aligned loads and stores
// DevicePrim below is the GPU's policy (nvcc only); tests/emulated/ has the CPU's.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define TX_HW_FN __device__ __forceinline__
#define TX_UNROLL _Pragma("unroll")
#define TX_UNROLL_4 _Pragma("unroll 4")
#else
#define TX_HW_FN inline
#define TX_UNROLL
#define TX_UNROLL_4
#endif

namespace titanax::kernels::cuda {

#ifdef __CUDACC__
struct DevicePrim {
  static __device__ __forceinline__ int thread() { return int(threadIdx.x); }
  static __device__ __forceinline__ int block_x() { return int(blockIdx.x); }
  static __device__ __forceinline__ int block_y() { return int(blockIdx.y); }
  static __device__ __forceinline__ int grid_y() { return int(gridDim.y); }
  static __device__ __forceinline__ void sync() { __syncthreads(); }
  static __device__ __forceinline__ float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
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
  static __device__ __forceinline__ uint32_t ld32(const void* p) { return *static_cast<const uint32_t*>(p); }
  static __device__ __forceinline__ void st32(void* p, uint32_t v) { *static_cast<uint32_t*>(p) = v; }
  static __device__ __forceinline__ void copy16(void* d, const void* s) { *static_cast<uint4*>(d) = *static_cast<const uint4*>(s); }
  static __device__ __forceinline__ void zero16(void* d) { *static_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u); }
};
#endif

}  // namespace titanax::kernels::cuda
