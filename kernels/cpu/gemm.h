// CPU GEMM: row-major C = alpha * op(A) @ op(B) + beta * C, op = transpose when ta / tb.
// A is M x K after op, B is K x N after op; lda / ldb / ldc are row strides in elements.
// f32 goes through oneDNN's dnnl_sgemm (JIT-generated AVX2 / AVX-512 kernels, OpenMP threads);
// f64 through Eigen (used by gradient checks).
#pragma once

#include <cstdint>

namespace titanax::kernels::cpu {

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

}  // namespace titanax::kernels::cpu
