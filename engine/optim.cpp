#include "engine/optim.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <string>

#include "autodiff/tape.h"
#include "core/profiler.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/optim.h"
#include "kernels/cuda/kernels.h"
#include "ops/ops.h"
#include "parallel/collectives.h"

namespace titanax::optim {

namespace {
// A hyper-parameter that must be a finite number >= 0 (NaN fails too): ValueError naming it.
void check_non_negative(double v, const std::string& what) {
  if (!(v >= 0 && std::isfinite(v)))
    throw ValueError(what + " must be a finite number >= 0", "finite, >= 0", std::to_string(v));
}
}  // namespace

Schedule constant(double lr) {
  check_non_negative(lr, "learning rate");
  return [lr](int64_t) { return lr; };
}

Schedule cosine(double lr, int64_t total, double r) {
  check_non_negative(lr, "learning rate");
  check_non_negative(r, "cosine schedule final_ratio");
  if (total <= 0) throw ValueError("cosine schedule needs total_steps > 0", "> 0", std::to_string(total));
  return [=](int64_t s) {
    double t = std::min<double>(double(s), double(total)) / double(total);
    return lr * (r + (1 - r) * 0.5 * (1 + std::cos(M_PI * t)));
  };
}

Schedule warmup_cosine(double lr, int64_t warmup, int64_t total, double r) {
  check_non_negative(lr, "learning rate");
  check_non_negative(r, "warmup_cosine schedule final_ratio");
  if (warmup < 0 || total <= warmup)
    throw ValueError("warmup_cosine needs 0 <= warmup < total_steps", "0 <= warmup < total",
                     "warmup=" + std::to_string(warmup) + " total=" + std::to_string(total));
  return [=](int64_t s) {
    if (s < warmup) return lr * double(s + 1) / double(warmup);
    double t = std::min<double>(double(s - warmup), double(total - warmup)) / double(total - warmup);
    return lr * (r + (1 - r) * 0.5 * (1 + std::cos(M_PI * t)));
  };
}

Schedule exponential(double lr, double rate, int64_t decay_steps) {
  check_non_negative(lr, "learning rate");
  if (!(rate > 0 && std::isfinite(rate)))
    throw ValueError("exponential schedule needs a finite rate > 0", "> 0", std::to_string(rate));
  if (decay_steps <= 0) throw ValueError("exponential schedule needs decay_steps > 0", "> 0", std::to_string(decay_steps));
  return [=](int64_t s) { return lr * std::pow(rate, double(s) / double(decay_steps)); };
}

Optimizer::Optimizer(Schedule s) : schedule_(std::move(s)), step_(zeros(Shape{}, DType::i64)) {}

int64_t Optimizer::steps() const { return step_.data<int64_t>()[0]; }

namespace {

// Shortest round-trip-ish form for descriptions: 1e-08, 0.9, 0.01.
std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

void check_grads(const ParamTree& params, const ParamTree& grads) {
  params.check_same_structure(grads, "optimizer step: parameters vs gradients");
  const Device dev = params.size() ? params[0].second.device() : Device::cpu();
  for (const auto& [p, t] : params) {
    if (!t.is_contiguous() || t.device() != dev)
      throw ValueError("optimizer step needs contiguous parameters on one device", "contiguous tensors on " + dev.str(),
                       "'" + p + "': " + t.str());
    if (grads.at(p).device() != dev)
      throw DeviceError("optimizer step: a gradient on another device than its parameter", dev.str(),
                        "'" + p + "': " + grads.at(p).device().str(), "compute the loss on the parameters' device");
  }
}

// The optimizer's state tensors of a parameter (states[0] is the parameter) live on its device: state
// created before the model moved (Module::to) would hand the kernels pointers of another device.
void check_state_device(const std::string& path, const TensorList& states) {
  for (size_t k = 1; k < states.size(); ++k)
    if (states[k].device() != states[0].device())
      throw DeviceError("optimizer state of '" + path + "' is on another device than the parameter",
                        states[0].device().str(), states[k].device().str(),
                        "move the model (Module::to) before the optimizer's first step, or start a new optimizer");
}

// A stateful optimizer is stepped with the parameters its state was made for (by path, in order): a set
// changed after the first step (Module::set_trainable) would pair moments with other tensors.
void check_state_paths(const ParamTree& state, const ParamTree& params) {
  if (state.paths() == params.paths()) return;
  throw ValueError("optimizer step: the parameters are not those its state was made for",
                   std::to_string(state.size()) + " parameters, the first '" + (state.size() ? state[0].first : "") + "'",
                   std::to_string(params.size()) + " parameters, the first '" + (params.size() ? params[0].first : "") + "'",
                   "freeze or unfreeze parameters (set_trainable, train.freeze, LoRA) before the first step, or start a new optimizer");
}

void bump(int64_t* step, ParamTree& params) {
  ++*step;
  for (auto& [p, t] : params) t.storage()->bump_version();
}

// ---- The update as ops, for a step being traced by the JIT (jit/graph.h): the same fused kernels run
// on copies, the results are written back with copy_ (the graph's in-place updates), and the learning
// rate, step count and the update's scalars are computed from the step tensor at each replay, not fixed
// at trace time.

// lr = schedule(step), evaluated on the host at each run.
struct ScheduleOp final : Op {
  Schedule schedule;
  const void* owner;  // the optimizer: two optimizers' schedules never compare equal
  ScheduleOp(Schedule s, const void* o) : schedule(std::move(s)), owner(o) {}
  const char* name() const override { return "lr_schedule"; }
  std::string attrs() const override { return "optimizer=" + std::to_string(reinterpret_cast<uintptr_t>(owner)); }
  std::vector<TensorSpec> infer(const TensorList& in) const override { return {{Shape{}, DType::f64, Device::cpu()}}; }
  void cpu(const TensorList& in, TensorList& out) const override { out[0].data<double>()[0] = schedule(in[0].data<int64_t>()[0]); }
  bool differentiable() const override { return false; }
};

// Whether the optional skip input at position i (a 0-d bool on the CPU) is present and true.
bool skipped(const TensorList& in, size_t i) { return in.size() > i && in[i].item() != 0; }

// step + 1 (i64 scalar); step itself when the optional second input (skip) is true.
struct IncrementOp final : Op {
  const char* name() const override { return "increment"; }
  std::vector<TensorSpec> infer(const TensorList& in) const override { return {{Shape{}, DType::i64, Device::cpu()}}; }
  void cpu(const TensorList& in, TensorList& out) const override {
    out[0].data<int64_t>()[0] = in[0].data<int64_t>()[0] + (skipped(in, 1) ? 0 : 1);
  }
  int in_place_input(size_t) const override { return 0; }
  bool differentiable() const override { return false; }
};

// How one optimizer updates a parameter: its settings (name and attrs, the grouping key and the node's
// attributes), the number k of state tensors (the parameter first, then moments / momentum), the step's
// scalars (kernels/update_scalars.h) and the kernels. Eager steps call update / update_cuda directly;
// traced steps apply an UpdateOp node per group of parameters with equal settings (below).
struct UpdateRule {
  int k;
  explicit UpdateRule(int states) : k(states) {}
  virtual ~UpdateRule() = default;
  virtual const char* name() const = 0;
  virtual std::string attrs() const = 0;
  /// This update's scalars at step count `step` (updates done before this one), learning rate lr and
  /// gradient factor `factor` (kernels/update_scalars.h).
  virtual kernels::UpdateScalars scalars(int64_t step, double lr, bool apply, double factor = 1) const = 0;
  /// Updates `s` (contiguous f32 / f64 state tensors: copies when traced, the optimizer's own tensors
  /// eagerly) in place with gradient g (contiguous) on the CPU.
  virtual void update(TensorList& s, const Tensor& g, const kernels::UpdateScalars& sc) const = 0;
  /// The same for many parameters on a CUDA device with these settings: the fused multi-tensor kernels
  /// (kernels/cuda/optim.cu), one launch per 24 tensors. Each entry: the state tensors, the gradient. The
  /// scalars are `sc`, or those in device_scalars when given.
  virtual void update_cuda(const std::vector<std::pair<TensorList, Tensor>>& group, const kernels::UpdateScalars& sc,
                           const Tensor* device_scalars) const = 0;
};

// The update of n parameters with one rule, as one node (a traced step's multi-tensor update: on a GPU one
// fused launch per 24 tensors, as the eager step, instead of a launch per parameter). Inputs: per
// parameter its k state tensors and its gradient, then the step's scalars (f64 [UpdateScalars::size] on
// the states' device, from ScalarsOp); outputs: the n * k updated state tensors (unchanged when the
// scalars say the step is skipped). Every input lives on the states' device, so on a GPU the node can be
// captured into a CUDA graph (jit/capture.h).
struct UpdateOp final : Op {
  std::shared_ptr<const UpdateRule> rule;
  size_t n;
  UpdateOp(std::shared_ptr<const UpdateRule> r, size_t params) : rule(std::move(r)), n(params) {}
  const char* name() const override { return rule->name(); }
  std::string attrs() const override { return rule->attrs() + " params=" + std::to_string(n); }
  // Node input of state s of parameter i (the gradient is at i * (k + 1) + k, the scalars last).
  size_t state_input(size_t i, int s) const { return i * size_t(rule->k + 1) + size_t(s); }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    std::vector<TensorSpec> out;
    for (size_t i = 0; i < n; ++i)
      for (int s = 0; s < rule->k; ++s) {
        const Tensor& t = in[state_input(i, s)];
        out.push_back({t.shape(), t.dtype(), t.device()});
      }
    return out;
  }
  // Output j's state, copied from its input unless the JIT made it that input's memory (update in place).
  TensorList states_of(const TensorList& in, TensorList& out, size_t i, bool cuda) const {
    TensorList st;
    for (int s = 0; s < rule->k; ++s) {
      Tensor& o = out[i * size_t(rule->k) + size_t(s)];
      const Tensor& src = in[state_input(i, s)];
      if (!o.same(src)) cuda ? kernels::cuda::copy_cast(src, o) : kernels::cpu::copy_cast(src, o);
      st.push_back(o);
    }
    return st;
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    kernels::UpdateScalars sc;
    for (int j = 0; j < kernels::UpdateScalars::size; ++j) sc.v[j] = in.back().data<double>()[j];
    for (size_t i = 0; i < n; ++i) {
      TensorList st = states_of(in, out, i, false);
      rule->update(st, in[state_input(i, rule->k)], sc);
    }
  }
  // On a GPU: the copies on the device, then the fused multi-tensor kernel reading the scalars from
  // device memory.
  void cuda(const TensorList& in, TensorList& out) const override {
    std::vector<std::pair<TensorList, Tensor>> group;
    for (size_t i = 0; i < n; ++i) group.push_back({states_of(in, out, i, true), in[state_input(i, rule->k)]});
    rule->update_cuda(group, kernels::UpdateScalars{}, &in.back());
  }
  // Every state may be updated where it is (the JIT's update_in_place): the copy above is then skipped
  // and the kernels read and write each element in place, as the eager step does.
  int in_place_input(size_t out) const override {
    return out < n * size_t(rule->k) ? int(state_input(out / size_t(rule->k), int(out % size_t(rule->k)))) : -1;
  }
  bool differentiable() const override { return false; }
};

// The step's update scalars (UpdateRule::scalars) from the step count, the learning rate and optionally
// skip, host scalars read at each run, as f64 [UpdateScalars::size] on the parameters' device (gradient
// factor 1; update_parameters puts a traced one in after): on a GPU written by a kernel launch that
// carries the values, so nothing waits and the update reading them can be captured.
struct ScalarsOp final : Op {
  std::shared_ptr<const UpdateRule> update;
  Device device;
  ScalarsOp(std::shared_ptr<const UpdateRule> u, Device d) : update(std::move(u)), device(d) {}
  const char* name() const override { return "update_scalars"; }
  std::string attrs() const override { return std::string(update->name()) + " " + update->attrs() + " device=" + device.str(); }
  std::vector<TensorSpec> infer(const TensorList&) const override {
    return {{Shape{kernels::UpdateScalars::size}, DType::f64, device}};
  }
  bool host_input(size_t) const override { return true; }
  bool capturable() const override { return false; }  // its values come from the host at every run
  bool differentiable() const override { return false; }
  // Runs on the host (its inputs are host scalars) for either output device.
  void cpu(const TensorList& in, TensorList& out) const override {
    const kernels::UpdateScalars s = update->scalars(in[0].data<int64_t>()[0], in[1].data<double>()[0], !skipped(in, 2));
    if (out[0].device().is_cuda()) return kernels::cuda::set_update_scalars(out[0], s);
    for (int j = 0; j < kernels::UpdateScalars::size; ++j) out[0].data<double>()[j] = s.v[j];
  }
};

struct AdamRule final : UpdateRule {
  AdamOptions o;
  double wd;
  bool decoupled;
  AdamRule(const AdamOptions& opts, double decay, bool dec) : UpdateRule(3), o(opts), wd(decay), decoupled(dec) {}
  const char* name() const override { return decoupled ? "adamw_update" : "adam_update"; }
  std::string attrs() const override {
    return "betas=(" + attr_num(o.beta1) + "," + attr_num(o.beta2) + ") eps=" + attr_num(o.eps) + " wd=" + attr_num(wd);
  }
  kernels::UpdateScalars scalars(int64_t step, double lr, bool apply, double factor) const override {
    return kernels::adam_scalars(lr, o.beta1, o.beta2, wd, step + 1, apply, factor);
  }
  void update(TensorList& s, const Tensor& g, const kernels::UpdateScalars& sc) const override {
    if (s[0].dtype() == DType::f32)
      kernels::cpu::adam_update(s[0].data<float>(), g.data<float>(), s[1].data<float>(), s[2].data<float>(), s[0].numel(), sc,
                                o.beta1, o.beta2, o.eps, wd, decoupled);
    else
      kernels::cpu::adam_update(s[0].data<double>(), g.data<double>(), s[1].data<double>(), s[2].data<double>(), s[0].numel(),
                                sc, o.beta1, o.beta2, o.eps, wd, decoupled);
  }
  void update_cuda(const std::vector<std::pair<TensorList, Tensor>>& group, const kernels::UpdateScalars& sc,
                   const Tensor* device_scalars) const override {
    std::vector<Tensor> p, g, m, v;
    for (const auto& [s, grad] : group) p.push_back(s[0]), m.push_back(s[1]), v.push_back(s[2]), g.push_back(grad);
    kernels::cuda::adam_update(p, g, m, v, sc, o.beta1, o.beta2, o.eps, wd, decoupled, device_scalars);
  }
};

struct SgdRule final : UpdateRule {
  double mu, wd;
  bool nesterov;
  SgdRule(double m, double w, bool n) : UpdateRule(m > 0 ? 2 : 1), mu(m), wd(w), nesterov(n) {}
  const char* name() const override { return "sgd_update"; }
  std::string attrs() const override {
    return "momentum=" + attr_num(mu) + " wd=" + attr_num(wd) + " nesterov=" + std::to_string(nesterov);
  }
  kernels::UpdateScalars scalars(int64_t step, double lr, bool apply, double factor) const override {
    return kernels::sgd_scalars(lr, step == 0, apply, factor);
  }
  void update(TensorList& s, const Tensor& g, const kernels::UpdateScalars& sc) const override {
    if (s[0].dtype() == DType::f32)
      kernels::cpu::sgd_update(s[0].data<float>(), g.data<float>(), mu > 0 ? s[1].data<float>() : nullptr, s[0].numel(), sc, mu,
                               wd, nesterov);
    else
      kernels::cpu::sgd_update(s[0].data<double>(), g.data<double>(), mu > 0 ? s[1].data<double>() : nullptr, s[0].numel(), sc,
                               mu, wd, nesterov);
  }
  void update_cuda(const std::vector<std::pair<TensorList, Tensor>>& group, const kernels::UpdateScalars& sc,
                   const Tensor* device_scalars) const override {
    std::vector<Tensor> p, g, buf;
    for (const auto& [s, grad] : group) {
      p.push_back(s[0]);
      g.push_back(grad);
      buf.push_back(mu > 0 ? s[1] : Tensor());
    }
    kernels::cuda::sgd_update(p, g, buf, sc, mu, wd, nesterov, device_scalars);
  }
};

// One optimizer step: per parameter, update_for(i) gives the update op and the state tensors it updates
// (the parameter first). Eagerly the op's kernel updates them in place with scalars computed here; while
// traced (jit/graph.h) the op runs on copies that are written back with copy_, and the learning rate,
// the step count and the update's scalars are ops of the step tensor, so a replay computes them anew.
using UpdateFor = std::function<std::pair<std::shared_ptr<const UpdateRule>, TensorList>(size_t i)>;
void update_parameters(const Schedule& schedule, const void* owner, Tensor& step, ParamTree& params, const ParamTree& grads,
                       const Tensor& skip, const Tensor& grad_factor, const UpdateFor& update_for) {
  NoGradGuard ng;
  const bool traced = apply_observer() != nullptr;
  if (skip.defined() && (skip.dim() != 0 || skip.dtype() != DType::bool_ || !skip.device().is_cpu()))
    throw ValueError("optimizer step: skip must be a 0-d bool tensor on the CPU", "shape [], bool, cpu",
                     skip.shape().str() + ", " + std::string(dtype_name(skip.dtype())) + ", " + skip.device().str());
  const Device dev = params.size() ? params[0].second.device() : Device::cpu();
  if (grad_factor.defined() && (grad_factor.dim() != 0 || !is_floating(grad_factor.dtype()) ||
                                !(grad_factor.device().is_cpu() || grad_factor.device() == dev)))
    throw ValueError("optimizer step: grad_factor must be a 0-d floating-point tensor on the CPU or the parameters' device",
                     "shape [], a floating dtype, cpu or " + dev.str(),
                     grad_factor.shape().str() + ", " + std::string(dtype_name(grad_factor.dtype())) + ", " +
                         grad_factor.device().str());
  if (!traced && skip.defined() && skip.item() != 0) return;
  const int64_t t = traced ? 0 : step.data<int64_t>()[0];
  const double lr_now = traced ? 0.0 : schedule(t);
  const double factor_now = traced || !grad_factor.defined() ? 1.0 : grad_factor.item();
  const Tensor lr = traced ? apply1(std::make_shared<ScheduleOp>(schedule, owner), {step}) : Tensor();
  struct Pending {
    std::shared_ptr<const UpdateRule> op;
    TensorList states;  // the parameter first
    Tensor grad;
  };
  std::vector<Pending> todo;
  for (size_t i = 0; i < params.size(); ++i) {
    check_dtype(params[i].second, {DType::f32, DType::f64}, "optimizer update");
    auto [op, states] = update_for(i);
    check_state_device(params[i].first, states);
    if (params[i].second.numel() == 0) continue;  // nothing to update (a rank's empty part of a parameter)
    todo.push_back({op, states, grads.at(params[i].first).contiguous()});
  }
  // Groups of parameters with the same settings and dtype (e.g. with and without weight decay), in the
  // order of their first parameter: on CUDA one fused multi-tensor update per group, eagerly and traced.
  std::vector<std::vector<Pending*>> groups;
  {
    std::map<std::string, size_t> index;
    for (Pending& u : todo) {
      const std::string key = std::string(u.op->name()) + " " + u.op->attrs() + " " + std::string(dtype_name(u.states[0].dtype()));
      auto [it, fresh] = index.emplace(key, groups.size());
      if (fresh) groups.emplace_back();
      groups[it->second].push_back(&u);
    }
  }
  if (!traced) {
    if (params.size() && params[0].second.device().is_cuda()) {
      for (const auto& grp : groups) {
        ProfileRange range(grp[0]->op->name(), params[0].second.device());
        std::vector<std::pair<TensorList, Tensor>> entries;
        for (Pending* u : grp) entries.push_back({u->states, u->grad});
        grp[0]->op->update_cuda(entries, grp[0]->op->scalars(t, lr_now, true, factor_now), nullptr);
      }
    } else {
      for (Pending& u : todo) {
        ProfileRange range(u.op->name(), Device::cpu());
        u.op->update(u.states, u.grad, u.op->scalars(t, lr_now, true, factor_now));
      }
    }
    bump(step.data<int64_t>(), params);
    return;
  }
  // Traced: every group's scalars first (host ops, op by op on a GPU), then one update node per group
  // (device ops only: one run of nodes a CUDA graph can capture whole). A gradient factor computed in
  // the graph (on the device, from the gradient norm) replaces the host scalars' last entry.
  const TensorList host = skip.defined() ? TensorList{step, lr, skip} : TensorList{step, lr};
  constexpr int64_t factor_at = kernels::UpdateScalars::size - 1;
  const Tensor factor = grad_factor.defined() ? grad_factor.astype(DType::f64).to(dev).reshape(Shape{1}) : Tensor();
  std::vector<Tensor> scalars;
  for (const auto& grp : groups) {
    Tensor sc = apply1(std::make_shared<ScalarsOp>(grp[0]->op, dev), host);
    scalars.push_back(factor.defined() ? concat({sc.slice(0, 0, factor_at), factor}, 0) : sc);
  }
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    TensorList in;
    for (Pending* u : groups[gi]) {
      in.insert(in.end(), u->states.begin(), u->states.end());
      in.push_back(u->grad);
    }
    in.push_back(scalars[gi]);
    const TensorList out = titanax::apply(std::make_shared<UpdateOp>(groups[gi][0]->op, groups[gi].size()), in);
    size_t j = 0;
    for (Pending* u : groups[gi])
      for (Tensor& st : u->states) copy_(st, out[j++]);
  }
  copy_(step, apply1(std::make_shared<IncrementOp>(), skip.defined() ? TensorList{step, skip} : TensorList{step}));
}

class Adam final : public Optimizer {
 public:
  Adam(Schedule s, AdamOptions o, bool decoupled) : Optimizer(std::move(s)), o_(std::move(o)), decoupled_(decoupled) {
    if (!(o_.beta1 >= 0 && o_.beta1 < 1 && o_.beta2 >= 0 && o_.beta2 < 1))  // NaN fails too
      throw ValueError("Adam betas must lie in [0, 1)", "0 <= beta < 1", std::to_string(o_.beta1) + ", " + std::to_string(o_.beta2));
    if (!(o_.eps > 0 && std::isfinite(o_.eps)))
      throw ValueError("Adam eps must be a finite number > 0", "> 0", std::to_string(o_.eps));
    check_non_negative(o_.weight_decay, "Adam weight_decay");
  }
  void init(const ParamTree& params, const ParamTree& like) override {
    m_ = ParamTree();
    v_ = ParamTree();
    decay_.clear();
    for (const auto& [p, t] : params) {
      m_.insert(p, zeros_like(t));
      v_.insert(p, zeros_like(t));
      decay_.push_back(!o_.decay_filter || o_.decay_filter(p, like.empty() ? t : like.at(p)));
    }
  }
  void step(ParamTree& params, const ParamTree& grads, const Tensor& skip, const Tensor& grad_factor) override {
    if (m_.empty()) {
      NoTraceGuard once;  // the first step's setup is not part of a traced step
      init(params, {});
    }
    check_state_paths(m_, params);
    check_grads(params, grads);
    update_parameters(schedule_, this, step_, params, grads, skip, grad_factor, [&](size_t i) {
      return std::make_pair(std::make_shared<const AdamRule>(o_, decay_[i] ? o_.weight_decay : 0.0, decoupled_),
                            TensorList{params[i].second, m_[i].second, v_[i].second});
    });
  }
  ParamTree state() const override {
    ParamTree s;
    s.insert("step", step_);
    for (const auto& [p, t] : m_) s.insert("m/" + p, t);
    for (const auto& [p, t] : v_) s.insert("v/" + p, t);
    return s;
  }
  std::string describe() const override {
    return std::string(decoupled_ ? "AdamW" : "Adam") + "(betas=(" + num(o_.beta1) + ", " + num(o_.beta2) +
           "), eps=" + num(o_.eps) + ", weight_decay=" + num(o_.weight_decay) + ")";
  }

 private:
  AdamOptions o_;
  bool decoupled_;
  ParamTree m_, v_;
  std::vector<bool> decay_;
};

class SGD final : public Optimizer {
 public:
  SGD(Schedule s, double mu, double wd, bool nesterov) : Optimizer(std::move(s)), mu_(mu), wd_(wd), nesterov_(nesterov) {
    check_non_negative(mu, "SGD momentum");
    check_non_negative(wd, "SGD weight_decay");
    if (nesterov && mu == 0) throw ValueError("Nesterov momentum needs momentum > 0", "momentum > 0", "0");
  }
  void init(const ParamTree& params, const ParamTree&) override {
    buf_ = ParamTree();
    if (mu_ > 0)
      for (const auto& [p, t] : params) buf_.insert(p, zeros_like(t));
    inited_ = true;
  }
  void step(ParamTree& params, const ParamTree& grads, const Tensor& skip, const Tensor& grad_factor) override {
    if (!inited_) {
      NoTraceGuard once;  // the first step's setup is not part of a traced step
      init(params, {});
    }
    if (mu_ > 0) check_state_paths(buf_, params);
    check_grads(params, grads);
    update_parameters(schedule_, this, step_, params, grads, skip, grad_factor, [&](size_t i) {
      TensorList states{params[i].second};
      if (mu_ > 0) states.push_back(buf_[i].second);
      return std::make_pair(std::make_shared<const SgdRule>(mu_, wd_, nesterov_), states);
    });
  }
  ParamTree state() const override {
    ParamTree s;
    s.insert("step", step_);
    for (const auto& [p, t] : buf_) s.insert("momentum/" + p, t);
    return s;
  }
  std::string describe() const override {
    return "SGD(momentum=" + num(mu_) + ", weight_decay=" + num(wd_) + (nesterov_ ? ", nesterov)" : ")");
  }

 private:
  double mu_, wd_;
  bool nesterov_;
  bool inited_ = false;
  ParamTree buf_;
};

}  // namespace

std::unique_ptr<Optimizer> sgd(Schedule lr, double momentum, double weight_decay, bool nesterov) {
  return std::make_unique<SGD>(std::move(lr), momentum, weight_decay, nesterov);
}
std::unique_ptr<Optimizer> adam(Schedule lr, AdamOptions opts) { return std::make_unique<Adam>(std::move(lr), std::move(opts), false); }
std::unique_ptr<Optimizer> adamw(Schedule lr, AdamOptions opts) { return std::make_unique<Adam>(std::move(lr), std::move(opts), true); }

namespace {
// The sum of the squares of gs (on one device), in double: one sum_squares op (a multi-tensor kernel on a
// GPU), then one scalar read.
double squares(const TensorList& gs) {
  NoGradGuard ng;
  return sum_squares(gs).item();
}

// The gradients, in order.
TensorList values_of(const ParamTree& grads) {
  TensorList gs;
  for (const auto& [p, g] : grads) gs.push_back(g);
  return gs;
}

// Every gradient times coef when coef is below 1; else the gradients are left as they are.
void scale_by(ParamTree& grads, double coef) {
  if (coef < 1) {
    // New tensors, not in-place scaling: gradients from backward may share storage with each other.
    NoGradGuard ng;
    for (auto& [p, g] : grads) g = g * coef;
  }
}

void check_max_norm(double max_norm) {
  if (!(max_norm > 0)) throw ValueError("gradient clipping needs max_norm > 0", "> 0", std::to_string(max_norm));
}
}  // namespace

double clip_coefficient(double norm, double max_norm) {
  check_max_norm(max_norm);
  return std::min(max_norm / (norm + 1e-6), 1.0);
}

Tensor clip_coefficient(const Tensor& norm, double max_norm) {
  check_max_norm(max_norm);
  NoGradGuard ng;
  return minimum(max_norm / (norm + 1e-6), scalar_like(1.0, norm));
}

double global_norm(const ParamTree& grads) { return std::sqrt(squares(values_of(grads))); }

double clip_grad_norm(ParamTree& grads, double max_norm) {
  check_max_norm(max_norm);
  const double norm = global_norm(grads);
  scale_by(grads, clip_coefficient(norm, max_norm));
  return norm;
}

void clip_to_norm(ParamTree& grads, double norm, double max_norm) { scale_by(grads, clip_coefficient(norm, max_norm)); }

Tensor global_norm_tensor(const ParamTree& grads) {
  NoGradGuard ng;
  return sqrt(sum_squares(values_of(grads)));  // on the gradients' device
}

void clip_to_norm_tensor(ParamTree& grads, const Tensor& norm, double max_norm) {
  const Tensor coef = clip_coefficient(norm, max_norm);
  NoGradGuard ng;
  for (auto& [p, g] : grads) g = g * coef.astype(g.dtype());
}

Tensor clip_grad_norm_tensor(ParamTree& grads, double max_norm) {
  check_max_norm(max_norm);
  Tensor norm = global_norm_tensor(grads);
  clip_to_norm_tensor(grads, norm, max_norm);
  return norm;
}

namespace {
// The mesh axes parameter `path` is split over (sorted, each once; {} = replicated).
std::vector<std::string> split_axes(const std::string& path, const std::map<std::string, PartitionSpec>& specs) {
  std::vector<std::string> axes;
  auto it = specs.find(path);
  if (it != specs.end())
    for (const auto& a : it->second)
      if (!a.empty() && std::find(axes.begin(), axes.end(), a) == axes.end()) axes.push_back(a);
  std::sort(axes.begin(), axes.end());
  return axes;
}
}  // namespace

Tensor global_norm_tensor(const ParamTree& grads, const std::map<std::string, PartitionSpec>& specs, const Mesh& mesh) {
  NoGradGuard ng;
  std::map<std::vector<std::string>, TensorList> by_axes;  // the gradients by the axes they are split over
  for (const auto& [p, g] : grads) by_axes[split_axes(p, specs)].push_back(g);
  Tensor total;
  for (auto& [axes, gs] : by_axes) {  // every rank has the same keys: the collectives match
    Tensor t = sum_squares(gs);  // f64, on the gradients' device
    for (const auto& a : axes) t = psum(mesh, t, a);
    total = total.defined() ? total + t : t;
  }
  return sqrt(total.defined() ? total : scalar(0.0, DType::f64));
}

double global_norm(const ParamTree& grads, const std::map<std::string, PartitionSpec>& specs, const Mesh& mesh,
                   const std::string& stage_axis, const std::set<std::string>& not_counted) {
  // Sums of squares by the set of axes the parameter is split over ({} = replicated), in a fixed order.
  std::map<std::vector<std::string>, TensorList> by_axes;
  by_axes[{}] = {};
  for (const auto& [p, g] : grads)
    if (!not_counted.count(p)) by_axes[split_axes(p, specs)].push_back(g);
  // Every rank has the same specs, hence the same keys: the all-reduces match across ranks.
  double total = 0;
  for (auto& [axes, gs] : by_axes) {
    Tensor t = scalar(squares(gs), DType::f64);
    for (const auto& a : axes) mesh.comm(a).all_reduce(t);
    total += t.item();
  }
  if (!stage_axis.empty()) {  // the stages' sums: the same total on every rank
    Tensor t = scalar(total, DType::f64);
    mesh.comm(stage_axis).all_reduce(t);
    total = t.item();
  }
  return std::sqrt(total);
}

double clip_grad_norm(ParamTree& grads, double max_norm, const std::map<std::string, PartitionSpec>& specs,
                      const Mesh& mesh, const std::string& stage_axis, const std::set<std::string>& not_counted) {
  check_max_norm(max_norm);
  const double norm = global_norm(grads, specs, mesh, stage_axis, not_counted);
  scale_by(grads, clip_coefficient(norm, max_norm));
  return norm;
}

}  // namespace titanax::optim
