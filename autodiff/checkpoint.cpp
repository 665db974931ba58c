// Activation checkpointing: one tape node whose forward runs the function unrecorded and whose vjp
// recomputes it recorded (see autodiff.h).
#include <cstdint>
#include <utility>

#include "autodiff/autodiff.h"
#include "core/error.h"

namespace titanax {
namespace {

// Tells the tracer (if any) that the ops in this scope recompute values (ApplyObserver::on_recompute).
class RecomputeScope {
 public:
  RecomputeScope() : obs_(apply_observer()) {
    if (obs_) obs_->on_recompute(true);
  }
  ~RecomputeScope() {
    if (obs_) obs_->on_recompute(false);
  }
  RecomputeScope(const RecomputeScope&) = delete;
  RecomputeScope& operator=(const RecomputeScope&) = delete;

 private:
  ApplyObserver* obs_;
};

// Inputs: {x, params...}, or {params...} when x is undefined (has_x false). `traced`: fn already ran
// (recorded by the tracer, not on the tape) and gave this value; forward() returns it.
struct Checkpoint final : Op {
  Checkpoint(std::function<Tensor(const Tensor&)> f, bool has_x, Tensor traced = {})
      : fn(std::move(f)), has_x(has_x), traced(std::move(traced)) {}
  const char* name() const override { return "checkpoint"; }
  // Each checkpoint wraps its own function: no two are interchangeable (the JIT's CSE compares attrs).
  std::string attrs() const override { return "fn=" + std::to_string(reinterpret_cast<uintptr_t>(this)); }
  std::vector<TensorSpec> infer(const TensorList&) const override {
    throw InternalError("checkpoint: infer() is not used (forward() runs the function)", "forward()", "infer()");
  }
  void cpu(const TensorList&, TensorList&) const override {
    throw InternalError("checkpoint: the kernel is the function itself", "forward()", "cpu()");
  }
  bool custom_forward() const override { return true; }
  TensorList forward(const TensorList& in) const override {
    if (traced.defined()) return {traced.detach()};  // a new handle on the traced value (the tracer maps it)
    NoGradGuard ng;  // the inside is not recorded: only this node is
    return {checked(fn(has_x ? in[0] : Tensor()))};
  }
  // Recomputes fn recorded and differentiates it with the incoming cotangent. The inner pass stops at
  // x and the params (their own histories are the outer pass's to follow). Under create_graph (grad mode
  // on: the outer backward is recorded) fn starts from a recorded copy of x, so the gradients returned
  // depend on x through recorded ops and can be differentiated again.
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    const bool create_graph = GradMode::enabled();
    GradModeGuard on(true);
    Tensor x;
    TensorList wrt;
    std::vector<size_t> idx;  // input index of each entry of wrt
    if (has_x) {
      x = create_graph && needs[0] ? in[0].clone() : in[0].detach();
      if (needs[0]) {
        if (!x.requires_grad()) x.set_requires_grad(true);
        wrt.push_back(x);
        idx.push_back(0);
      }
    }
    for (size_t i = has_x ? 1 : 0; i < in.size(); ++i)
      if (needs[i]) {
        wrt.push_back(in[i]);
        idx.push_back(i);
      }
    Tensor y;
    {
      RecomputeScope rs;  // traced: the recomputed ops stay apart from the forward's
      y = checked(fn(x));
    }
    BackwardOptions bo;
    bo.seed = ct[0];
    bo.create_graph = create_graph;
    bo.stop_at_wrt = true;
    TensorList g = grad(y, wrt, bo);
    TensorList out(in.size());
    for (size_t k = 0; k < idx.size(); ++k) out[idx[k]] = g[k];
    return out;
  }
  static Tensor checked(Tensor y) {
    if (!y.defined()) throw AutodiffError("checkpoint: the function returned no tensor", "a tensor", "Tensor()");
    return y;
  }
  std::function<Tensor(const Tensor&)> fn;
  bool has_x;
  Tensor traced;
};

}  // namespace

Tensor checkpoint(const std::function<Tensor(const Tensor&)>& fn, const Tensor& x, const TensorList& params) {
  bool any = x.defined() && x.requires_grad();
  for (const auto& p : params) any = any || p.requires_grad();
  if (!GradMode::enabled() || !any) return fn(x);
  TensorList in;
  if (x.defined()) in.push_back(x);
  in.insert(in.end(), params.begin(), params.end());
  if (apply_observer()) {
    // Under a trace (jit, vmap) a checkpoint node in the graph would read `params` through fn's closure,
    // not through its inputs, so a replay would compute with the trace's tensors. Instead fn's ops are
    // recorded into the graph (not on the tape), and the tape gets the checkpoint node alone (not into
    // the graph), whose output is fn's value: its vjp, traced in the backward pass, runs fn again inside
    // a recomputation (ApplyObserver::on_recompute) and the graph holds both, so the forward's
    // intermediates die in the forward pass (jit's memory plan) and the backward makes them again.
    Tensor y;
    {
      NoGradGuard ng;
      y = Checkpoint::checked(fn(x));
    }
    NoTraceGuard untraced;
    return apply1(std::make_shared<Checkpoint>(fn, x.defined(), y), std::move(in));
  }
  return apply1(std::make_shared<Checkpoint>(fn, x.defined()), std::move(in));
}

}  // namespace titanax
