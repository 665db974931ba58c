// CUDA kernels of the ops, at the Tensor level: the counterpart of kernels/cpu/*.h, called by the ops'
// cuda() methods (ops/*.cpp). Each computes what its CPU twin computes (same formulas, row statistics
// and sums accumulated in double), on tensors that live on one CUDA device, queued on that device's
// current stream (cuda_rt::current_stream). Outputs are allocated by the caller with the documented
// shape (contiguous unless stated). dtypes: floating kernels take f32 / f64; integer index / label
// tensors i32 / i64; anything else throws DTypeError. CUDA failures throw DeviceError (call, file, line,
// CUDA's error string).
//
// A build without CUDA links ops/no_cuda.cpp instead, whose versions throw DeviceError, so the ops call
// these without #ifdefs (and are never reached there: no tensor can live on a CUDA device).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"
#include "kernels/cpu/conv.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/nn.h"
#include "kernels/cpu/reduce.h"
#include "kernels/cuda/launch.h"
#include "kernels/update_scalars.h"

namespace titanax::kernels::cuda {

using cpu::BinaryOp;
using cpu::LossReduction;
using cpu::ReduceOp;
using cpu::UnaryOp;

// ------------------------------------------------------------------------------------ elementwise
/// dst = src converted to dst's dtype; same shape, any strides (both on the same device). f32, f64, f16,
/// bf16, i32, i64, u8, bool; 16-bit floats convert through f32 with round-to-nearest-even (the CPU's rule).
/// The other kernels below take f16 / bf16 only where they say so (the ops compute them in f32 otherwise).
/// Those that do compute them in f32 and round the result once, to nearest even (kernels/cuda/half.cuh):
/// bitwise what the CPU gives for widened inputs, rounded.
void copy_cast(const Tensor& src, Tensor& dst);
/// out = op(a, b), a and b broadcast to out.shape(); out may be strided. Arithmetic on f32 / f64 / i32 /
/// i64 / f16 / bf16, comparisons (any of those plus u8 / bool) write bool. Contiguous same-shape f32, f16
/// and bf16 operands take a 16-byte vector path. Throws DTypeError for arithmetic on u8 / bool.
void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out);
/// out = op(x) (f32 / f64 / f16 / bf16; neg, abs, square, sign, relu also i32 / i64). Throws DTypeError
/// otherwise.
void unary(UnaryOp op, const Tensor& x, Tensor& out);
/// out = min(max(x, lo), hi) (f32 / f64 / f16 / bf16 / i32 / i64).
void clamp(const Tensor& x, double lo, double hi, Tensor& out);
/// out = cond ? a : b, all broadcast to out.shape(); cond is bool; a, b, out of any one dtype.
void where(const Tensor& cond, const Tensor& a, const Tensor& b, Tensor& out);
/// The elementwise kernels' iteration layout over `shape` (kernels/cuda/elementwise.cuh): operand k's
/// strides are strides[k], operand 0 the output's, the inputs' broadcast to `shape`
/// (cpu::broadcast_strides). Throws ShapeError when shape has more than kMaxDims axes.
Layout make_layout(const Shape& shape, std::initializer_list<Shape> strides);

// ------------------------------------------------------------------------------------ reductions
/// The kept and the reduced axes of x (sizes and strides, in order) for the reduction kernels
/// (kernels/cuda/reduce.cuh). Throws ShapeError when x has more than kMaxDims axes.
ReduceLayout reduce_layout(const Tensor& x, const std::vector<bool>& reduced);
/// How launch_reduce covers layout L (kernels/cuda/reduce.cuh): column tiles when the kept innermost axis
/// is the contiguous one and the reduced one is not, else a block per output (fewer than 2048 outputs of
/// at least 1024 elements) or a warp per output; each output's elements split into chunks of at least
/// 16 per thread until about 1024 blocks' worth of items exist (one split when the outputs alone give
/// that). A function of the sizes and strides only, so a reduction repeats bitwise. Throws nothing.
ReducePlan reduce_plan(const ReduceLayout& L);
/// out = op over the axes of x marked in `reduced` (out: contiguous, x's rank with reduced axes of size 1).
/// f32/f64; sums accumulate in double; max / min propagate NaN.
void reduce(ReduceOp op, const Tensor& x, const std::vector<bool>& reduced, Tensor& out);

/// out (i64, contiguous, x's shape without `axis` or with it as 1) = the first index of the maximum of x
/// along `axis` (as kernels::cpu::argmax). f32, f64, i32, i64.
void argmax(const Tensor& x, int axis, Tensor& out);

// ------------------------------------------------------------------------------------ nn (contiguous inputs)
/// Softmax / log-softmax along the middle axis of x viewed as [outer, n, inner] (see kernels/cpu/nn.h).
void softmax(const Tensor& x, int64_t outer, int64_t n, int64_t inner, bool log, Tensor& y);
/// Fused log-softmax + NLL over logits [R, C] and labels [R]; out as in kernels::cpu::cross_entropy. Logits
/// f32, f64, f16 or bf16: 16-bit logits compute in f32 with an f32 loss (out) and cotangent (ct), and
/// their gradient rounded to their dtype once, bitwise what their f32 copy gives. sum /
/// mean add the row losses deterministically (one block, fixed order). The labels are checked on the
/// device (nothing waits, so the op can be captured into a CUDA graph): a label outside [0, C) that is not
/// ignore_index makes its row's loss NaN and is thrown as a ValueError at the host's next wait for the
/// device (a loss read, cuda_rt::synchronize), as the CPU would have thrown at once.
void cross_entropy(const Tensor& logits, const Tensor& labels, int64_t ignore_index, LossReduction red, Tensor& out);
/// dlogits [R, C] = (softmax(logits) - onehot(labels)) * scale_r; ct on the device (see the CPU twin).
/// Labels checked as cross_entropy does (a bad label's row is NaN).
void cross_entropy_backward(const Tensor& logits, const Tensor& labels, const Tensor& ct, int64_t ignore_index,
                            LossReduction red, Tensor& dlogits);
/// cross_entropy and cross_entropy_backward at once (the JIT's fused node when the cotangent does not
/// depend on the loss): each row of the logits is read for its statistics once, then for its gradient;
/// out and dlogits bitwise what the two functions give, labels checked once.
void cross_entropy_fused(const Tensor& logits, const Tensor& labels, const Tensor& ct, int64_t ignore_index,
                         LossReduction red, Tensor& out, Tensor& dlogits);
/// y [R, D] = (x - mean) * rstd * w + b over the last axis; w, b may be nullptr.
void layer_norm(const Tensor& x, const Tensor* w, const Tensor* b, double eps, Tensor& y);
/// dx (plus `residual`, contiguous like x, when not nullptr: dx rounded, then the add, bitwise a separate
/// add's result), and dw, db when not nullptr (each column summed over rows in row order: deterministic).
void layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor* w, double eps, Tensor& dx, Tensor* dw,
                         Tensor* db, const Tensor* residual = nullptr);
/// The vocabulary-parallel cross-entropy's shard kernels (as kernels::cpu::ce_shard_*; contiguous logits
/// [R, C] f32 / f64 on the device, labels [R] i32 / i64, gmax f64 [R], partial / stats f64 [2, R] on the
/// device): the row maxima; with the global maxima, the sums of exp(x - gmax) and the label's logit where
/// it falls in columns lo .. lo + C - 1; the gradient from the all-reduced stats (labels checked by the
/// caller, `count` the labels that are not ignore_index). Throw DTypeError for other dtypes.
void ce_shard_max(const Tensor& logits, Tensor& gmax);
void ce_shard_partials(const Tensor& logits, const Tensor& labels, int64_t lo, const Tensor& gmax, Tensor& partial);
void ce_shard_backward(const Tensor& logits, const Tensor& labels, int64_t lo, const Tensor& stats, const Tensor& ct,
                       int64_t ignore_index, LossReduction red, int64_t count, Tensor& dlogits);
/// Fills contiguous `out` (f32 / f64 / f16 / bf16) with the samples kernels::cpu::fill_uniform /
/// fill_normal draw for `key` (kernels/cuda/random.cuh): uniform bitwise the CPU's, normal within the
/// device libm's last bit. Throws DTypeError for other dtypes.
void fill_random(bool normal, RngKey key, Tensor& out);
/// out [..., classes] (contiguous, any dtype) = the one-hot rows of labels (i32 / i64, contiguous). A label
/// outside [0, classes) is a ValueError at the host's next wait for the device (its row stays zeros).
void one_hot(const Tensor& labels, int64_t classes, Tensor& out);
/// Inverted dropout of contiguous x with the mask the CPU draws for `key` (kernels/cpu/nn.h): bitwise
/// the CPU's result. f32 / f64 / f16 / bf16.
void dropout(const Tensor& x, double p, RngKey key, Tensor& out);
/// out[a, k, b] = x[a, idx[k], b], x viewed as [A, n, B] (f32 / f64; idx i32 / i64, contiguous). The
/// indices are checked on the device, without waiting for it (so the op can be captured into a CUDA
/// graph): one outside [0, n) makes its output NaN and is thrown at the host's next wait for the device
/// as the CPU's ValueError (kernels/cpu/nn.h throw_index_out_of_range), naming `embedding ? "embedding"
/// : "take"`.
void gather(const Tensor& x, const Tensor& idx, int64_t A, int64_t n, int64_t B, bool embedding, Tensor& out);
/// out[a, r, b] = sum over k with idx[k] == r, in increasing k, of g[a, k, b] (the embedding backward).
/// Deterministic without atomics and without the host: a stable radix sort of the rows on the device
/// (CUB), then one thread per output element sums its row's run in index order. Indices are checked as
/// in gather (one out of range is left out and thrown at the next wait, naming take_backward or
/// embedding_backward).
void scatter_add(const Tensor& g, const Tensor& idx, int64_t A, int64_t n, int64_t B, bool embedding, Tensor& out);

// ------------------------------------------------------------------------------------ attention
// FlashAttention-2 style kernels (kernels/cuda/attention.cu; Dao 2023, "FlashAttention-2: Faster Attention
// with Better Parallelism and Work Partitioning", arXiv 2307.08691): the keys stream through shared memory in
// tiles with an online softmax, the backward recomputes the probabilities from lse, so no T x T matrix is
// stored; f32 accumulation, deterministic (fixed summation order, no atomics). The caller guarantees every
// tensor on one CUDA device, with consistent shapes, and the outputs allocated with the shapes and dtypes
// below (they need not be zeroed: every output element is written). The inputs are read in place where
// attention_rows() takes them (q, k, v views of one projection, packed or cut; the cotangent of a permuted
// o) and copied contiguous otherwise; the outputs are written in place in any layout attention_rows()
// takes without a broadcast axis (ValueError otherwise; contiguous is one). Throws ShapeError when
// D > 128 and DTypeError for dtypes other than f32, bf16, f16 (f64 has no CUDA kernel) or mixed dtypes.
// Any rank >= 2 is taken: q [..., Tq, D] with the leading axes (equal for q, k, v) flattened to N, as the
// CPU twin (kernels/cpu/attention.h); lse is then [..., Tq]. Empty problems: N == 0 or Tq == 0 writes
// nothing (the outputs are empty) except dk = dv = 0 when Tq == 0; Tk == 0 (no key visible: the empty
// sum) gives o = 0, lse = -inf, dq = 0.
/// Where the kernels find the rows of an attention operand t [..., T, D] without a copy: its last axis
/// contiguous (stride 1) and its leading axes, adjacent ones merged where one steps over the other, at most
/// two strided axes [batch, heads] (n = b * heads + h: AttnRows, kernels/cuda/launch.h); nullopt otherwise
/// (then the kernels copy it contiguous). A [B, heads, T, D] permute of a [B, T, heads, D] tensor takes
/// {heads, T * heads * D, D, heads * D}; an axis broadcast by expand (stride 0) is read in place too.
std::optional<AttnRows> attention_rows(const Tensor& t);
/// Attention forward over q [N, Tq, D], k [N, Tk, D], v [N, Tk, D] (f32, bf16 or f16, all one
/// dtype): o [N, Tq, D] (q's dtype) = softmax(scale * q k^T [+ causal mask]) v, lse [N, Tq] (f32) = the row
/// logsumexp of scale * q k^T over the visible keys. causal: key j is visible to query i iff j <= i
/// (top-left aligned, PyTorch's is_causal).
void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale, Tensor& o,
                       Tensor& lse);
/// dq, dk, dv (q's dtype, shapes of q, k, v) of the above given o, lse from the forward and the cotangent
/// dout [N, Tq, D].
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                        const Tensor& dout, bool causal, double scale, Tensor& dq, Tensor& dk, Tensor& dv);
/// Whether bf16 / f16 attention with head dim 64 or 128 (16-byte aligned operands) runs on tensor cores
/// (kernels/cuda/attention_mma.cu: mma.sync with f32 accumulation, P and dS rounded to the inputs' dtype
/// for their products, as FlashAttention-2) rather than on the FP32 kernels. On by default;
/// TITANAX_ATTENTION_MMA=0 in the environment turns it off at start-up.
bool attention_tensor_cores();
void set_attention_tensor_cores(bool on);
/// Whether the tensor-core attention backward is deterministic (the default): dq in its own kernel, every
/// sum in a fixed order, so a run repeats bitwise (engine/engine.h promises it). Off, it takes
/// FlashAttention-2's fused backward: the dk / dv kernel also computes each tile's dq and adds it into an
/// f32 buffer by atomics (5 matrix products per tile instead of 7, N * Tq * D floats of scratch), so dq
/// varies in its last bits with the order of the adds: PyTorch's default (torch.use_deterministic_algorithms
/// off). TITANAX_ATTENTION_DETERMINISTIC=0 in the environment turns it off at start-up. The FP32 kernels
/// are always deterministic.
bool attention_deterministic();
void set_attention_deterministic(bool on);
/// Rows per warp of the tensor-core attention kernels at head dim 64 (queries in the forward and dq, keys
/// in dk / dv): 32 (the default: 128-row blocks, every fragment read from shared memory feeding two MMAs)
/// or 16 (64-row blocks, fewer registers: more blocks per SM). Bitwise the same o, lse and deterministic
/// gradients; bench/kernels times both. Head dim 128 always uses 16. Throws ValueError for any other
/// count.
int attention_rows_per_warp();
void set_attention_rows_per_warp(int rows);

// ------------------------------------------------------------------------------------ GEMM (cuBLASLt)
/// c [batch..., M, N] = a [batch_a..., M, K] @ b [batch_b..., K, N] with broadcast batch axes (c is
/// allocated contiguous by the caller). f32 (TF32 tensor cores when `allow_tf32`, else full FP32), f64, or
/// bf16 / f16 (tensor cores, f32 accumulation, the result rounded to the operands' dtype).
/// One cuBLASLt call as matmul_call plans it (views read in place where their layout allows); where
/// cuBLASLt has no algorithm for that layout, on fresh contiguous copies of a and b instead. Throws
/// DeviceError when it has none for those either.
void matmul(const Tensor& a, const Tensor& b, Tensor& c, bool allow_tf32);
/// How matmul runs c [batch..., M, N] = a @ b (K > 0) as one cuBLASLt call, in cuBLASLt's column-major
/// terms: C (m x n, leading dimension ldc, stride sc between the batch's matrices) = op_ta(A) op_tb(B)
/// over `batch` matrices, A (m x k after its op) stored column-major with lda and stride sa from
/// A.raw_data(), B likewise. Row-major C = A B is column-major C^T = B^T A^T, so A is matmul's b and B its
/// a. Operands are read where they are when their layout allows: a transposed matrix (a permute of the
/// last two axes: a weight gradient's dY^T) by its op flag, a column slice by its leading dimension,
/// batches one uniform stride apart; a matrix b shared by every batch (a weight) with a's batches stacked
/// row blocks folds the batch into m (one GEMM, as the CPU folds it). Anything else is a contiguous copy.
/// Host-only (no CUDA call): tests check it against the CPU's matmul with a reference of the column-major
/// semantics (tests/emulated/test_gemm_plan_emulated.cpp).
struct GemmCall {
  bool ta = false, tb = false;
  int64_t m = 0, n = 0, k = 0;
  Tensor A, B;
  int64_t lda = 0, sa = 0, ldb = 0, sb = 0, ldc = 0, sc = 0, batch = 1;
};
GemmCall matmul_call(const Tensor& a, const Tensor& b, const Shape& c);
/// y [M, out] = x [M, in] @ w[out, in]^T (+ bias [out] when not nullptr). f32 / f64 / bf16 / f16 as matmul.
void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, bool allow_tf32);
/// Whether f32 GEMMs may use TF32 tensor cores (default false: results then match the CPU to ~1e-6).
/// Set by the user or the precision policy; read by the matmul / linear ops.
bool allow_tf32();
void set_allow_tf32(bool on);

// ------------------------------------------------------------------------------------ convolution, pooling
// NCHW, contiguous operands and outputs (the ops guarantee it), f32 / f64, the geometry of
// kernels/cpu/conv.h. Convolutions run through cuDNN (kernels/cuda/conv.cpp): one handle per device,
// the fastest algorithm cuDNN's heuristics rank that is deterministic (cached per geometry), the
// workspace from the caching allocator; f32 in full FP32 (CUDNN_FMA_MATH) unless allow_tf32(). Bias
// sums use the reduction kernel (sums in double, as the CPU). cuDNN failures throw DeviceError with
// cuDNN's error string.
/// y [N, O, OH, OW] = conv2d(x, w) + b (b may be nullptr); cross-correlation as PyTorch's conv2d.
void conv2d_forward(const Tensor& x, const Tensor& w, const Tensor* b, const cpu::Conv2dGeom& g, Tensor& y);
/// dx [N, C, H, W]: the adjoint of conv2d in x applied to dy.
void conv2d_backward_input(const Tensor& dy, const Tensor& w, const cpu::Conv2dGeom& g, Tensor& dx);
/// dw [O, C, KH, KW] and db [O] (may be nullptr) of conv2d for dy.
void conv2d_backward_weight(const Tensor& dy, const Tensor& x, const cpu::Conv2dGeom& g, Tensor& dw, Tensor* db);
/// Bytes of the CUDA max-pool workspace: one int32 per output element (the winner's offset in its plane).
int64_t max_pool2d_workspace_bytes(const cpu::Pool2dGeom& g);
/// y [N, C, OH, OW] = max over windows (kernels/cpu/conv.h semantics), ws: u8 [workspace bytes].
void max_pool2d_forward(const Tensor& x, const cpu::Pool2dGeom& g, Tensor& y, Tensor& ws);
/// dx [N, C, H, W] = dy routed to each window's maximum (sums where windows overlap), deterministic.
void max_pool2d_backward(const Tensor& dy, const Tensor& ws, const cpu::Pool2dGeom& g, Tensor& dx);

// ------------------------------------------------------------------------------------ optimizers
/// Fused multi-tensor AdamW / Adam (formulas of kernels/cpu/optim.h) over parameter lists p, g, m, v
/// (equal lengths; tensor i of each list has the same numel, dtype f32 or f64, contiguous, on one device),
/// in place: one kernel launch per 24 tensors. The step's scalars (kernels/update_scalars.h) are `s`, or,
/// when `device_scalars` is given (f64 [UpdateScalars::size] on the parameters' device), read by the
/// kernels from there: what a captured CUDA graph needs, as the values change at every step.
void adam_update(const std::vector<Tensor>& p, const std::vector<Tensor>& g, const std::vector<Tensor>& m,
                 const std::vector<Tensor>& v, const UpdateScalars& s, double b1, double b2, double eps, double wd,
                 bool decoupled, const Tensor* device_scalars = nullptr);
/// out (a 0-d f64 tensor on the tensors' device) = the sum over the tensors (contiguous, on one CUDA device;
/// f32 / f64 / f16 / bf16, mixed allowed) of the sums of their squared elements, in double: a gradient
/// norm's squares in two launches per 24 tensors and one more, whatever their number (kernels/cuda/
/// optim.cuh). Partial sums of 16384 elements (the CPU's chunks) combined in a fixed order: repeats
/// bitwise. Throws DTypeError for other dtypes.
void sum_squares(const std::vector<Tensor>& xs, Tensor& out);
/// Fused multi-tensor SGD with momentum (buf entries may be undefined when mu == 0); scalars as adam_update.
void sgd_update(const std::vector<Tensor>& p, const std::vector<Tensor>& g, const std::vector<Tensor>& buf,
                const UpdateScalars& s, double mu, double wd, bool nesterov, const Tensor* device_scalars = nullptr);
/// Writes s into dst (f64 [UpdateScalars::size], contiguous, on a GPU) with a kernel launch on the current
/// stream that carries the values: nothing waits. Throws ValueError for another dst.
void set_update_scalars(Tensor& dst, const UpdateScalars& s);

}  // namespace titanax::kernels::cuda
