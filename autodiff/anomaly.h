// Anomaly detection: find the op that first produced a NaN (or an infinity), in the forward pass, the
// backward pass or a jit-compiled graph, instead of seeing a NaN loss steps later.
//
// What PyTorch users get from torch.autograd.detect_anomaly() and JAX users from jax_debug_nans /
// jax_debug_infs: while it is on, every op's outputs are checked as soon as the op has run, and the
// first non-finite value raises a FloatingPointError that names
//   * the op, its attributes, which output, how many elements and the first one's index;
//   * whether its inputs were finite (then this op created the value) or which input already held one,
//     and that input's name when it has one (a parameter's path);
//   * where it ran: the module path (NameScope: "blocks/1/attn/proj"), and, in the backward pass, the op whose
//     vjp was running and the module path of that op's forward (recorded on the tape while detection
//     is on); in a jit-compiled graph, the node (a fused node runs again as its member ops, each checked,
//     to name the one);
//   * a fix for the ops where one is known (log of 0, sqrt's derivative at 0, exp overflow, ...).
//
//   {
//     tx::DetectAnomalyGuard anomaly;             // NaNs; AnomalyOptions{.infs = true} for infinities too
//     tx::Tensor loss = model.loss(x, y);
//     loss.backward();                            // throws FloatingPointError at the op that made a NaN
//   }
//
// Environment: TITANAX_DEBUG_NANS=1 / TITANAX_DEBUG_INFS=1 turn it on for every thread of the process
// (read once, at the first op); a DetectAnomalyGuard overrides them in its scope. The `titanax` binary's
// config keys debug.nans / debug.infs do the same for a run.
//
// Cost: every op's outputs are scanned (on a GPU: reduced and read on the host, a synchronisation per
// op): a debugging mode, as in PyTorch and JAX (1.4x to 1.6x the step time on the CPU, docs/debugging.md).
// Off, an op pays one thread-local read. Checked: the outputs of ops applied at the top level (ops an op
// runs inside its own forward count toward it: a NaN inside a checkpoint()'s forward is reported at the
// checkpoint op; its recomputation in the backward pass is checked op by op) and the nodes of jit graphs
// (replayed node by node, not as captured CUDA graphs, while detection is on). Not checked: writes that
// bypass ops (copy_, fill_, an optimizer's fused in-place update); a NaN they leave is reported at the
// first op that reads it, as "input ... already held it".
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/tensor.h"

namespace titanax {

class Op;

/// What anomaly detection reports.
struct AnomalyOptions {
  bool nans = true;   ///< NaN in an op's floating output (jax_debug_nans)
  bool infs = false;  ///< +-inf in an op's floating output (jax_debug_infs). Off by default: masks and
                      ///< max-reductions use -inf legitimately, and an fp16 loss scaler's overflow is an inf.
};

/// Turns anomaly detection on (or, with both options false, off) on the calling thread for its scope.
/// Nests; the innermost guard wins. Not copyable.
class DetectAnomalyGuard {
 public:
  explicit DetectAnomalyGuard(AnomalyOptions opts = {});
  ~DetectAnomalyGuard();
  DetectAnomalyGuard(const DetectAnomalyGuard&) = delete;
  DetectAnomalyGuard& operator=(const DetectAnomalyGuard&) = delete;

 private:
  const AnomalyOptions* prev_;
  bool prev_guarded_;
  AnomalyOptions opts_;
};

/// The options in force on the calling thread: the innermost DetectAnomalyGuard's, else those of the
/// environment (TITANAX_DEBUG_NANS / TITANAX_DEBUG_INFS); nullptr when nothing is checked.
const AnomalyOptions* anomaly_options();

/// Non-finite elements of a tensor.
struct NonFiniteCount {
  int64_t nan = 0, posinf = 0, neginf = 0;
  int64_t total() const { return nan + posinf + neginf; }
};
/// Counts the NaN and infinite elements of `t` (any device, any layout; 0 for integer and bool
/// tensors). Copies t to the host in f64 (f16 / bf16 widen exactly) unless it is a contiguous f32 / f64
/// CPU tensor. Not recorded on the tape. A read of values on the host: inside a function being traced
/// (jit/graph.h) it throws TraceError, as item() does.
NonFiniteCount count_non_finite(const Tensor& t);

/// A name pushed onto the calling thread's module path for its scope (jax.named_scope,
/// torch.profiler.record_function): nn::Module::operator() pushes each module's name in its parent, so
/// anomaly reports say "h.1/attn/proj". `name` must outlive the scope (a module's name does). Cheap: a
/// pointer pushed and popped. Not copyable.
class NameScope {
 public:
  explicit NameScope(std::string_view name);
  ~NameScope();
  NameScope(const NameScope&) = delete;
  NameScope& operator=(const NameScope&) = delete;
};
/// The calling thread's module path: the open NameScopes' names joined by '/' ("" at the top).
std::string current_scope();

namespace detail {
/// While alive, anomaly reports on the calling thread say where they happen (`what`: "in the backward
/// (vjp) of op 'sqrt' ..."); `differentiated` names the forward op whose vjp runs (for the fix), or is
/// nullptr. Nests, the innermost wins. Used by the backward pass. Both must outlive the scope.
class AnomalyContext {
 public:
  explicit AnomalyContext(const std::string& what, const char* differentiated = nullptr);
  ~AnomalyContext();
  AnomalyContext(const AnomalyContext&) = delete;
  AnomalyContext& operator=(const AnomalyContext&) = delete;
  const std::string& what() const { return what_; }
  const char* differentiated() const { return differentiated_; }

 private:
  const std::string& what_;
  const char* differentiated_;
  const AnomalyContext* prev_;
};
/// For its scope, the calling thread's module path is `path` alone (the open NameScopes are set aside):
/// a jit replay checks each node in the path it was traced in, wherever the replay is called from.
/// `path` must outlive the scope.
class ScopeOverride {
 public:
  explicit ScopeOverride(std::string_view path);
  ~ScopeOverride();
  ScopeOverride(const ScopeOverride&) = delete;
  ScopeOverride& operator=(const ScopeOverride&) = delete;

 private:
  std::vector<std::string_view> saved_;
};
/// Checks `out` (the outputs of `op` applied to `in`) against `opts`; throws FloatingPointError
/// describing the first output holding a reported non-finite value (see the header comment). `where`
/// adds a place to the message (a jit node); may be empty.
void check_outputs(const AnomalyOptions& opts, const Op& op, const TensorList& in, const TensorList& out,
                   const std::string& where = {});
}  // namespace detail

}  // namespace titanax
