// Launchers of the hand-written CUDA kernels (kernels/cuda/*.cu). Internal to kernels/cuda.
//
// This header is shared by the .cu files (nvcc, C++17) and the host wrappers (kernels/cuda/kernels.cpp,
// C++20), so it uses plain types only: raw device pointers, element counts, strides in elements and an
// opaque `stream` (a cudaStream_t; nullptr is the legacy default stream). Every launcher returns the
// cudaError_t of the launch as an int (0 = success); the host wrappers turn a failure into DeviceError.
// Callers have already checked shapes and dtypes; pointers point at the first element of each operand.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "kernels/update_scalars.h"

namespace titanax::kernels::cuda {

constexpr int kMaxDims = 8;

/// Bad input a kernel found, reported to the host after the fact (cuda_rt::report_slot, checked whenever
/// the host waits for the device). The first report since the last check wins.
struct DeviceReport {
  int code = 0;       ///< ReportCode; 0: nothing to report
  int64_t index = 0;  ///< flat position of the bad element
  int64_t value = 0;  ///< its value
  int64_t bound = 0;  ///< the exclusive upper bound it broke
  int64_t aux = 0;    ///< what else the code needs to say (kLabelOutOfRange: the ignore_index;
                      ///< kIndexOutOfRange: the op, an IndexOp)
};
enum ReportCode : int { kNoReport = 0, kLabelOutOfRange = 1, kIndexOutOfRange = 2 };
/// The ops that report kIndexOutOfRange (DeviceReport::aux), and their names.
enum IndexOp : int { kTake = 0, kEmbedding = 1, kTakeBackward = 2, kEmbeddingBackward = 3, kOneHot = 4 };
inline const char* index_op_name(int op) {
  static const char* const names[] = {"take", "embedding", "take_backward", "embedding_backward", "one_hot"};
  return op >= 0 && op < 5 ? names[op] : "an indexing op";
}
/// Where kernels report: `flag`, an int in device memory (atomicCAS from 0 picks the first report), and
/// `host`, a DeviceReport in pinned host memory mapped for the device, which the winner fills.
struct ReportSlot {
  int* flag = nullptr;
  DeviceReport* host = nullptr;
};

/// Element types the kernels handle (b8 is bool stored as one byte).
enum class Dt : int { f32, f64, i32, i64, u8, b8, f16, bf16 };

/// A common N-d iteration shape (at most kMaxDims axes) with the strides, in elements, of up to four
/// operands (0 on broadcast axes). Operand 0 is the output. Linear index i walks `size` row-major.
struct Layout {
  int ndim = 0;
  int64_t size[kMaxDims] = {};
  int64_t stride[4][kMaxDims] = {};
};

/// Mirrors of kernels::cpu::BinaryOp / UnaryOp (same order; kernels.cpp static_asserts it).
namespace ew {
enum Binary { add, sub, mul, div, maximum, minimum, pow, eq, ne, lt, le, gt, ge, relu_backward,
              gelu_tanh_backward, gelu_erf_backward };
enum Unary { neg, exp, log, sqrt, rsqrt, tanh, sigmoid, abs, square, reciprocal, relu, gelu_tanh, gelu_erf, sign };
}  // namespace ew

// ---------------------------------------------------------------- elementwise (elementwise.cu)
/// d = convert(s) over n elements laid out by L (operand 0: d, 1: s).
int launch_copy(Dt src, Dt dst, const void* s, void* d, const Layout& L, int64_t n, void* stream);
/// out = op(a, b); a, b and out share dtype t except comparisons (out b8). `contig`: every operand is
/// contiguous with the output's shape (no broadcast): a flat loop, 16-byte accesses for aligned f32, f16
/// and bf16. f16 / bf16 compute in f32 and round once (half.cuh).
int launch_binary(int op, Dt t, const void* a, const void* b, void* out, const Layout& L, int64_t n, bool contig,
                  void* stream);
/// out = op(x), f32 / f64 / f16 / bf16 (neg, abs, square, sign, relu also i32 / i64); `contig` as
/// launch_binary's.
int launch_unary(int op, Dt t, const void* x, void* out, const Layout& L, int64_t n, bool contig, void* stream);
/// out = min(max(x, lo), hi) with lo and hi in t's compute type (f32 for f16 / bf16); `contig` as
/// launch_binary's.
int launch_clamp(Dt t, const void* x, void* out, double lo, double hi, const Layout& L, int64_t n, bool contig,
                 void* stream);
/// out = c ? a : b (operands: out, c (b8), a, b).
int launch_where(Dt t, const void* c, const void* a, const void* b, void* out, const Layout& L, int64_t n,
                 void* stream);

// ---------------------------------------------------------------- reductions (reduce.cu)
/// Reduction of x over the `r` axes for every combination of the kept `k` axes. The output is
/// contiguous in the kept axes' row-major order (nout elements); each output reduces nred elements.
struct ReduceLayout {
  int nk = 0, nr = 0;
  int64_t ksize[kMaxDims] = {}, kstride[kMaxDims] = {};
  int64_t rsize[kMaxDims] = {}, rstride[kMaxDims] = {};
  int64_t nout = 1, nred = 1;
};
/// How launch_reduce covers a layout (kernels/cuda/reduce.cuh): `shape` rows by a warp (kRowsWarp) or a
/// block (kRowsBlock) per (output, split), or column tiles (kCols); each output's nred elements cut into
/// `splits` chunks of `chunk` (splits == 1: no workspace, no second pass).
/// Threads per block of the reduction kernels (a multiple of 32).
inline constexpr int kReduceThreads = 256;
struct ReducePlan {
  enum Shape { kRowsWarp, kRowsBlock, kCols };
  Shape shape = kRowsWarp;
  int64_t splits = 1, chunk = 1;
};
/// op: 0 sum (accumulated in double), 1 max, 2 min (NaN propagates). t: f32 / f64 / f16 / bf16 (f16 /
/// bf16: widened on load, the result rounded once). With P.splits > 1, `work` holds P.splits * L.nout
/// accumulators (double for sums, else t's compute type: f32 for f16 / bf16).
int launch_reduce(int op, Dt t, const void* x, void* out, const ReduceLayout& L, const ReducePlan& P, void* work,
                  void* stream);
/// out[o] (i64) = first index of the maximum of x along the single reduced axis (L.nr == 1) of output o
/// (strict >, as the CPU). t: f32, f64, i32, i64.
int launch_argmax(Dt t, const void* x, int64_t* out, const ReduceLayout& L, void* stream);

// ---------------------------------------------------------------- nn (nn.cu); contiguous operands
/// Softmax / log-softmax along the middle axis of [outer, n, inner].
int launch_softmax(Dt t, const void* x, void* y, int64_t outer, int64_t n, int64_t inner, bool log, void* stream);
/// Fused log-softmax + NLL over logits [R, C], labels [R] (i64 when lab64 else i32) into `out`. red: 0
/// mean, 1 sum, 2 none. For mean / sum, `rows` (R doubles of scratch) receives the row losses, summed in
/// row order. The labels are checked on the device first: `count` (one i64 of device scratch) receives
/// the number of labels that are not `ignore` (mean's divisor), and a label outside [0, C) is reported
/// into `slot` (its row's loss is NaN). With ct and dx (else null): the backward in the same pass over
/// each row (its max and sum of exponentials computed once), dx bitwise what
/// launch_cross_entropy_backward gives. t: f32, f64, f16, bf16 (the logits and dx); out and ct are t's
/// compute type (f32 for f16 / bf16: the loss of their exact f32 copy, dx rounded to t once).
int launch_cross_entropy_fused(Dt t, bool lab64, const void* x, const void* lab, const void* ct, int64_t R, int64_t C,
                               int64_t ignore, int red, int64_t* count, const ReportSlot& slot, void* out, double* rows,
                               void* dx, void* stream);
/// dlogits = (softmax(x) - onehot) * scale_r (see kernels/cpu/nn.h); labels checked as
/// launch_cross_entropy_fused does (a bad label's row is NaN).
int launch_cross_entropy_backward(Dt t, bool lab64, const void* x, const void* lab, const void* ct, int64_t R,
                                  int64_t C, int64_t ignore, int red, int64_t* count, const ReportSlot& slot,
                                  void* dx, void* stream);
/// The vocabulary-parallel cross-entropy's shard kernels over this rank's logits [R, C] (f32 / f64; labels
/// i64 when lab64, else i32; kernels/cuda/rows.cuh ce_shard_*): gmax [R] = the row maxima; with the global
/// maxima, part [2, R] = (sum of exp(x - gmax), the label's logit when it lies in columns lo .. lo + C - 1,
/// else 0); dx from stats [2, R] = (gmax, sumexp) all-reduced (red: 0 mean over `count` labels, 1 sum, 2
/// none; ct on the device).
int launch_ce_shard_max(Dt t, const void* x, int64_t R, int64_t C, double* gmax, void* stream);
int launch_ce_shard_partials(Dt t, bool lab64, const void* x, const void* lab, int64_t R, int64_t C, int64_t lo,
                             const double* gmax, double* part, void* stream);
int launch_ce_shard_backward(Dt t, bool lab64, const void* x, const void* lab, const void* ct, int64_t R, int64_t C,
                             int64_t lo, const double* stats, int64_t ignore, int red, int64_t count, void* dx,
                             void* stream);
/// y [R, D] = (x - mean) * rstd * w + b; w, b may be null.
int launch_layer_norm(Dt t, const void* x, const void* w, const void* b, int64_t R, int64_t D, double eps, void* y,
                      void* stream);
/// Doubles of scratch launch_layer_norm_backward needs: the rows' mean and rstd, and dw / db's partial sums
/// over chunks of rows.
size_t layer_norm_backward_workspace(int64_t R, int64_t D);
/// dx (plus res [R, D], the residual stream's other gradient, when not null: added after dx is rounded),
/// and dw / db (may be null) summed over rows deterministically (kernels/cuda/rows.cuh: chunks of rows in a
/// fixed order); `work`: layer_norm_backward_workspace(R, D) doubles of scratch.
int launch_layer_norm_backward(Dt t, const void* dy, const void* x, const void* w, const void* res, int64_t R, int64_t D,
                               double eps, void* dx, void* dw, void* db, double* work, void* stream);
/// out[a, k, b] = x[a, idx[k], b]; x [A, n, B], out [A, K, B].
/// Inverted dropout over n contiguous elements with the CPU's mask (kernels/cpu/nn.h dropout): element i
/// kept (times 1 / (1 - p)) when the uniform of Philox counter (i / 4, 0, 0, 0), key (k0, k1), word
/// i % 4 is >= p. f32 / f64 / f16 / bf16 (f16 / bf16: x widened, times the f32 scale, rounded once).
int launch_dropout(Dt t, const void* x, void* out, int64_t n, double p, uint32_t k0, uint32_t k1, void* stream);
/// Fills n contiguous elements of dtype t (f32 / f64 / f16 / bf16) with the samples the CPU draws for key
/// (k0, k1) (kernels/cpu/random.h): uniform [0, 1) when !normal, else standard normal (random.cuh).
int launch_fill_random(bool normal, Dt t, void* out, int64_t n, uint32_t k0, uint32_t k1, void* stream);
/// out [R, C] (dtype t, any) = the one-hot rows of labels [R] (i64 when lab64, else i32). A label outside
/// [0, C) is reported into `slot` as kIndexOutOfRange (aux kOneHot) and its row is all zeros.
int launch_one_hot(Dt t, bool lab64, const void* lab, int64_t R, int64_t C, const ReportSlot& slot, void* out,
                   void* stream);
/// out[a, k, b] = x[a, idx[k], b] (x [A, n, B], idx K entries, i64 when idx64 else i32, out [A, K, B]);
/// f32 / f64. An index outside [0, n) is reported into `slot` as kIndexOutOfRange (aux: `op`, an
/// IndexOp) and its output elements are NaN.
int launch_gather(Dt t, bool idx64, const void* x, const void* idx, int64_t A, int64_t n, int64_t B, int64_t K,
                  int op, const ReportSlot& slot, void* out, void* stream);
/// Bytes of device workspace launch_scatter_add needs for n rows and K indices (no device work).
size_t scatter_add_workspace(int64_t n, int64_t K);
/// out[a, r, b] = sum over k with idx[k] == r, in increasing k, of g[a, k, b] (g [A, K, B], out [A, n, B],
/// every element written); f32 / f64. Deterministic without atomics and without the host: the indices
/// are sorted by row on the device with a stable radix sort (CUB) carrying k, each row's start found
/// by binary search, then one thread per output element sums its row's run in increasing k. An index
/// outside [0, n) is reported into `slot` as kIndexOutOfRange (aux: `op`) and left out of every sum.
/// `work`: scatter_add_workspace(n, K) bytes of device memory.
int launch_scatter_add(Dt t, bool idx64, const void* g, const void* idx, int64_t A, int64_t n, int64_t B, int64_t K,
                       void* work, int op, const ReportSlot& slot, void* out, void* stream);

// ---------------------------------------------------------------- attention (attention.cu)
// FlashAttention-2 style (Dao 2023, arXiv 2307.08691): online softmax over key tiles in shared memory, no
// T x T matrix, f32 accumulation. q [N, Tq, D], k, v [N, Tk, D], o, dout, dq [N, Tq, D], dk, dv [N, Tk, D] of
// dtype t (f32, f16 or bf16; cudaErrorInvalidValue otherwise or when D > 128), each laid out as its AttnRows
// in the AttentionLayout says; lse, delta [N, Tq] f32, contiguous. causal: key j is visible to query i iff
// j <= i. Every output element is written. Deterministic (no atomics).

#ifdef __CUDACC__
#define TX_HOST_DEVICE __host__ __device__
#else
#define TX_HOST_DEVICE
#endif
/// Where the rows of an attention operand [N, T, D] lie, so that the kernels read views in place: its
/// matrix n = b * heads + h (the leading axes [B, heads] flattened) starts batch * b + head * h elements
/// after the operand's first element, its row i `row` * i elements after that, and a row's D features are
/// contiguous. A contiguous [N, T, D] is {1, T * D, 0, D}; q, k and v (GPT's), [B, heads, T, D] views of one
/// [B, T, 3, heads, D] projection, are {heads, 3 * T * heads * D, D, 3 * heads * D}.
struct AttnRows {
  int64_t heads = 1, batch = 0, head = 0, row = 0;
  /// The offset, in elements, of matrix n's first row.
  TX_HOST_DEVICE int64_t matrix(int64_t n) const { return (n / heads) * batch + (n % heads) * head; }
};
/// The rows of every operand of the attention kernels: the forward reads q, k, v and writes o; the
/// backward reads q, k, v, o, dout and writes dq, dk, dv. Outputs must not overlap themselves.
struct AttentionLayout {
  AttnRows q, k, v, o, dout, dq, dk, dv;
};

/// o = softmax(scale q k^T [+ mask]) v, lse = the row logsumexp of the visible scale q k^T. Tk == 0: o = 0,
/// lse = -inf (the empty sum). Nothing is launched when N * Tq == 0.
int launch_attention_forward(Dt t, const void* q, const void* k, const void* v, const AttentionLayout& L, int64_t N,
                             int64_t Tq, int64_t Tk, int64_t D, bool causal, double scale, void* o, float* lse,
                             void* stream);
/// dq, dk, dv of the forward above from its o, lse and the cotangent dout; `delta`: N * Tq floats of scratch
/// (receives sum_d dout * o per row). Tk == 0: dq = 0; Tq == 0: dk = dv = 0.
int launch_attention_backward(Dt t, const void* q, const void* k, const void* v, const void* o, const float* lse,
                              const void* dout, const AttentionLayout& L, int64_t N, int64_t Tq, int64_t Tk, int64_t D,
                              bool causal, double scale, void* dq, void* dk, void* dv, float* delta, void* stream);
/// delta[n Tq + i] = sum_d dout[n, i, d] o[n, i, d] (the backward's first step), f32; o and dout laid out as
/// L.o and L.dout.
int launch_attention_delta(Dt t, const void* o, const void* dout, const AttentionLayout& L, int64_t N, int64_t Tq,
                           int64_t D, float* delta, void* stream);

// The same two operations on tensor cores (attention_mma.cu: mma.sync m16n8k16 with f32 accumulation, P and
// dS rounded to t for their products as FlashAttention does): same arguments and results up to rounding.
/// Whether the tensor-core kernels take these operands: t bf16 or f16, D 64 or 128, scale > 0 (the forward
/// takes the row max before scaling, as FA2), every pointer 16-byte aligned and every stride of `rows` a
/// multiple of 8 elements (so that every row is: cp.async copies 16 bytes).
bool attention_mma_supported(Dt t, int64_t D, double scale, std::initializer_list<const void*> ptrs,
                             std::initializer_list<AttnRows> rows);
/// Both take `narrow`: at head dim 64, 16 rows per warp (queries in the forward and dq, keys in dk / dv)
/// instead of the default 32: bitwise the same o, lse, dq (deterministic), dk and dv (for benchmarks
/// comparing the two). Ignored at head dim 128 (always 16).
int launch_attention_forward_mma(Dt t, const void* q, const void* k, const void* v, const AttentionLayout& L, int64_t N,
                                 int64_t Tq, int64_t Tk, int64_t D, bool causal, double scale, void* o, float* lse,
                                 bool narrow, void* stream);
/// The backward also takes `dq_accum`: nullptr for the deterministic kernels (dq; dk and dv), or N * Tq * D
/// floats of scratch (contiguous, 16-byte aligned) for FA2's fused backward, where the dk / dv kernel adds
/// each tile's dq into it by f32 atomics (5 matrix products per tile instead of 7; dq then depends on the
/// order of the adds: not deterministic) and a last kernel rounds it to dq.
int launch_attention_backward_mma(Dt t, const void* q, const void* k, const void* v, const void* o, const float* lse,
                                  const void* dout, const AttentionLayout& L, int64_t N, int64_t Tq, int64_t Tk,
                                  int64_t D, bool causal, double scale, void* dq, void* dk, void* dv, float* delta,
                                  float* dq_accum, bool narrow, void* stream);

// ---------------------------------------------------------------- max pooling (pool.cu)
/// Geometry of a max pooling over [N, C, H, W] with windows KH x KW, strides SH, SW and padding PH, PW;
/// output [N, C, OH, OW]. Every tensor contiguous.
struct Pool2dParams {
  int64_t N, C, H, W, KH, KW, SH, SW, PH, PW, OH, OW;
};
/// y = the maximum of each window's in-range elements (first NaN, else first maximum in row-major
/// window order), ws[o] = its offset h * W + w in the plane (int32, one per output). f32 / f64.
int launch_max_pool2d(Dt t, const void* x, void* y, int32_t* ws, const Pool2dParams& g, void* stream);
/// dx[n, c, h, w] = sum of dy over the windows whose ws chose (h, w), in increasing output order.
int launch_max_pool2d_backward(Dt t, const void* dy, const int32_t* ws, void* dx, const Pool2dParams& g, void* stream);

// ---------------------------------------------------------------- optimizers (optim.cu)
/// Up to kMaxTensors tensors updated by one launch (passed by value as a kernel parameter).
constexpr int kMaxTensors = 24;
struct TensorChunk {
  int count = 0;
  void* p[kMaxTensors] = {};
  const void* g[kMaxTensors] = {};
  void* m[kMaxTensors] = {};  ///< Adam m / SGD momentum buffer (may be null for SGD without momentum)
  void* v[kMaxTensors] = {};  ///< Adam v
  int64_t n[kMaxTensors] = {};
};
/// Up to kMaxTensors tensors whose squares launch_sum_squares sums: tensor t's chunk k of kSquaresChunk
/// elements goes to partial[first[t] + k].
struct SquaresChunk {
  int count = 0;
  const void* x[kMaxTensors] = {};
  int64_t n[kMaxTensors] = {};
  int64_t first[kMaxTensors] = {};
};
/// Elements per partial sum of launch_sum_squares (the CPU's sum_squares chunk, kernels/cpu/optim.cpp).
constexpr int64_t kSquaresChunk = int64_t(1) << 14;
/// partial[first[t] + k] = the sum, in double, of the squares of elements [k kSquaresChunk, (k + 1)
/// kSquaresChunk) of tensor t of the chunk (dtype t: f32 / f64 / f16 / bf16; optim.cuh).
int launch_sum_squares(Dt t, const SquaresChunk& c, double* partial, void* stream);
/// out[0] = the sum of partial[0 .. P) in a fixed order (one block).
int launch_sum_partials(const double* partial, int64_t P, double* out, void* stream);
/// Fused AdamW / Adam over a chunk (formulas of kernels/cpu/optim.h), f32 or f64, with the step's
/// scalars `s` (kernels/update_scalars.h), or, when `s_device` is non-null, the UpdateScalars::size
/// doubles it points to in device memory (read by the kernel: a captured launch replays with new values).
int launch_adam(Dt t, const TensorChunk& c, const UpdateScalars& s, const double* s_device, double b1, double b2,
                double eps, double wd, bool decoupled, void* stream);
/// Fused SGD with momentum over a chunk; scalars as launch_adam.
int launch_sgd(Dt t, const TensorChunk& c, const UpdateScalars& s, const double* s_device, double mu, double wd,
               bool nesterov, void* stream);
/// Writes s.v into dst (UpdateScalars::size doubles in device memory) with a one-block kernel: queued on
/// the stream, the values travel as the launch's arguments (nothing waits, no host buffer to keep).
int launch_set_update_scalars(double* dst, const UpdateScalars& s, void* stream);

}  // namespace titanax::kernels::cuda
