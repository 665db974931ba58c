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

}  // namespace titanax
