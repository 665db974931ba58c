// Fusion passes of the JIT (DESIGN.md section 4): elementwise groups, GEMM epilogues and reduction
// prologues become single nodes whose CPU kernel is a vectorised interpreter over chunks of the output.
//
//   tx::jit::Graph g = tx::jit::trace(step, args);            // forward + backward + update, traced
//   tx::jit::fuse_elementwise(g);                              // chains of elementwise ops -> "fused"
//   tx::jit::fuse_matmul_epilogues(g);                         // linear + bias / gelu -> "fused_matmul"
//   tx::jit::fuse_reduction_prologues(g);                      // sum(x * y) -> "fused_sum"
//   std::cout << kernel_launches(g);                           // nodes that run a kernel
//
// The fused ops compute bitwise what the nodes they replace computed: they call the same scalar math as
// the eager kernels (kernels/cpu/elementwise_math.h), the existing GEMM kernel, and the reduction's own
// summation order; f16 / bf16 registers are computed in f32 and rounded to their dtype after every
// instruction, where each eager op rounds. On CUDA tensors they run NVRTC-generated kernels
// (jit/codegen.h) instead of the interpreter.
//
// A fused program is a list of instructions over registers: registers 0..n-1 are the node's inputs
// (each broadcast to the program's shape), register n + k is instruction k's result. The executor walks
// the output in chunks of kFusedChunk elements (chunks run in parallel over OpenMP threads); per chunk it
// loads each input's slice (honouring strides and broadcasting; a contiguous slice is read in place, a
// one-element input is a scalar operand), runs every instruction over the chunk into small per-thread
// buffers and writes the outputs. Intermediates never leave those buffers.
//
// A fused node runs on inputs of exactly the shapes and dtypes it was fused for: others throw ShapeError /
// DTypeError naming the input (ValueError for a wrong number of inputs).
//
// Fused ops print their whole program in attrs(), so CSE merges two fused nodes only when their programs
// (instructions, input shapes and dtypes, output shape) and inputs are the same; DCE and constant folding
// treat them as ordinary nodes. Their vjp re-runs the program with the public ops it was made from and
// applies each op's vjp in reverse (so it is correct and itself recorded on the tape), although the JIT
// fuses graphs that are already differentiated.
#pragma once

#include <cstdint>

#include "jit/graph.h"

namespace titanax::jit {

/// Elements of the output one chunk of a fused kernel covers (per-thread buffers hold this many values
/// per live register).
inline constexpr int64_t kFusedChunk = 1024;

/// Replaces each maximal group of connected elementwise nodes (CPU or CUDA) by one node whose op is
/// FusedElementwise (name "fused", attrs the program text). Fusable ops (f32 / f64 / f16 / bf16 operands;
/// their results may be bool): neg exp log sqrt rsqrt tanh sigmoid abs square reciprocal relu gelu_tanh gelu_erf
/// sign clamp; add sub mul div maximum minimum pow eq ne lt le gt ge relu_backward gelu_tanh_backward
/// gelu_erf_backward (broadcasting); where; astype and copy between f32, f64, f16, bf16 and bool.
/// Rules:
///  - every member's output has the group's shape (inputs may broadcast to it), so one chunk of the
///    output indexes every member;
///  - a member's output used outside the group (by another node, as a graph output or by an update)
///    becomes an extra output of the fused node (multi-output), so a shared intermediate does not stop
///    fusion;
///  - nodes are visited in order; a node joins the groups of its producers (of its shape) that it can
///    join while the graph stays acyclic once the groups are contracted, merging them: a group never
///    spans a path through a node outside it (e.g. a matmul or reduction whose input comes from the
///    group and whose output feeds it again). Groups sharing only inputs stay apart (no sibling fusion);
///  - memory: the fused node runs at its last member's place, so a node joins a group only when the bytes
///    of the group's inputs it would keep alive longer, times the nodes in between, do not exceed the
///    bytes of the group's values it spares materialising, times theirs. A traced backward's gradient
///    accumulation (adds of contributions made far apart) would otherwise keep every contribution alive
///    to the last add (GPT-2's tied embedding with a chunked loss head: a planned peak of 837 MB
///    instead of 508 MB). Nodes adjacent to the group cost nothing either way;
///  - nodes of a recomputation (Node::remat, checkpoint() traced) join only groups of the same one;
///  - groups of one node are left as they are.
/// Nodes keep a topological order (a stable one: nodes move only as far as their inputs require).
/// Fused outputs keep their value ids. Returns the number of nodes removed (members minus fused nodes).
/// Throws InternalError if the rewrite would break the topological order (a bug, never bad input).
int fuse_elementwise(Graph& g);

/// GEMM epilogues: a matmul / linear node (f32 / f64 / f16 / bf16) whose output is read by an elementwise group
/// (a "fused" node from fuse_elementwise, or one fusable elementwise node) of the same shape becomes
/// one FusedMatmulEpilogue node (name "fused_matmul"): it runs the matmul / linear op's own CPU kernel
/// into an output buffer of its shape and dtype, then applies the group's program to that buffer in
/// place, in chunks of kFusedChunk consecutive elements (blocks of rows) over the threads: one pass over
/// the GEMM's output, no intermediate tensors. The GEMM runs whole, not per row block: split by rows,
/// oneDNN may pick other blockings and the result would no longer be bitwise that of the unfused graph;
/// so the rows are cache-hot as far as the output fits in cache. When the matmul result is also used
/// elsewhere (a pre-activation kept for the backward pass) it becomes output 0 of the fused node. The
/// first consumer (in node order) that qualifies without making the graph cyclic is taken. Run after
/// fuse_elementwise. Returns the number of nodes removed. Throws InternalError as fuse_elementwise.
int fuse_matmul_epilogues(Graph& g);

/// Reduction prologues: a CPU sum node (f32 / f64; mean is sum times a constant, so its sum part: the
/// multiply stays a node of the reduced shape) whose input comes from an elementwise group (a "fused"
/// node with that one output, or one fusable elementwise node) used by nothing else becomes one
/// FusedReduce node (name "fused_sum"): it evaluates the program in runs of up to kFusedChunk elements
/// and accumulates them without materialising the elementwise result, in the summation order of the sum
/// kernel (kernels/cpu/reduce.h reduce_sum_generated), so the result is bitwise equal. A group with
/// other outputs is left alone (its values are needed anyway). Run after fuse_elementwise. Returns the
/// number of nodes removed. Throws InternalError as fuse_elementwise.
int fuse_reduction_prologues(Graph& g);

/// Cross-entropy with its gradient: a cross_entropy node and a later cross_entropy_backward node of the
/// same logits, labels, reduction and ignore_index, whose cotangent is not computed from the loss (a
/// seed, a loss scale, a weighting of unreduced losses), become one "cross_entropy_with_grad" node
/// (ops/fused_ops.h; placed after the cotangent's producer): each row of the logits is read for its statistics once for both,
/// the labels checked once, and on a GPU two launches are saved; results bitwise those of the two nodes.
/// On any device. Returns the number of nodes removed.
int fuse_cross_entropy(Graph& g);

/// The residual stream's gradient sum: an add of a layer_norm_backward node's dx (read by nothing else)
/// and another value of the same shape and dtype (the skip connection's gradient, not computed from the
/// norm's outputs) becomes that node with the other value as a last input
/// (ops/fused_ops.h layer_norm_backward_residual_op), dx rounded and then added as it is stored: one
/// pass over the rows instead of a further read of both and a write, results bitwise those of the two
/// nodes (a GPT block's backward has two such adds; at GPT-2's [16, 1024, 768] f32 residual stream each
/// fused one saves a 50 MB read and a 50 MB write). On any device. Returns the number of nodes removed.
int fuse_layer_norm_backward_add(Graph& g);

/// fuse_cross_entropy, fuse_layer_norm_backward_add, fuse_elementwise, then fuse_matmul_epilogues, then
/// fuse_reduction_prologues (one pass each; the later passes absorb the elementwise pass's fused nodes);
/// returns the nodes removed in all. Throws what they throw.
int fuse(Graph& g);

/// The number of nodes that launch a kernel when the graph runs: every node except views of their
/// input. Views: permute, expand, slice, unbind, and reshape of contiguous data (a reshape of a
/// non-contiguous value copies, so it counts). Contiguity is followed through the graph: node outputs are contiguous,
/// graph inputs are taken as contiguous, constants and state tensors as they are, views permute /
/// broadcast / step their input's strides. Throws nothing.
int kernel_launches(const Graph& g);

}  // namespace titanax::jit
