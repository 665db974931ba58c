// Ops that only the JIT's graph passes build (jit/fusion.cpp), never a user's code.
#pragma once

#include "core/op.h"

namespace titanax {

/// When `fwd` is a cross_entropy op and `bwd` a cross_entropy_backward op with the same reduction and
/// ignore_index: the op "cross_entropy_with_grad" that computes both in one pass over the logits (each
/// row's max and sum of exponentials once). Inputs (logits, labels, ct), outputs (loss, dlogits), each
/// bitwise what the two ops give on the same device; the labels are checked once, with the two ops'
/// errors (at once on the CPU, at the next wait for the device on CUDA). Not differentiable. Otherwise
/// nullptr. Throws nothing.
OpPtr fused_cross_entropy_op(const Op& fwd, const Op& bwd);

/// When `bwd` is a layer_norm_backward op without one: the same op with a last input more, `residual`
/// (x's shape and dtype), added to dx as it is stored (dx rounded first: bitwise a separate add of dx and
/// residual). The residual stream's two gradients, the norm's and the skip connection's, summed without a
/// pass of their own over memory. Not differentiable. Otherwise nullptr. Throws nothing.
OpPtr layer_norm_backward_residual_op(const Op& bwd);

}  // namespace titanax
