// The tape: every recorded op becomes a Node with a sequence number in recording order. Outputs point at
// their node (grad_fn), nodes hold their inputs, so the recorded graph lives exactly as long as the
// tensors that need it (no leak when a forward pass is never differentiated). backward() collects the
// nodes reachable from the root and visits them in decreasing sequence number: reverse tape order.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/op.h"

namespace titanax {

struct Node {
  OpPtr op;
  TensorList inputs;                    // the op's inputs (kept for the vjp and to continue the walk)
  std::vector<uint64_t> input_versions; // storage versions at record time (in-place change detection)
  TensorList outputs;                   // detached aliases of the outputs when op->saves_outputs()
  std::vector<TensorSpec> out_specs;    // for zero cotangents of outputs that received none
  std::vector<uint64_t> output_versions;
  uint64_t seq = 0;
  std::string scope;                    // the module path at record time, kept while anomaly detection is on
  std::vector<Hooks<GradHook>> grad_hooks;  // per output: its gradient hooks (Tensor::register_hook), if any
};

/// Whether ops are recorded. Thread-local; on by default.
struct GradMode {
  static bool enabled();
  static void set(bool on);
};

/// Turns recording off for its scope (evaluation, optimizer updates).
class NoGradGuard {
 public:
  NoGradGuard() : prev_(GradMode::enabled()) { GradMode::set(false); }
  ~NoGradGuard() { GradMode::set(prev_); }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool prev_;
};

/// Sets grad mode to `on` for its scope.
class GradModeGuard {
 public:
  explicit GradModeGuard(bool on) : prev_(GradMode::enabled()) { GradMode::set(on); }
  ~GradModeGuard() { GradMode::set(prev_); }
  GradModeGuard(const GradModeGuard&) = delete;
  GradModeGuard& operator=(const GradModeGuard&) = delete;

 private:
  bool prev_;
};

/// Records `op` with its inputs and outputs if grad mode is on, the op is differentiable and an input
/// requires grad; marks the outputs as requiring grad. Called by apply().
void record(const OpPtr& op, const TensorList& inputs, TensorList& outputs);

}  // namespace titanax
