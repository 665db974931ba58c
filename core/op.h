// Op: one definition owns an operation's shape rule, its kernels per device and its derivative
// (the shape MLX uses for its primitives).
//
//   struct Exp final : Op {
//     const char* name() const override { return "exp"; }
//     std::vector<TensorSpec> infer(const TensorList& in) const override;   // shape + dtype, with errors
//     void cpu(const TensorList& in, TensorList& out) const override;       // kernels/cpu
//     void cuda(const TensorList& in, TensorList& out) const override;      // kernels/cuda
//     TensorList vjp(const TensorList& in, const TensorList& out, const TensorList& ct,
//                    const std::vector<bool>& needs) const override;       // written with ops
//   };
//
// apply(op, inputs) checks devices, allocates outputs, runs the kernel for the inputs' device and, when
// grad mode is on and an input requires grad, records a node on the thread's tape.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace titanax {

/// Shape, dtype and device of an op's output.
struct TensorSpec {
  Shape shape;
  DType dtype = DType::f32;
  Device device;
  /// Bytes of a contiguous tensor of this spec.
  size_t nbytes() const { return size_t(shape.numel()) * itemsize(dtype); }
};

/// "f32[4, 3]", with "@cuda:0" after it for a spec off the CPU: how errors, graphs and reports print a spec.
std::string spec_str(const TensorSpec& s);
/// spec_str of t's shape, dtype and device.
std::string spec_str(const Tensor& t);

/// What an op does to its floating inputs while autocast is on (AutocastGuard), after PyTorch's
/// torch.autocast op lists (docs.pytorch.org/docs/stable/amp.html, "CUDA Ops that can autocast"):
///   lower:   f32 inputs are cast to the autocast dtype (GEMMs: linear, matmul);
///   f32:     f16 / bf16 inputs are cast to f32 (softmax, log-softmax, cross-entropy, layer-norm, sums);
///   promote: when a 16-bit input meets a wider floating input, the 16-bit ones are cast to the widest
///            (everything else; single-dtype inputs are left alone).
enum class AutocastPolicy { promote, lower, f32 };

class OnnxBuilder;   // core/onnx_builder.h
struct OnnxNodeIO;   // core/onnx_builder.h

class Op {
 public:
  virtual ~Op() = default;
  /// Short op name: "matmul", "layer_norm".
  virtual const char* name() const = 0;
  /// The op's attributes as text ("axes=[0] keepdims=0"): shown in errors and graphs, and compared by
  /// the JIT (two nodes with the same name, attributes and inputs are merged), so every parameter that
  /// changes the result must appear here.
  virtual std::string attrs() const { return {}; }

  /// Output specs for these inputs. Throws ShapeError / DTypeError on invalid inputs.
  virtual std::vector<TensorSpec> infer(const TensorList& in) const = 0;
  /// CPU kernel: `out` is allocated (contiguous) per infer(), possibly at a nonzero offset into a larger
  /// storage (the JIT's memory plan); inputs may be strided.
  virtual void cpu(const TensorList& in, TensorList& out) const = 0;
  /// CUDA kernel. The default throws DeviceError naming the op and the device.
  virtual void cuda(const TensorList& in, TensorList& out) const;

  /// Cotangents of the inputs given cotangents `ct` of the outputs (one per output, never undefined:
  /// outputs that received none get zeros). `needs[i]` says whether input i's cotangent is wanted (it
  /// requires grad and leads to a tensor the gradient is taken with respect to); return an
  /// undefined Tensor where it is not (or where the input is not differentiable). `out` holds the
  /// outputs when saves_outputs() is true, else undefined tensors. Written with ops, so the backward
  /// pass is itself recorded (higher-order) and traceable. The default throws AutodiffError.
  virtual TensorList vjp(const TensorList& in, const TensorList& out, const TensorList& ct,
                         const std::vector<bool>& needs) const;

  /// Runs the op eagerly: infer, allocate, dispatch to cpu()/cuda(). View ops override this to alias.
  virtual TensorList forward(const TensorList& in) const;
  /// True for ops that override forward(): views (their outputs alias the input's storage) and ops with
  /// their own allocation (device copies, collectives, checkpoint). The JIT's memory plan
  /// (jit/memory_plan.h) preallocates outputs only where this is false, and treats the outputs of the
  /// others as possibly sharing storage with their inputs. An op that overrides forward() overrides this.
  virtual bool custom_forward() const { return false; }

  /// True for a non-contiguous input t that this op's kernels would copy and whose vjp reads it again
  /// (attention on the CPU, or a view its CUDA kernels cannot read in place): apply() then makes it
  /// contiguous itself, once, as an op on the tape (after autocast's casts, whose results are contiguous
  /// already), so the backward reads that copy instead of copying the view a second time. False by default:
  /// most kernels take strided operands.
  virtual bool contiguous_input(const Tensor& t) const { return false; }

  /// Whether vjp() reads the outputs (they are then kept alive by the tape node).
  virtual bool saves_outputs() const { return false; }
  /// Whether vjp() reads the values of its inputs (true by default). When false (add, sub: their vjp
  /// needs only the inputs' shapes) the tape node keeps, for each input that is not a leaf requiring
  /// grad, only its metadata (shape, dtype, device, grad_fn): the value's memory is freed as soon as
  /// nothing else holds it, as PyTorch saves only what a backward formula reads. Such a vjp must not
  /// read `in`'s data or pass `in` to an op.
  virtual bool vjp_reads_inputs() const { return true; }
  /// False for ops without a derivative (comparisons, argmax, casts to integers): never recorded.
  virtual bool differentiable() const { return true; }
  /// True when input i is a host scalar that the kernel launcher reads on the CPU (an optimizer update's
  /// step count and learning rate): it must be a CPU tensor, and it may stay there while the other inputs
  /// live on a GPU (apply() checks every other input against input 0's device).
  virtual bool host_input(size_t i) const { return false; }
  /// Whether a CUDA graph capture of this op's forward replays it (the JIT's captured replay,
  /// jit/capture.h): it queues all its device work on the current stream, reads no device memory on
  /// the host, and what it queues depends only on its inputs' addresses, specs and its attributes. The
  /// default: ops without their own forward(). Views (no device work) say true; ops that read their
  /// inputs on the host (label and index checks, control flow's predicates) say false. (An op that
  /// breaks this anyway costs a failed capture when it synchronises; one whose launches depend on host
  /// state that changes between calls would replay stale arguments: it must say false.)
  virtual bool capturable() const { return !custom_forward(); }
  /// The input whose memory output `out` may be written into (-1: none, the default). An op returns an
  /// input i here only when its kernels stay correct with out[out] being in[i] itself (same tensor:
  /// same shape, dtype, device, contiguous), e.g. an optimizer update that copies its state and then
  /// updates the copy. The JIT's update_in_place pass (jit/graph.h) uses it to write optimizer updates
  /// into the parameters and moments directly instead of into copies written back afterwards.
  virtual int in_place_input(size_t out) const { return -1; }
  /// For ops built from other ops (the JIT's fused nodes): runs those ops on `in`, each through apply(),
  /// and returns what they give for this op's outputs; empty for other ops (the default). Anomaly
  /// detection (autodiff/anomaly.h) runs a fused node again this way to name the member op that made a NaN.
  virtual TensorList run_unfused(const TensorList& in) const { return {}; }
  /// vmap's batching rule (jit/vmap.h), for ops whose rule needs their internals: another op of their
  /// family built with new attributes (a reduction, a shape, a pooling geometry). The rules that need only
  /// an op's attributes live in jit/vmap.cpp. `in` are the op's operands: batched[i] says in[i] holds B
  /// examples on a new leading axis ([B, per-example shape...]), else it is shared by all of them (its
  /// per-example shape); at least one is batched. Returns the outputs for the whole batch, each
  /// [B, per-example output shape...] with the per-example dtype, computed with ops through apply() (so a
  /// trace records them, the tape differentiates them and an outer vmap batches them again); or nullopt
  /// where the op has no rule for this case, and vmap then runs it once per example. The default: nullopt.
  /// (JAX's per-primitive batching rules, jax.interpreters.batching.)
  virtual std::optional<TensorList> batch(const TensorList& in, const std::vector<bool>& batched, int64_t B) const;
  /// Forward-mode derivative (jvp, autodiff/functional.h): the outputs' tangents J t given the inputs,
  /// the outputs and one tangent per input (undefined: zero; at least one is defined; each of its
  /// input's shape and dtype, undefined for non-floating inputs), written with ops through apply() (so
  /// they are recorded, traced and batched like any op). An undefined result is a zero tangent. nullopt
  /// (the default) where the op has no rule: jvp then takes J t from vjp(), as the vjp of the vjp with
  /// respect to its cotangent (linear in it). Ops that are linear() need no rule.
  virtual std::optional<TensorList> jvp(const TensorList& in, const TensorList& out, const TensorList& tangents) const;
  /// True for an op linear in its floating inputs jointly, the others held fixed (views, copies, casts
  /// between floating dtypes, add, sub, neg, sum, concat, gathers and their scatter-adds, where's
  /// branches): its jvp is the op itself applied to the tangents (zeros for the undefined ones).
  virtual bool linear() const { return false; }
  /// ONNX export rule (io/onnx.h, export_onnx): adds to `b` the ONNX nodes (opset 17) that compute this
  /// op's outputs io.out from io.in (core/onnx_builder.h), and returns true; false where the op has no
  /// ONNX form for these inputs (the exporter then throws a ValueError naming the op). A rule may throw
  /// its own ValueError with a better fix (dropout: put the model in eval mode). The default: false.
  virtual bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const { return false; }
  /// How autocast treats this op's inputs (AutocastPolicy).
  virtual AutocastPolicy autocast_policy() const { return AutocastPolicy::promote; }

 protected:
  /// For kernels without native f16 / bf16 code: runs this op's cpu() or cuda() (by out[0]'s device) on
  /// f32 copies of its 16-bit floating inputs, into f32 buffers for its 16-bit outputs, and rounds those
  /// into `out` (nearest even). Elementwise results then equal a native 16-bit kernel's (compute in f32,
  /// round on store); reductions and GEMMs accumulate as their f32 kernels do.
  void run_in_f32(const TensorList& in, TensorList& out) const;
};

/// For Op::batch rules: t when `batched` (it holds the batch on axis 0 already), else t broadcast to B
/// examples, [B, t.shape...] (a view, expand). Throws nothing.
Tensor with_batch(const Tensor& t, bool batched, int64_t B);

/// Mixed precision for a scope (PyTorch's torch.autocast): while one is alive on the calling thread,
/// apply() casts the inputs of each op by its autocast_policy(), with `dtype` (bf16 or f16) as the
/// lower precision. The casts are astype ops: recorded on the tape (gradients flow back to the f32
/// tensors in f32) and traced by the JIT. Run the forward under it, not the backward (the Engine wraps
/// the loss function only): the vjps then compute in the dtypes the forward chose. Nests; the innermost
/// wins. Throws DTypeError for a dtype other than bf16, f16 or f32 (f32 = off).
class AutocastGuard {
 public:
  explicit AutocastGuard(DType dtype);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  DType prev_;
};
/// The calling thread's autocast dtype: bf16 or f16 inside an AutocastGuard, f32 (off) otherwise.
DType autocast_dtype();

using OpPtr = std::shared_ptr<const Op>;

/// Sees every apply() on its thread while installed: the JIT's tracer (jit/graph.h). on_apply runs after
/// the op ran (and was recorded on the tape), with its inputs and outputs. The other two hooks see what
/// happens to tensors outside ops while the observer is installed (never from inside an op's kernels):
/// on_write an in-place write (copy_, fill_) of src into dst, before it happens (fill_ passes its value
/// as an expanded scalar), on_host_read a read of a tensor's values on the host (item(), to_vector()).
class ApplyObserver {
 public:
  virtual ~ApplyObserver() = default;
  virtual void on_apply(const OpPtr& op, const TensorList& inputs, const TensorList& outputs) = 0;
  virtual void on_write(const Tensor& dst, const Tensor& src) {}
  virtual void on_host_read(const Tensor& t) {}
  /// The autodiff engine made `to`, a new handle on `from`'s values (the tape's saved outputs): a
  /// forward-mode jvp gives it from's tangent. (A user's detach() is not an alias: it stops tangents.)
  virtual void on_alias(const Tensor& from, const Tensor& to) {}
  /// Activation checkpointing (autodiff's checkpoint()) starts (begin = true) or ends recomputing values
  /// the function computed before, in the backward pass; nested pairs. A tracer keeps the ops in between
  /// apart from the originals: they are not common subexpressions, since merging them would keep the
  /// originals alive until the backward pass and undo the recomputation.
  virtual void on_recompute(bool begin) {}
};
/// Installs `o` for the calling thread (nullptr removes it); returns the one installed before.
ApplyObserver* set_apply_observer(ApplyObserver* o);
/// The observer installed on the calling thread, or nullptr. Code whose effects bypass apply() (fused
/// in-place optimizer updates) checks it to take an op-based path while a function is being traced.
ApplyObserver* apply_observer();
/// Suspends the calling thread's observer for its scope: one-time setup inside a traced function (an
/// optimizer creating its state on the first step) that a replay must not repeat.
class NoTraceGuard {
 public:
  NoTraceGuard() : prev_(set_apply_observer(nullptr)) {}
  ~NoTraceGuard() { set_apply_observer(prev_); }
  NoTraceGuard(const NoTraceGuard&) = delete;
  NoTraceGuard& operator=(const NoTraceGuard&) = delete;

 private:
  ApplyObserver* prev_;
};
namespace detail {
/// Called by copy_ / fill_ and by item() / to_vector(): forwards to the observer unless the call comes
/// from inside an op (a kernel's own copies and reads are part of the op).
void notify_write(const Tensor& dst, const Tensor& src);
void notify_host_read(const Tensor& t);
/// Called by the tape and the backward pass when they alias an op's output (ApplyObserver::on_alias).
void notify_alias(const Tensor& from, const Tensor& to);
/// For its scope, ops applied on the calling thread count as called by the user, not by another op's
/// forward: a function traced from inside an op (jit::scan / cond in the function of checkpoint(),
/// which runs in that op's forward) has its own ops seen by the tracer, autocast and the profiler.
class TopLevelOps {
 public:
  TopLevelOps();
  ~TopLevelOps();
  TopLevelOps(const TopLevelOps&) = delete;
  TopLevelOps& operator=(const TopLevelOps&) = delete;

 private:
  int prev_;
};
}  // namespace detail

/// Runs `op` on `inputs` and records it on the tape when needed. Throws DeviceError when inputs live on
/// different devices; errors from infer() propagate with the caller's location.
TensorList apply(OpPtr op, TensorList inputs);
/// apply() for single-output ops.
Tensor apply1(OpPtr op, TensorList inputs);

/// A floating-point attribute as attrs() text: the shortest form that reads back as the same double
/// ("1e-05", "0.1"), so ops that differ in a parameter never print alike (std::to_string keeps 6 decimals).
std::string attr_num(double v);

/// Throws DTypeError unless `t` has one of `allowed` dtypes; `what` names the op for the message.
void check_dtype(const Tensor& t, std::initializer_list<DType> allowed, const char* what);
/// Throws DTypeError unless every input shares the dtype of the first.
void check_same_dtype(const TensorList& in, const char* what);

}  // namespace titanax
