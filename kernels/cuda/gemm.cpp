// GEMM through cuBLASLt (kernels/cuda/kernels.h: matmul, linear). Row-major C = A @ B is computed as the
// column-major C^T = B^T A^T, so no operand is copied for a transpose. One cuBLASLt handle and a 32 MiB
// workspace per device, created on first use. f16 / bf16 operands multiply with f32 accumulation and f32
// scalars (CUBLAS_COMPUTE_32F), the output rounded to the operands' dtype.
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <memory>
#include <mutex>
#include <vector>

#include "core/allocator.h"
#include "core/cuda_runtime.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/kernels.h"

namespace titanax::kernels::cuda {
namespace {

constexpr size_t kWorkspace = size_t(32) << 20;

struct LtContext {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
};

LtContext& context(int device) {
  static std::mutex mu;
  static std::vector<std::unique_ptr<LtContext>> ctx;  // leaked at exit on purpose (driver teardown order)
  std::lock_guard<std::mutex> g(mu);
  if (ctx.size() <= size_t(device)) ctx.resize(size_t(device) + 1);
  if (!ctx[size_t(device)]) {
    auto c = std::make_unique<LtContext>();
    TX_CUBLAS_CHECK(cublasLtCreate(&c->handle));
    c->workspace = cuda_allocator(device).allocate(kWorkspace);
    ctx[size_t(device)] = std::move(c);
  }
  return *ctx[size_t(device)];
}

template <class T, void (*Destroy)(T)>
struct Owned {
  T h = nullptr;
  ~Owned() {
    if (h) Destroy(h);
  }
};
void destroy_desc(cublasLtMatmulDesc_t d) { cublasLtMatmulDescDestroy(d); }
void destroy_layout(cublasLtMatrixLayout_t l) { cublasLtMatrixLayoutDestroy(l); }
void destroy_pref(cublasLtMatmulPreference_t p) { cublasLtMatmulPreferenceDestroy(p); }

// Column-major C[m, n] (ldc) = op(A) @ op(B) + beta C over `batch` strided matrices, plus bias[i] on row i
// of C when `bias` is given (cuBLASLt's BIAS epilogue: a vector of m elements of C's dtype, added in the
// f32 epilogue before C is rounded; no separate launch). Returns false, having done nothing, when
// cuBLASLt has no algorithm for the BIAS epilogue (the caller adds the bias another way); throws
// DeviceError when it has none at all.
bool gemm_cm(int device, DType dt, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* A, int64_t lda,
             int64_t sa, const void* B, int64_t ldb, int64_t sb, void* C, int64_t ldc, int64_t sc, int64_t batch,
             double beta, bool tf32, const void* bias = nullptr) {
  if (m == 0 || n == 0 || batch == 0) return true;
  LtContext& ctx = context(device);
  const bool f64 = dt == DType::f64;
  const cudaDataType_t type = f64 ? CUDA_R_64F : dt == DType::bf16 ? CUDA_R_16BF : dt == DType::f16 ? CUDA_R_16F : CUDA_R_32F;
  const cublasComputeType_t compute =
      f64 ? CUBLAS_COMPUTE_64F : (tf32 && dt == DType::f32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F);
  const cudaDataType_t scale = f64 ? CUDA_R_64F : CUDA_R_32F;
  Owned<cublasLtMatmulDesc_t, destroy_desc> desc;
  TX_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc.h, compute, scale));
  cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  TX_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.h, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
  TX_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.h, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
  if (bias) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    TX_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.h, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    TX_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.h, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  }
  auto layout = [&](Owned<cublasLtMatrixLayout_t, destroy_layout>& l, int64_t rows, int64_t cols, int64_t ld,
                    int64_t stride) {
    TX_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l.h, type, uint64_t(rows), uint64_t(cols), ld));
    if (batch > 1) {
      int32_t cnt = int32_t(batch);
      TX_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l.h, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &cnt, sizeof(cnt)));
      TX_CUBLAS_CHECK(
          cublasLtMatrixLayoutSetAttribute(l.h, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
    }
  };
  Owned<cublasLtMatrixLayout_t, destroy_layout> la, lb, lc;
  layout(la, ta ? k : m, ta ? m : k, lda, sa);
  layout(lb, tb ? n : k, tb ? k : n, ldb, sb);
  layout(lc, m, n, ldc, sc);
  Owned<cublasLtMatmulPreference_t, destroy_pref> pref;
  TX_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref.h));
  size_t ws = kWorkspace;
  TX_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(ctx.handle, desc.h, la.h, lb.h, lc.h, lc.h, pref.h, 1, &heur, &found);
  if (bias && (hs != CUBLAS_STATUS_SUCCESS || found == 0)) return false;
  TX_CUBLAS_CHECK(hs);
  if (found == 0)
    throw DeviceError("cuBLASLt found no algorithm for a matmul", "a supported GEMM",
                      "m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k) +
                          " batch=" + std::to_string(batch) + " " + std::string(dtype_name(dt)),
                      "try f32, or make the operands contiguous");
  const double one64 = 1.0, beta64 = beta;
  const float one32 = 1.0f, beta32 = float(beta);
  const void* alpha = f64 ? static_cast<const void*>(&one64) : static_cast<const void*>(&one32);
  const void* bet = f64 ? static_cast<const void*>(&beta64) : static_cast<const void*>(&beta32);
  auto st = static_cast<cudaStream_t>(cuda_rt::current_stream(device));
  TX_CUBLAS_CHECK(cublasLtMatmul(ctx.handle, desc.h, alpha, A, la.h, B, lb.h, bet, C, lc.h, C, lc.h, &heur.algo,
                                 ctx.workspace, kWorkspace, st));
  return true;
}

void check_float(const Tensor& t, const char* what) {
  if (!is_floating(t.dtype()))
    throw DTypeError(std::string(what) + ": unsupported dtype on CUDA", "f32, f64, bf16, f16", std::string(dtype_name(t.dtype())),
                     "cast with astype(DType::f32)");
}

}  // namespace

void matmul(const Tensor& a0, const Tensor& b0, Tensor& c, bool tf32) {
  check_float(a0, "matmul");
  const int r = c.dim();
  const int64_t M = c.shape()[r - 2], N = c.shape()[r - 1], K = a0.shape()[a0.dim() - 1];
  Shape batch(c.shape().begin(), c.shape().end() - 2);
  const int64_t nb = batch.numel();
  auto full = [&](const Tensor& t, int64_t rows, int64_t cols) {  // broadcast batch, contiguous
    Shape s = batch;
    s.push_back(rows);
    s.push_back(cols);
    Tensor v = t.detach();
    if (v.shape() != s) v = v.expand(s);
    return v.contiguous();
  };
  Tensor a = full(a0, M, K), b = full(b0, K, N);
  if (K == 0) {  // an empty sum: zeros
    fill_(c, 0.0);
    return;
  }
  // Row-major C[M,N] = A[M,K] B[K,N]  <=>  column-major C^T[N,M] = B^T[N,K] A^T[K,M].
  gemm_cm(c.device().index, c.dtype(), false, false, N, M, K, b.raw_data(), N, K * N, a.raw_data(), K, M * K,
          c.raw_data(), N, M * N, nb, 0.0, tf32);
}

void linear(const Tensor& x0, const Tensor& w0, const Tensor* bias, Tensor& y, bool tf32) {
  check_float(x0, "linear");
  Tensor x = x0.detach().contiguous(), w = w0.detach().contiguous();
  const int64_t in_f = w.shape()[1], out_f = w.shape()[0], M = in_f > 0 ? x.numel() / in_f : y.numel() / std::max<int64_t>(out_f, 1);
  // Row-major Y[M,out] = X[M,in] W[out,in]^T  <=>  column-major Y^T[out,M] = W'[in,out]^T X^T[in,M]; the bias
  // is per row of Y^T (an output feature): cuBLASLt's BIAS epilogue (not for f64, whose GEMMs take no
  // epilogue), else the bias copied into Y first and accumulated with beta = 1.
  auto gemm = [&](double beta, const void* b) {
    return gemm_cm(y.device().index, y.dtype(), true, false, out_f, M, in_f, w.raw_data(), in_f, 0, x.raw_data(), in_f, 0,
                   y.raw_data(), out_f, 0, 1, beta, tf32, b);
  };
  if (in_f > 0 && bias && y.dtype() != DType::f64 && M > 0) {
    const Tensor b = bias->detach().astype(y.dtype()).contiguous();
    if (gemm(0.0, b.raw_data())) return;  // b goes back to the stream-ordered pool after the queued GEMM
  }
  double beta = 0.0;
  if (bias) {
    Tensor yb = y;
    copy_cast(bias->detach().expand(y.shape()), yb);
    beta = 1.0;
  }
  if (in_f == 0) {
    if (!bias) fill_(y, 0.0);
    return;
  }
  gemm(beta, nullptr);
}

}  // namespace titanax::kernels::cuda
