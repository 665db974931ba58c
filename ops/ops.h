// The public operations. Each is an Op (core/op.h) with a CPU kernel (kernels/cpu), a shape and dtype
// rule and a vjp, so every function here is differentiable unless it says otherwise.
//
// Conventions: shapes broadcast like NumPy; axes may be negative; floating ops accept f32 and f64
// (f16 / bf16 tensors are cast with astype() first); integer label / index inputs accept i32 and i64.
// Errors: ShapeError for incompatible shapes, DTypeError for unsupported dtypes, DeviceError for inputs
// on different devices; each names the op, what it expected and what it found.
#pragma once

#include <optional>
#include <vector>

#include <array>

#include "core/op.h"
#include "core/rng.h"
#include "core/tensor.h"

namespace titanax {

// ------------------------------------------------------------------------------------ elementwise
/// out = a + b (broadcasting). f32/f64 (i32/i64 allowed, not differentiable).
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
/// Elementwise max / min; the gradient goes to `a` where a >= b (resp. a <= b), else to `b`.
Tensor maximum(const Tensor& a, const Tensor& b);
Tensor minimum(const Tensor& a, const Tensor& b);
/// a ** b for a > 0 (or integer-valued b).
Tensor pow(const Tensor& a, const Tensor& b);
/// Comparisons give bool tensors and are not differentiable.
Tensor eq(const Tensor& a, const Tensor& b);
Tensor ne(const Tensor& a, const Tensor& b);
Tensor lt(const Tensor& a, const Tensor& b);
Tensor le(const Tensor& a, const Tensor& b);
Tensor gt(const Tensor& a, const Tensor& b);
Tensor ge(const Tensor& a, const Tensor& b);
/// cond ? a : b elementwise (cond: bool, broadcasting over all three).
Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b);

Tensor neg(const Tensor& x);
Tensor exp(const Tensor& x);
Tensor log(const Tensor& x);
Tensor sqrt(const Tensor& x);
Tensor rsqrt(const Tensor& x);
Tensor tanh(const Tensor& x);
Tensor sigmoid(const Tensor& x);
Tensor abs(const Tensor& x);
Tensor square(const Tensor& x);
Tensor reciprocal(const Tensor& x);
Tensor relu(const Tensor& x);
/// GELU. approximate = true: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (GPT-2, Hendrycks &
/// Gimpel 2016); false: x * Phi(x) with the exact erf.
Tensor gelu(const Tensor& x, bool approximate = true);
/// Clamps to [lo, hi]; gradient 1 inside, 0 outside.
Tensor clamp(const Tensor& x, double lo, double hi);
/// dy * (y > 0): the ReLU backward, given the ReLU output y.
Tensor relu_backward(const Tensor& dy, const Tensor& y);
/// dy * gelu'(x).
Tensor gelu_backward(const Tensor& dy, const Tensor& x, bool approximate = true);

/// 0-d tensor holding v with like's dtype and device.
Tensor scalar_like(double v, const Tensor& like);
/// a + b where both are defined, else the defined one (undefined when neither is): a sum of optional
/// terms, as derivative rules accumulate them (an undefined tensor is a zero).
Tensor sum_defined(const Tensor& a, const Tensor& b);

// Operators (scalar operands become 0-d tensors of the tensor's dtype).
Tensor operator+(const Tensor& a, const Tensor& b);
Tensor operator-(const Tensor& a, const Tensor& b);
Tensor operator*(const Tensor& a, const Tensor& b);
Tensor operator/(const Tensor& a, const Tensor& b);
Tensor operator-(const Tensor& a);
Tensor operator+(const Tensor& a, double b);
Tensor operator-(const Tensor& a, double b);
Tensor operator*(const Tensor& a, double b);
Tensor operator/(const Tensor& a, double b);
Tensor operator+(double a, const Tensor& b);
Tensor operator-(double a, const Tensor& b);
Tensor operator*(double a, const Tensor& b);
Tensor operator/(double a, const Tensor& b);

// ------------------------------------------------------------------------------------ reductions
/// Sum over `axes` (all axes when empty). keepdims keeps reduced axes as size 1. Accumulates in f64.
Tensor sum(const Tensor& x, std::vector<int> axes = {}, bool keepdims = false);
Tensor mean(const Tensor& x, std::vector<int> axes = {}, bool keepdims = false);
/// The sum of the squares of every element of every tensor in xs (f32 / f64 / f16 / bf16, on one device),
/// accumulated in double: a 0-d f64 tensor on their device (0 for an empty list). The squares of a
/// gradient norm in one op: on CUDA a multi-tensor kernel (a few launches for any number of tensors), on
/// the CPU kernels::cpu::sum_squares per tensor, summed in order. Differentiable (2 x ct).
Tensor sum_squares(const TensorList& xs);
/// Max / min over axes; the gradient is split evenly among tied maxima.
Tensor max(const Tensor& x, std::vector<int> axes = {}, bool keepdims = false);
Tensor min(const Tensor& x, std::vector<int> axes = {}, bool keepdims = false);
/// log(sum(exp(x))) over axes, computed stably (max subtracted).
Tensor logsumexp(const Tensor& x, std::vector<int> axes, bool keepdims = false);
/// Index of the largest element along `axis` (first on ties), as i64. Not differentiable.
Tensor argmax(const Tensor& x, int axis, bool keepdims = false);
/// Sums `x` down to `shape` (the reverse of broadcasting): used by vjps of broadcasting ops.
Tensor sum_to(const Tensor& x, const Shape& shape);

// ------------------------------------------------------------------------------------ shapes
/// Free functions for the Tensor view methods (same semantics).
Tensor reshape(const Tensor& x, const Shape& shape);
Tensor permute(const Tensor& x, const std::vector<int>& axes);
Tensor transpose(const Tensor& x, int a, int b);
Tensor expand(const Tensor& x, const Shape& shape);
Tensor slice(const Tensor& x, int axis, int64_t start, int64_t stop, int64_t step = 1);
/// Joins tensors along an existing axis; all other dimensions must match.
Tensor concat(const TensorList& xs, int axis);
/// torch.unbind: the x.shape[axis] slices of x along `axis`, each without that axis, as views of x's
/// memory (no copy), in one op. Differentiable: the gradient is one concat of the cotangents (zeros for
/// unused slices), where slicing each index apart would scatter each cotangent into a zeroed copy of x
/// and sum the copies (a GPT block's q, k, v cut from one projection: one pass instead of seven). An
/// x.shape[axis] of 0 gives no tensors. Throws ShapeError for a 0-d x or an axis out of range.
TensorList unbind(const Tensor& x, int axis = 0);
/// Pads with zeros: `before` / `after` elements along `axis` (used by the vjp of slice).
Tensor pad(const Tensor& x, int axis, int64_t before, int64_t after);
/// out[..., labels[i], ...] = 1: f32 one-hot of integer labels with `classes` entries (new last axis).
Tensor one_hot(const Tensor& labels, int64_t classes, DType dtype = DType::f32);
/// Gathers x[..., idx[...], ...] along `axis`: out.shape = x.shape with axis replaced by idx.shape.
Tensor take(const Tensor& x, const Tensor& idx, int axis);

// ------------------------------------------------------------------------------------ linear algebra
/// Matrix product with NumPy semantics: [.., m, k] @ [.., k, n] -> [.., m, n], batch axes broadcast;
/// rank-1 operands are promoted (and the added axis removed). f32 through oneDNN's sgemm; f64 by Eigen.
Tensor matmul(const Tensor& a, const Tensor& b);
/// y = x @ w^T + b with w: [out, in] (PyTorch's layout), x: [..., in], b: [out] or undefined.
Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b = {});

// ------------------------------------------------------------------------------------ neural network
/// softmax / log-softmax along `axis`, computed with the max subtracted.
Tensor softmax(const Tensor& x, int axis = -1);
Tensor log_softmax(const Tensor& x, int axis = -1);

enum class Reduction { mean, sum, none };
/// Cross-entropy of logits [N, C] (or [..., C]) against integer labels [N] (or [...]), fused with the
/// log-softmax. Labels equal to ignore_index contribute nothing; `mean` divides by the number of
/// non-ignored labels. A label outside [0, C) throws ValueError naming it. Logits f32, f64, f16 or bf16;
/// f16 / bf16 logits compute in f32 and give an f32 loss (PyTorch returns their dtype; llm.c's and
/// FlashAttention's fused kernels return f32, as here), bitwise the loss of their f32 copy, and their
/// gradient rounded to their dtype once. So autocast leaves 16-bit logits as they are (no f32 copy of a
/// [tokens, vocabulary] tensor and of its gradient).
Tensor cross_entropy(const Tensor& logits, const Tensor& labels, Reduction reduction = Reduction::mean,
                     int64_t ignore_index = -100);
/// Layer normalisation over the last axis (Ba, Kiros & Hinton 2016): (x - mean) / sqrt(var + eps) * w + b,
/// w and b of shape [x.shape[-1]] (either may be undefined).
Tensor layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps = 1e-5);
/// Scaled dot-product attention (PyTorch's F.scaled_dot_product_attention without a mask tensor or
/// dropout): softmax(scale * q k^T [+ causal mask]) v for q [..., Tq, D], k and v [..., Tk, D] with the
/// same leading axes (e.g. [B, heads, T, head_dim]) -> [..., Tq, D] in q's dtype. is_causal masks key j
/// for query i when j > i (top-left aligned, as PyTorch). scale defaults to 1 / sqrt(D).
/// Computed FlashAttention-2 style (Dao 2023, arXiv 2307.08691; kernels/cpu/attention.h, and the CUDA
/// kernels for f32 / bf16 / f16): tiles with an online softmax, never a [Tq, Tk] matrix; the backward
/// recomputes the probabilities from the saved row logsumexp. Differentiable to any order: the backward
/// op's own vjp recomposes attention from matmul and softmax (PyTorch's math path: the [Tq, Tk] scores
/// in memory, in f32 for 16-bit inputs) and differentiates that. Under autocast its inputs lower to the
/// 16-bit dtype. Throws ShapeError for mismatched shapes, Tk == 0 or D == 0 (and on CUDA, D > 128),
/// DTypeError unless q, k, v share a floating dtype, ValueError for a non-finite scale.
Tensor scaled_dot_product_attention(const Tensor& q, const Tensor& k, const Tensor& v, bool is_causal = false,
                                    std::optional<double> scale = std::nullopt);
/// scaled_dot_product_attention on FlashAttention's packed layout (flash_attn_qkvpacked_func): qkv
/// [..., T, 3, H, D] (q, k, v stacked on the axis of size 3, as a [B, T, 3 * H * D] projection reshaped
/// to [B, T, 3, H, D] holds them) -> o [..., T, H, D] in qkv's dtype, o[..., t, h, :] the attention of
/// head h's queries over head h's keys and values. Its gradient is packed the same way. The same
/// kernels and values as scaled_dot_product_attention(q, k, v) on the [..., H, T, D] parts, but on a GPU
/// neither side is copied: o comes out in the layout the output projection reads (no permute back to
/// [B, T, H * D]) and the gradient in the layout of the qkv projection (no concat of dq, dk, dv).
/// is_causal and scale as there (scale defaults to 1 / sqrt(D)). Throws ShapeError unless qkv is
/// [..., T, 3, H, D] with T, D >= 1 (and on CUDA, D <= 128), DTypeError for a dtype other than f32, f64,
/// bf16 or f16, ValueError for a non-finite scale.
Tensor scaled_dot_product_attention_qkvpacked(const Tensor& qkv, bool is_causal = false,
                                              std::optional<double> scale = std::nullopt);
/// Inverted dropout (Srivastava et al. 2014): zeroes each element with probability p and scales the
/// rest by 1/(1-p). The mask comes from Philox(key) by element index, so it is the same on every device.
/// Identity when !training or p == 0. Throws ValueError unless 0 <= p < 1.
Tensor dropout(const Tensor& x, double p, RngKey key, bool training = true);
/// dropout() with the mask of key fold_in(key, step), `step` (a 0-d i64 CPU tensor, e.g. the optimizer's
/// step counter) read when the op runs: a traced training step (jit) draws a new mask at every replay as
/// the counter moves, and the vjp reuses the forward's. Throws ValueError for another kind of `step`.
Tensor dropout(const Tensor& x, double p, RngKey key, const Tensor& step, bool training = true);
/// Rows of weight [V, D] for integer ids [...] -> [..., D]. An id outside [0, V) throws ValueError.
/// The gradient scatters into weight deterministically (sequentially per row).
Tensor embedding(const Tensor& weight, const Tensor& ids);
/// 2-D convolution (cross-correlation, as PyTorch): x [N, C, H, W], w [O, C, kh, kw], b [O] or
/// undefined; oneDNN on the CPU.
Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor& b = {}, std::array<int64_t, 2> stride = {1, 1},
              std::array<int64_t, 2> padding = {0, 0});
/// Max pooling over [N, C, H, W] windows; stride defaults to the kernel size; padding (at most half the
/// kernel) is never a window's maximum. Each window's gradient goes to its first maximum in row-major
/// window order (the first NaN if any). Differentiable to any order. x f32 or f64 (DTypeError
/// otherwise); ShapeError for a non-4-d x, a non-positive kernel, bad stride / padding, or a window
/// larger than the padded input.
Tensor max_pool2d(const Tensor& x, std::array<int64_t, 2> kernel, std::array<int64_t, 2> stride = {0, 0},
                  std::array<int64_t, 2> padding = {0, 0});
/// The indices torch.nn.functional.max_pool2d(..., return_indices=True) returns: i64 [N, C, OH, OW],
/// the offset h * W + w in its H x W plane of the element max_pool2d picks in each window (the one its
/// gradient flows to). Not differentiable. Same arguments and errors as max_pool2d.
Tensor max_pool2d_indices(const Tensor& x, std::array<int64_t, 2> kernel, std::array<int64_t, 2> stride = {0, 0},
                          std::array<int64_t, 2> padding = {0, 0});

// ------------------------------------------------------------------------------------ random
/// Uniform [0, 1) and standard normal samples from Philox(key) by element index (same on every device).
Tensor random_uniform(RngKey key, const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
Tensor random_normal(RngKey key, const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());

}  // namespace titanax
