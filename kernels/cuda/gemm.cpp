// GEMM through cuBLASLt (kernels/cuda/kernels.h: matmul, linear). Row-major C = A @ B is computed as the
// column-major C^T = B^T A^T, so no operand is copied for a transpose. One cuBLASLt handle and a 32 MiB
// workspace per device, created on first use. f16 / bf16 operands multiply with f32 accumulation and f32
// scalars (CUBLAS_COMPUTE_32F), the output rounded to the operands' dtype.
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>
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

// The largest power of two up to 256 that divides p's address. cuBLASLt's heuristic assumes 256-byte
// aligned operands unless the preference says otherwise (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES), and
// an algorithm picked under that assumption may not run on a view at an odd offset (a microbatch's rows);
// PyTorch sets these preferences the same way (aten/src/ATen/cuda/CUDABlas.cpp).
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al >>= 1;
  return al;
}

// The algorithm cuBLASLt's heuristic chose for a GEMM problem, per device, dtype, transposes, sizes,
// leading dimensions, batch strides, compute mode, epilogue and operand alignments: the heuristic query
// costs tens of microseconds of host time, as much as a small GEMM itself, and a training step asks for
// the same few problems every step. A problem the BIAS epilogue has no algorithm for is remembered too.
struct AlgoCache {
  struct Entry {
    bool found = false;
    cublasLtMatmulAlgo_t algo{};
  };
  std::mutex mu;
  std::map<std::array<int64_t, 19>, Entry> entries;
};
AlgoCache& algo_cache() {
  static AlgoCache* c = new AlgoCache();  // leaked at exit on purpose, as the contexts
  return *c;
}

// Column-major C[m, n] (ldc) = op(A) @ op(B) + beta C over `batch` strided matrices, plus bias[i] on row i
// of C when `bias` is given (cuBLASLt's BIAS epilogue: a vector of m elements of C's dtype, added in the
// f32 epilogue before C is rounded; no separate launch). Returns false, having done nothing, when
// cuBLASLt has no algorithm for the problem (the caller adds the bias another way, or copies the operands
// into a layout it takes; no_algorithm() is the error when nothing is left).
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
  const uint32_t align_a = alignment(A), align_b = alignment(B), align_c = alignment(C);
  const std::array<int64_t, 19> key{device, int64_t(dt), ta, tb, tf32, bias != nullptr, m, n, k, lda, sa, ldb, sb, ldc, sc,
                                    batch, align_a, align_b, align_c};
  AlgoCache& cache = algo_cache();
  AlgoCache::Entry entry;
  bool cached = false;
  {
    std::lock_guard<std::mutex> g(cache.mu);
    if (auto it = cache.entries.find(key); it != cache.entries.end()) entry = it->second, cached = true;
  }
  if (!cached) {
    Owned<cublasLtMatmulPreference_t, destroy_pref> pref;
    TX_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref.h));
    size_t ws = kWorkspace;
    TX_CUBLAS_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c}};
    for (const auto& [attr, value] : aligns)
      TX_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, attr, &value, sizeof(value)));
    cublasLtMatmulHeuristicResult_t heur{};
    int found = 0;
    const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(ctx.handle, desc.h, la.h, lb.h, lc.h, lc.h, pref.h, 1, &heur, &found);
    if (!bias) TX_CUBLAS_CHECK(hs);  // with a bias, a failed query means no algorithm for the epilogue
    entry.found = hs == CUBLAS_STATUS_SUCCESS && found > 0;
    entry.algo = heur.algo;
    std::lock_guard<std::mutex> g(cache.mu);
    cache.entries.emplace(key, entry);
  }
  if (!entry.found) return false;
  const double one64 = 1.0, beta64 = beta;
  const float one32 = 1.0f, beta32 = float(beta);
  const void* alpha = f64 ? static_cast<const void*>(&one64) : static_cast<const void*>(&one32);
  const void* bet = f64 ? static_cast<const void*>(&beta64) : static_cast<const void*>(&beta32);
  auto st = static_cast<cudaStream_t>(cuda_rt::current_stream(device));
  TX_CUBLAS_CHECK(cublasLtMatmul(ctx.handle, desc.h, alpha, A, la.h, B, lb.h, bet, C, lc.h, C, lc.h, &entry.algo,
                                 ctx.workspace, kWorkspace, st));
  return true;
}

[[noreturn]] void no_algorithm(const char* what, DType dt, int64_t m, int64_t n, int64_t k, int64_t batch) {
  throw DeviceError(std::string("cuBLASLt found no algorithm for ") + what, "a supported GEMM",
                    "column-major m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k) +
                        " batch=" + std::to_string(batch) + " " + std::string(dtype_name(dt)),
                    "try f32, or pad the matrices' sizes to multiples of 8");
}

// An operand of matmul as cuBLASLt reads it without a copy: the matrices [rows, cols] of t (the first at
// t.raw_data()) either row-major (the column stride 1) or transposed (the row stride 1, as a
// permute(-1, -2) of a contiguous tensor: the weight gradient's dY^T), `ld` the other stride, and one
// stride between the batch's matrices.
struct Operand {
  Tensor t;
  bool transposed = false;
  int64_t ld = 0, batch_stride = 0;
};

// t's last two axes [rows, cols] as an Operand (batch_stride unset), when their strides allow. A stride
// of an axis of extent 1 is never used: the smallest valid ld is taken there.
std::optional<Operand> matrix_operand(const Tensor& t, int64_t rows, int64_t cols) {
  const int r = t.dim();
  const int64_t sr = t.strides()[r - 2], sc = t.strides()[r - 1];
  if ((cols == 1 || sc == 1) && (rows == 1 || sr >= cols)) return Operand{t, false, rows == 1 ? cols : sr, 0};
  if ((rows == 1 || sr == 1) && sc >= rows) return Operand{t, true, sc, 0};  // cols > 1 here
  return std::nullopt;
}

// t broadcast to [batch..., rows, cols]: as stored when its matrices' layout allows and its batch axes
// step by one uniform, nonzero stride, else a contiguous copy (a broadcast, an interleaved layout).
Operand gemm_operand(const Tensor& t0, const Shape& batch, int64_t rows, int64_t cols) {
  Shape s = batch;
  s.push_back(rows);
  s.push_back(cols);
  Tensor v = t0.detach();
  if (v.shape() != s) v = v.expand(s);
  int64_t bs = rows * cols, next = -1;  // the batch axes of more than one matrix, innermost first
  bool uniform = true;
  for (int d = v.dim() - 3; d >= 0; --d) {
    const int64_t n = v.shape()[d], st = v.strides()[d];
    if (n == 1) continue;
    if (next < 0) bs = st;
    else uniform = uniform && st == next;
    next = st * n;
    uniform = uniform && st != 0;
  }
  if (std::optional<Operand> o = uniform ? matrix_operand(v, rows, cols) : std::nullopt) {
    o->batch_stride = bs;
    return *o;
  }
  return {v.contiguous(), false, cols, rows * cols};
}

void check_float(const Tensor& t, const char* what) {
  if (!is_floating(t.dtype()))
    throw DTypeError(std::string(what) + ": unsupported dtype on CUDA", "f32, f64, bf16, f16", std::string(dtype_name(t.dtype())),
                     "cast with astype(DType::f32)");
}

}  // namespace

GemmCall matmul_call(const Tensor& a0, const Tensor& b0, const Shape& cs) {
  const int r = cs.rank();
  const int64_t M = cs[r - 2], N = cs[r - 1], K = a0.shape()[a0.dim() - 1];
  const Shape batch(cs.begin(), cs.end() - 2);
  const int64_t nb = batch.numel();
  const Operand a = gemm_operand(a0, batch, M, K);
  // Row-major C[M,N] = A[M,K] B[K,N]  <=>  column-major C^T[N,M] = B^T[N,K] A^T[K,M]: a row-major operand is
  // its column-major transpose as stored (no op), a transposed one is stored column-major (op T).
  // One matrix b for every batch (a weight: the input gradient of a linear layer on [B, T, in], dY @ W)
  // and a's batches stacked row blocks: one GEMM of nb * M rows, as the CPU folds it, instead of nb
  // copies of b.
  if (nb > 1 && !a.transposed && a.batch_stride == M * a.ld) {
    bool shared = true;
    for (int d = 0; d + 2 < b0.dim(); ++d) shared = shared && (b0.shape()[d] == 1 || b0.strides()[d] == 0);
    if (const std::optional<Operand> b = shared ? matrix_operand(b0.detach(), K, N) : std::nullopt)
      return GemmCall{b->transposed, false, N, nb * M, K, b->t, a.t, b->ld, 0, a.ld, 0, N, 0, 1};
  }
  const Operand b = gemm_operand(b0, batch, K, N);
  return GemmCall{b.transposed, a.transposed, N, M, K, b.t, a.t, b.ld, b.batch_stride, a.ld, a.batch_stride, N, M * N, nb};
}

void matmul(const Tensor& a, const Tensor& b, Tensor& c, bool tf32) {
  check_float(a, "matmul");
  if (a.shape()[a.dim() - 1] == 0) {  // an empty sum: zeros
    fill_(c, 0.0);
    return;
  }
  auto run = [&](const GemmCall& g) {
    return gemm_cm(c.device().index, c.dtype(), g.ta, g.tb, g.m, g.n, g.k, g.A.raw_data(), g.lda, g.sa, g.B.raw_data(), g.ldb,
                   g.sb, c.raw_data(), g.ldc, g.sc, g.batch, 0.0, tf32);
  };
  if (run(matmul_call(a, b, c.shape()))) return;
  // No algorithm for the views as they lie (an odd leading dimension or offset of a 16-bit view): fresh,
  // contiguous, 256-byte aligned copies, the layout cuBLASLt covers most widely.
  const GemmCall g = matmul_call(a.detach().clone(), b.detach().clone(), c.shape());
  if (!run(g)) no_algorithm("a matmul", c.dtype(), g.m, g.n, g.k, g.batch);
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
    Tensor b = bias->detach().astype(y.dtype()).contiguous();
    // A bias at an odd offset (a view into a larger buffer) is copied: the alignment preferences cover
    // A, B and C only, and the epilogue's kernels may load the bias in vectors.
    if (alignment(b.raw_data()) < 16) b = b.clone();
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
  if (!gemm(beta, nullptr)) no_algorithm("a linear layer", y.dtype(), out_f, M, in_f, 1);
}

}  // namespace titanax::kernels::cuda
