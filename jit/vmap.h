// vmap: vectorising a per-example function over a batch axis, as a graph transformation (JAX's
// jax.vmap; its batching rules are the model for the ones here).
//
//   // per-example loss: x [in], y [] (a class index) -> loss []
//   auto loss = [&](const tx::TensorList& in) {
//     return tx::TensorList{tx::cross_entropy(tx::linear(in[0], w, b), in[1])};
//   };
//   auto losses = tx::jit::vmap(loss);            // x [B, in], y [B] -> losses [B]
//   tx::TensorList l = losses({xs, ys});
//   // a shared input and the batch on axis 1 of the first input:
//   auto f = tx::jit::vmap(g, {1, tx::jit::not_batched});
//
// How it works. Calling the vmapped function checks the inputs' batch sizes, takes one example of each
// batched input (index 0 along its axis, a view), traces fn on the examples with jit::trace into the
// per-example graph (cached per signature: which inputs are batched and each one's per-example shape,
// dtype and device), then interprets that graph on the whole batch: every node whose inputs include a
// batched value is rewritten by its op's batching rule, which issues ordinary ops (ops/ops.h, apply())
// on operands whose batch axis is axis 0. Nodes reading only unbatched values (the graph's constants:
// weights and scalars fn read; inputs passed as not_batched) run once, unbatched. Because the rules
// emit ordinary ops, the vmapped function composes: eagerly it just runs them; under jit::trace they
// are recorded into the outer graph; under an outer vmap they are batched again (vmap(vmap(f)) maps
// over two axes); under autodiff they are recorded on the tape.
//
// Batching rules (which ops run batched as one op, not once per example). Those needing only an op's
// attributes live in jit/vmap.cpp; those that build another op of the family with new attributes are the
// op's own (Op::batch, next to its kernels and vjp):
//   elementwise unary ops, copy, astype, to_device, clamp, one_hot: the op on the batched operand;
//   broadcasting binary ops (arithmetic, comparisons, relu_backward, gelu_*_backward) and where: a
//     batched operand of lower per-example rank gets size-1 axes after its batch axis, an unbatched one
//     broadcasts from the right;
//   sum, max, min, argmax, softmax, log_softmax, concat, slice, permute: the axes shifted by one;
//   reshape, expand: the per-example result shape behind the batch axis;
//   slice_scatter (the vjp of slice, and pad): the op one axis further in;
//   matmul: the operands' ranks aligned, the batch folded into matmul's broadcast batch axes;
//   linear: with a shared weight, the op on the batched x (one GEMM); with a batched weight or bias,
//     matmul with the transposed weight plus the bias;
//   layer_norm: the op on the batched x (with a batched w or b: the op with w = 1, b = 0, then * w + b);
//   layer_norm_backward: dx from the op without dw / db (on dy * w for a per-example w); dw and db as sums
//     over each example's rows of dy * x^ and dy (x^ from layer_norm without w and b);
//   cross_entropy (none: the op; sum / mean: per-example sums of the unreduced losses, the mean divided
//     by the number of labels that are not ignore_index); cross_entropy_backward: the op with reduction
//     none, each row's cotangent its example's (divided by the example's count under mean);
//   take / embedding: a batched x, the op one axis further in; batched indices into a shared x, the op
//     with the batch moved to the front; both batched, the examples' copies of the gathered axis stacked
//     into one of B * n rows and each example's indices offset into its own (after a gather from
//     0 .. n - 1 that checks them as the op does: an index out of range is an error, never a row of
//     another example); take_backward / embedding_backward (the scatter-adds): the same, each row summing
//     its example's gradients in the loop's order;
//   conv2d and conv2d_backward_input with a shared weight: the batch folded into N; with a per-example
//     weight or bias (an ensemble): conv2d as each example's im2col patches (the strided slices of the
//     padded x) times its weight, one batched GEMM [B, N*OH*OW, C*kh*kw] @ [B, C*kh*kw, O];
//     conv2d_backward_input as the columns dy^T w, one batched GEMM, then col2im (each kernel offset's
//     columns added back where its slice was read); conv2d_backward_weight: per example dy times the
//     patches, [B, O, N*OH*OW] @ [B, N*OH*OW, C*kh*kw] (the bias gradient: a sum of dy per example);
//   max_pool2d and max_pool2d_backward: the batch folded into N (its workspace is per output element, so
//     the B examples' workspaces lie one after another; checked by size, else the loop);
//     max_pool2d_indices: the same;
//   sum_squares (a gradient norm's square): per batched tensor, its f64 squares summed over each
//     example's axes;
//   dropout (f32 / f64): one mask of the example's shape (the loop draws the same one for every example),
//     x times it where kept and 0 where dropped, as the kernel;
//   scaled_dot_product_attention (+ _qkvpacked, + their backward ops): one more leading batch axis;
//   cond, while_loop, scan: new control-flow ops over their sub-graphs run batched (jit/batching.h):
//     a shared cond predicate keeps one cond, a per-example one runs both branches and selects (where);
//     loops batch the carries a batched input reaches; a per-example while predicate runs until no
//     example goes on, finished examples keeping their carry (JAX's rules for jax.lax's ops).
// Every other case falls back to a loop over the batch: each batched operand is sliced per example,
// the node's own op runs on each slice, and the results are stacked. The fallback is always correct;
// vmap_stats() counts, per op name, the nodes batched by a rule and those that fell back. Ops falling
// back at present: dropout of f16 / bf16 (its kernel scales in f32 and rounds once) or with a
// per-example step, and any op without a rule (the optimizer updates, the collectives, the fused ops of
// an optimised jit graph). So per-example gradients of an MLP, a CNN or a GPT (DP-SGD's clipping, Abadi
// et al. 2016) and the training of an ensemble of them (torch.func's model ensembling) run batched
// throughout.
//
// Semantics and limits (as JAX's vmap):
//  - fn must be a pure tensor function of its inputs: its control flow may not depend on the values of
//    its inputs (it is traced once per signature on one example), only on their shapes.
//  - Tensors fn reads that are not its inputs become constants of the cached graph (jit::trace): they
//    are shared by the whole batch, and in-place updates to them (an optimizer step) are seen by later
//    calls, but a closure re-bound to another tensor is not (make it an input).
//  - fn may take gradients inside (grad / value_and_grad on one example): the backward ops are in the
//    traced graph and are batched like the forward ones (per-example gradients).
//  - An output that does not depend on any batched input is broadcast to the batch (expand, a view).
//  - Randomness inside fn (dropout, random_normal with a key) is the same for every example, as in a
//    loop calling fn with the same key.
#pragma once

#include <climits>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace titanax::jit {

/// A function from tensors to tensors (the same type jit::trace and jit() take).
using Fn = std::function<TensorList(const TensorList&)>;

/// An in_axes entry for an input shared by the whole batch (JAX's in_axes=None).
inline constexpr int not_batched = INT_MIN;

/// Returns fn mapped over a batch axis of its inputs (see the header comment).
///
/// in_axes: one entry per input, the input's batch axis (negative counts from the end of the input's
/// axes) or not_batched; empty means axis 0 for every input. out_axes: one entry per output, where the
/// batch axis goes in that output (negative counts from the end of the batched output's axes); empty
/// means 0 for every output. Every batched input must have the same size B >= 1 along its batch axis;
/// output k has shape fn's per-example output k with B inserted at out_axes[k], same dtype and device.
///
/// The returned function throws, on a call:
///  - ValueError: in_axes has a size other than the number of inputs; out_axes has a size other than the
///    number of outputs; no input is batched; an input is undefined; the batch is empty (B = 0).
///  - ShapeError: an in_axes or out_axes entry out of range for its tensor (a 0-d input cannot be
///    batched); batched inputs whose batch sizes differ (naming both).
///  - whatever fn throws while it is traced on one example, and the ops' own errors for the batch.
/// vmap itself throws ValueError when fn is empty.
Fn vmap(Fn fn, std::vector<int> in_axes = {}, std::vector<int> out_axes = {});

/// Counters of the batching interpreter, per op name, on the calling thread since the last reset.
struct VmapStats {
  /// Nodes rewritten by their op's batching rule (run once for the whole batch).
  std::map<std::string, int64_t> batched;
  /// Nodes that fell back to a loop over the batch (their op ran once per example).
  std::map<std::string, int64_t> fallback;
};
/// The counters of the calling thread (nodes of nested vmaps count once per interpretation).
const VmapStats& vmap_stats();
/// Zeroes the calling thread's counters.
void reset_vmap_stats();

}  // namespace titanax::jit
