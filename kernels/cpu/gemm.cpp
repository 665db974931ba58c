#include "kernels/cpu/gemm.h"

#include <Eigen/Core>
#include <oneapi/dnnl/dnnl.h>

#include <string>

#include "core/error.h"

namespace titanax::kernels::cpu {

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  dnnl_status_t st = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  if (st != dnnl_success)
    throw InternalError("dnnl_sgemm failed with status " + std::to_string(int(st)),
                        "M, N, K >= 0 and leading dimensions >= the row lengths",
                        "M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                            " lda=" + std::to_string(lda) + " ldb=" + std::to_string(ldb) + " ldc=" + std::to_string(ldc));
}

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using CMap = Eigen::Map<const Mat, 0, Eigen::OuterStride<>>;
  Eigen::Map<Mat, 0, Eigen::OuterStride<>> c(C, M, N, Eigen::OuterStride<>(ldc));
  // Stored shapes: A is (ta ? K x M : M x K), B is (tb ? N x K : K x N).
  CMap a(A, ta ? K : M, ta ? M : K, Eigen::OuterStride<>(lda));
  CMap b(B, tb ? N : K, tb ? K : N, Eigen::OuterStride<>(ldb));
  Mat prod = ta ? (tb ? Mat(a.transpose() * b.transpose()) : Mat(a.transpose() * b))
                : (tb ? Mat(a * b.transpose()) : Mat(a * b));
  if (beta == 0) c = alpha * prod;
  else c = alpha * prod + beta * c;
}

}  // namespace titanax::kernels::cpu
