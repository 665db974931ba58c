// CPU kernels of the neural-network ops (ops/nn.cpp): softmax / log-softmax, fused cross-entropy,
// layer normalisation, dropout, and gather / scatter-add along an axis (take, embedding).
//
// Conventions (internal to kernels/cpu, called by the ops after their shape checks):
//   * Floating tensors are f32 or f64 (anything else: DTypeError through unsupported_dtype). Integer
//     label / index tensors are i32 or i64.
//   * Every input must be contiguous (the ops call .contiguous() first); outputs are contiguous tensors
//     allocated by the caller with the documented shape.
//   * Reductions inside a row accumulate in double; all results are independent of the thread count
//     (threads only ever split rows, columns or disjoint output rows).
//   * Errors are raised before any parallel region: kernels never throw from inside OpenMP.
#pragma once

#include <cstdint>
#include <string>

#include "core/rng.h"
#include "core/tensor.h"

namespace titanax::kernels::cpu {

// ------------------------------------------------------------------------------------ softmax
/// y = softmax(x) (or log_softmax when `log`) along the middle axis of x viewed as [outer, n, inner]
/// (x, y contiguous, same shape and dtype). Stable: the maximum of each slice is subtracted before exp.
/// inner == 1 (the last axis) takes a row fast path; other axes work on inner-contiguous columns.
void softmax(const Tensor& x, int64_t outer, int64_t n, int64_t inner, bool log, Tensor& y);

// ------------------------------------------------------------------------------------ cross-entropy
enum class LossReduction { mean, sum, none };

/// The ValueError of `what` (e.g. "cross_entropy") for `label`, outside [0, classes) and not
/// ignore_index, at `position` (as the user sees it, e.g. "[1, 3]" or "7 (flat)"): thrown by the CPU
/// check below and by the CUDA kernels' device-side check (kernels/cuda/check.h report_slot).
[[noreturn]] void throw_label_out_of_range(const std::string& what, int64_t classes, int64_t ignore_index, int64_t label,
                                           const std::string& position);

/// Checks integer labels [R] (i32 / i64, contiguous) against C classes: every label is in [0, C) or equals
/// ignore_index. Returns the number of non-ignored labels. Throws ValueError naming the first bad label
/// and its position (row-major index into `labels_shape`, the user's labels shape).
int64_t check_labels(const Tensor& labels, int64_t classes, int64_t ignore_index, const Shape& labels_shape,
                     const char* what);

/// Fused log-softmax + NLL over logits [R, C]: loss_r = logsumexp(logits[r]) - logits[r, label_r] (0 for
/// ignored rows), in one pass per row (no log-softmax tensor). out: [R] for none, 0-d for sum, and for
/// mean the sum divided by `count` (the number of non-ignored labels; 0 when count == 0). Row losses are
/// summed in row order, so sum / mean do not depend on the thread count. Labels must be checked first.
void cross_entropy(const Tensor& logits, const Tensor& labels, int64_t ignore_index, LossReduction red,
                   int64_t count, Tensor& out);

/// dlogits [R, C] = (softmax(logits) - onehot(labels)) * scale_r, one pass per row, with scale_r = ct[r]
/// for none (ct: [R]), ct / count for mean and ct for sum (ct: one element); 0 on ignored rows.
void cross_entropy_backward(const Tensor& logits, const Tensor& labels, const Tensor& ct, int64_t ignore_index,
                            LossReduction red, int64_t count, Tensor& dlogits);

/// cross_entropy and cross_entropy_backward at once: each row's max and sum of exponentials computed once
/// for both; out and dlogits bitwise what the two functions give.
void cross_entropy_fused(const Tensor& logits, const Tensor& labels, const Tensor& ct, int64_t ignore_index,
                         LossReduction red, int64_t count, Tensor& out, Tensor& dlogits);

// ------------------------------------------------------------------------------------ vocab-parallel CE
// Megatron-LM's vocabulary-parallel cross-entropy (parallel/tp.h): logits [R, C] hold global classes
// [lo, lo + C) of this rank; labels [R] are global ids (checked first); stats are f64.
/// rowmax[r] = max_j logits[r, j] (rowmax: f64 [R]).
void ce_shard_max(const Tensor& logits, Tensor& rowmax);
/// With the global row maxima gmax [R] (f64): partial[0, r] = sum_j exp(logits[r, j] - gmax[r]) (exp in the
/// logits' dtype, summed in double, as cross_entropy) and partial[1, r] = logits[r, label_r - lo] when
/// lo <= label_r < lo + C, else 0 (partial: f64 [2, R]).
void ce_shard_partials(const Tensor& logits, const Tensor& labels, int64_t lo, const Tensor& gmax, Tensor& partial);
/// dlogits [R, C] = (exp(logits - gmax_r) / sumexp_r - [lo + j == label_r]) * scale_r, scale_r as in
/// cross_entropy_backward (ct, reduction, count); 0 on ignored rows. stats: f64 [2, R] = (gmax, sumexp).
void ce_shard_backward(const Tensor& logits, const Tensor& labels, int64_t lo, const Tensor& stats, const Tensor& ct,
                       int64_t ignore_index, LossReduction red, int64_t count, Tensor& dlogits);

// ------------------------------------------------------------------------------------ layer norm
/// y [R, D] = (x - mean_r) * rstd_r * w + b with rstd_r = 1 / sqrt(var_r + eps) (biased variance, two
/// passes in double). w, b: [D] or nullptr (then 1 / 0).
void layer_norm(const Tensor& x, const Tensor* w, const Tensor* b, double eps, Tensor& y);

/// The layer-norm backward (PyTorch's native_layer_norm_backward; llm.c layernorm_backward), with mean and
/// rstd recomputed per row: xhat = (x - mean) * rstd, dxhat = dy * w,
///   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
///   dw = sum_r dy * xhat,  db = sum_r dy.
/// dx is parallel over rows; dw and db are parallel over columns (each column summed in row order, so the
/// result is bitwise independent of the thread count). dw / db may be nullptr (not wanted). `residual`
/// (contiguous like x), when not nullptr, is added to dx as it is stored, after dx is rounded to its
/// dtype: bitwise dx followed by a separate add (the residual stream's two gradients, summed where the
/// JIT fuses the add into this op).
void layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor* w, double eps, Tensor& dx, Tensor* dw,
                         Tensor* db, const Tensor* residual = nullptr);

// ------------------------------------------------------------------------------------ dropout
/// out[i] = uniform_at(key, i) >= p ? x[i] * T(1 / (1 - p)) : 0, i the row-major element index.
/// (One Philox block serves four consecutive elements, exactly as uniform_at indexes them.)
void dropout(const Tensor& x, double p, RngKey key, Tensor& out);

// ------------------------------------------------------------------------------------ gather / scatter
/// The ValueError of op `what` ("take", "embedding", "take_backward", "embedding_backward", possibly
/// followed by where it was checked) for `index`, outside [0, n), at `position` (as the user sees it,
/// e.g. "[1, 3]" or "7 (flat)"): thrown by check_indices and by the CUDA kernels' device-side check.
[[noreturn]] void throw_index_out_of_range(const std::string& what, int64_t n, int64_t index, const std::string& position);

/// Checks integer indices (i32 / i64, contiguous) against [0, n). Throws ValueError naming the first
/// index out of range and its position in `idx_shape`; `what` names the op ("embedding", "take").
void check_indices(const Tensor& idx, int64_t n, const Shape& idx_shape, const char* what);

/// out[a, k, b] = x[a, idx[k], b] with x viewed as [A, n, B] and out as [A, K, B] (K = idx.numel()).
void gather(const Tensor& x, const Tensor& idx, int64_t A, int64_t n, int64_t B, Tensor& out);

/// out[a, r, b] = sum over k with idx[k] == r, in increasing k, of g[a, k, b]: the adjoint of gather.
/// g: [A, K, B], out: [A, n, B] (fully written, zero for rows no index hits). Deterministic: indices are
/// bucketed by row with a counting sort, then threads split disjoint output rows; each row's sum runs
/// in index order, so results are bitwise identical run to run and for any thread count.
void scatter_add(const Tensor& g, const Tensor& idx, int64_t A, int64_t n, int64_t B, Tensor& out);

}  // namespace titanax::kernels::cpu
