// Activation checkpointing: one tape node whose forward runs the function unrecorded and whose vjp
// recomputes it recorded (see autodiff.h).
#include <cstdint>
#include <utility>

#include "autodiff/autodiff.h"
#include "core/error.h"

namespace titanax {
namespace {

// Inputs: {x, params...}, or {params...} when x is undefined (has_x false).
struct Checkpoint final : Op {
  Checkpoint(std::function<Tensor(const Tensor&)> f, bool has_x) : fn(std::move(f)), has_x(has_x) {}
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
    Tensor y = checked(fn(x));
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
};

}  // namespace

Tensor checkpoint(const std::function<Tensor(const Tensor&)>& fn, const Tensor& x, const TensorList& params) {
  bool any = x.defined() && x.requires_grad();
  for (const auto& p : params) any = any || p.requires_grad();
  if (!GradMode::enabled() || !any) return fn(x);
  // Under a trace (jit, vmap) fn is recorded inline. The node would read `params` through fn's closure,
  // not through its inputs, so a replay would compute with the tensors of the trace, not the replay's;
  // the graph's memory plan decides instead what stays alive.
  if (apply_observer()) return fn(x);
  TensorList in;
  if (x.defined()) in.push_back(x);
  in.insert(in.end(), params.begin(), params.end());
  return apply1(std::make_shared<Checkpoint>(fn, x.defined()), std::move(in));
}

}  // namespace titanax
