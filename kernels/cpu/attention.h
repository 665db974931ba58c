// CPU kernels of scaled dot-product attention (ops/nn.cpp scaled_dot_product_attention), in the
// FlashAttention-2 style (Dao 2023, arXiv 2307.08691): queries and keys are walked in tiles of kTile
// rows, the softmax is computed online (a running row maximum and sum), and no [Tq, Tk] matrix is ever
// held; the backward recomputes each tile's probabilities from the forward's row logsumexp.
//
// Conventions (kernels/cpu/nn.h): f32 or f64, every operand contiguous, outputs allocated by the caller.
// The tile products go through kernels::cpu::gemm (oneDNN sgemm for f32; single-threaded inside the
// parallel region over heads and query tiles). Results do not depend on the thread count.
#pragma once

#include "core/tensor.h"

namespace titanax::kernels::cpu {

/// Rows per query / key tile.
constexpr int64_t kAttentionTile = 64;

/// q [..., Tq, D], k [..., Tk, D], v [..., Tk, D] (the leading axes flattened to N heads, equal for all
/// three; Tk >= 1): o [..., Tq, D] = softmax(scale * q k^T + mask) v and lse [..., Tq] = the logsumexp of
/// each row of scale * q k^T over its visible keys. causal: key j is visible to query i iff j <= i
/// (top-left aligned, PyTorch's is_causal), so every row sees key 0.
void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale, Tensor& o,
                       Tensor& lse);

/// The gradients of attention_forward given its o and lse and the cotangent dout [..., Tq, D]:
/// with P = exp(scale * q k^T - lse) (0 where masked) and delta_i = sum_d dout[i, d] o[i, d],
/// dv = P^T dout, dS = P * (dout v^T - delta), dq = scale * dS k, dk = scale * dS^T q.
/// dq, dk, dv have the shapes of q, k, v.
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                        const Tensor& dout, bool causal, double scale, Tensor& dq, Tensor& dk, Tensor& dv);

}  // namespace titanax::kernels::cpu
