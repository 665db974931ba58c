#include "engine/engine.h"

#include "jit/graph.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <set>
#include <utility>

#include "autodiff/autodiff.h"
#include "parallel/collectives.h"
#include "parallel/dp.h"
#include "parallel/pipeline.h"
#include "parallel/sharding.h"
#include "parallel/zero.h"

namespace titanax {

std::string Precision::str() const {
  return "params " + std::string(dtype_name(params)) + ", compute " + std::string(dtype_name(compute));
}

Tensor classification_loss(nn::Module& model, const Batch& b) { return cross_entropy(model(b["x"]), b["y"]); }

Metrics classification_metrics(nn::Module& model, const Batch& b) {
  Tensor logits = model(b["x"]);
  const Tensor& y = b["y"];
  double loss = cross_entropy(logits, y, Reduction::sum).item();
  double correct = sum(eq(argmax(logits, -1), y.astype(DType::i64)).astype(DType::f64)).item();
  return {{"loss", loss}, {"accuracy", correct}, {"count", double(y.shape()[0])}};
}

Engine::Engine(const Mesh& mesh, Plan plan, std::unique_ptr<optim::Optimizer> opt, EngineOptions opts)
    : mesh_(mesh), plan_(std::move(plan)), opt_(std::move(opt)), opts_(std::move(opts)) {
  if (!opt_) throw ValueError("Engine needs an optimizer", "optim::adamw(...) or similar", "nullptr");
  plan_.validate(mesh_);
  if (opts_.precision.params != DType::f32 || (opts_.precision.compute != DType::f32 && !is_half(opts_.precision.compute)))
    throw DTypeError("unsupported precision policy", "f32 master weights with f32, bf16 or f16 compute",
                     opts_.precision.str(), "use Precision::f32(), Precision::bf16() or Precision::fp16()");
  if (is_half(opts_.precision.compute) && (plan_.pp || mesh_.size() != dp_size()))
    throw PlanError("mixed precision runs data-parallel plans only",
                    "every rank on the DP axis and no pipeline parallelism with Precision " + opts_.precision.str(),
                    plan_.describe(), "use Precision::f32() for tensor- or pipeline-parallel plans");
  if (opts_.jit && plan_.pp)  // step() runs the pipeline schedule eagerly: refuse rather than ignore jit
    throw PlanError("the JIT-compiled step runs data- and tensor-parallel plans only",
                    "no pipeline parallelism with jit", plan_.describe(), "set jit: false for pipeline-parallel plans");
  if (!(opts_.grad_clip >= 0))  // NaN fails too
    throw ValueError("grad_clip must be >= 0", ">= 0 (0 = off)", std::to_string(opts_.grad_clip));
  if (opts_.precision.compute == DType::f16 && !opts_.loss_scale.enabled()) opts_.loss_scale = LossScaleOptions::dynamic();
  if (opts_.loss_scale.enabled()) {
    if (plan_.pp)
      throw PlanError("loss scaling runs with data- and tensor-parallel steps only",
                      "no plan.pp with loss scaling", "plan.pp with loss scale " + opts_.loss_scale.str(),
                      "set loss_scale to none (or drop pipeline parallelism)");
    scaler_ = std::make_unique<LossScaler>(opts_.loss_scale);
  }
}

int64_t Engine::global_step() const { return opt_->steps() + (scaler_ ? scaler_->skipped_steps() : 0); }

Engine::~Engine() = default;

Tensor Engine::policy_loss(nn::Module& model, const LossFn& loss_fn, const Batch& mb) const {
  Tensor l;
  {
    AutocastGuard ac(opts_.precision.compute);  // f32: off
    l = loss_fn(model, mb);
  }
  // In a training step (recording on) a loss without gradient history would train nothing, silently:
  // every gradient zero (PyTorch refuses its backward likewise).
  if (GradMode::enabled() && l.defined() && !l.requires_grad())
    throw ValueError("the loss does not depend on any parameter of the model: it carries no gradient history",
                     "a loss computed from the model's outputs while recording",
                     "a loss without history (" + l.str() + ")",
                     "compute it without NoGradGuard, detach() or values read with item(); every gradient would be zero");
  return is_half(l.dtype()) ? l.astype(DType::f32) : l;
}

int Engine::dp_size() const { return plan_.dp ? mesh_.axis_size(plan_.dp->axis) : 1; }

// The world rank with the TP coordinate set to 0: the same for every rank of a TP group, so replicated
// activations see the same per-step randomness (the world rank itself without TP).
uint64_t Engine::replica_rank() const {
  if (!plan_.tp) return uint64_t(mesh_.rank());
  uint64_t r = 0;
  for (size_t i = 0; i < mesh_.axes().size(); ++i)
    r = r * uint64_t(mesh_.shape()[i]) + (mesh_.axes()[i] == plan_.tp->axis ? 0 : uint64_t(mesh_.coords()[i]));
  return r;
}

std::map<std::string, PartitionSpec> Engine::partition_specs(nn::Module& model) const {
  ParamTree params = model.parameters();
  std::map<std::string, PartitionSpec> out;
  for (const auto& [p, t] : params) out[p] = {};
  if (!plan_.tp) return out;
  const std::string& axis = plan_.tp->axis;
  auto from_model = model.partition_specs();
  std::map<std::string, PartitionSpec> from_rules;
  if (!plan_.tp->rules.empty()) from_rules = titanax::partition_specs(plan_.tp->rules, params);
  auto norm = [](PartitionSpec s) {  // trailing "" entries do not change a spec
    while (!s.empty() && s.back().empty()) s.pop_back();
    return s;
  };
  for (const auto& [p, t] : params) {
    auto m = from_model.find(p);
    PartitionSpec spec = m != from_model.end() ? m->second : from_rules.count(p) ? from_rules[p] : PartitionSpec{};
    if (!from_model.empty() && !from_rules.empty() && norm(spec) != norm(from_rules[p]))
      throw PlanError("the plan's TP rules and the model disagree on how '" + p + "' is split",
                      "the model's spec " + spec_str(spec), "the rules' spec " + spec_str(from_rules[p]),
                      spec.empty() || !is_sharded(spec)
                          ? "build the model with the mesh (e.g. nn::GPT(cfg, mesh)) so it holds its block, or drop the rules"
                          : "use the model's own rules (e.g. nn::GPT::sharding_rules(\"" + axis + "\")) or leave TP.rules empty");
    for (const auto& a : spec)
      if (!a.empty() && a != axis)
        throw PlanError("parameter '" + p + "' is split over axis '" + a + "', which is not the TP axis '" + axis + "'",
                        "specs naming only '" + axis + "'", spec_str(spec),
                        "set TP{.axis = \"" + a + "\"} or build the model on axis '" + axis + "'");
    out[p] = spec;
  }
  return out;
}

void Engine::begin_step(nn::Module& model, const ParamTree& params) {
  if (params.empty())
    throw PlanError("nothing to train: every parameter of " + model.name() + " on this rank is frozen",
                    "at least one trainable parameter per rank (Module::set_trainable)",
                    std::to_string(model.parameters().size()) + " parameters, none trainable",
                    "freeze fewer parameters (train.freeze), or keep a trainable one on every pipeline stage");
  if (sync_) check_trainable(sync_->paths(), params);  // its buckets index the parameters it was made for
  if (shards_optimizer()) {
    ensure_zero(params);
    zero_->load_masters(params);  // the parameters may have been written since the last step (restore, by hand)
  } else if (!sync_ && dp_size() > 1) {
    sync_ = std::make_unique<GradientSync>(mesh_, plan_.dp->axis, params, opts_.bucket_bytes, first_bucket_bytes());
  }
  // Dropout keys: fold_in(fold_in(seed, replica), layer call) folded with the optimizer's step counter
  // when the op runs (a compiled step reads the counter at every replay).
  nn::RngContext::set(fold_in(RngKey::from_seed(opts_.seed), replica_rank()), opt_->step_tensor());
  model.train(true);
}

bool Engine::shards_optimizer() const { return plan_.dp && plan_.dp->shard_optimizer && dp_size() > 1; }

void Engine::check_trainable(const std::vector<std::string>& made_for, const ParamTree& params) const {
  if (made_for != params.paths())
    throw ValueError("the trainable parameters changed after the first step of this Engine",
                     std::to_string(made_for.size()) + " trainable parameters", std::to_string(params.size()),
                     "freeze or unfreeze parameters (set_trainable, train.freeze, LoRA) before the first step, or start a new Engine");
}

void Engine::ensure_zero(const ParamTree& params) {
  if (zero_) return check_trainable(zero_->paths(), params);  // its parts and the optimizer's state are theirs
  zero_ = std::make_unique<ZeroShards>(mesh_, plan_.dp->axis, params, opts_.bucket_bytes, first_bucket_bytes());
  opt_->init(zero_->masters(), params);  // state for this rank's parts; weight decay chosen on the whole tensors
}

std::map<std::string, PartitionSpec> Engine::norm_specs(const std::map<std::string, PartitionSpec>& tp_specs) const {
  return zero_ ? zero_->norm_specs(tp_specs) : tp_specs;
}

void Engine::report_grad(size_t k, const Tensor& grad) {
  if (sync_) sync_->on_grad_ready(k, grad);
  else zero_->on_grad_ready(k, grad);
}

void Engine::update(ParamTree& params, const ParamTree& grads, const Tensor& skip, const Tensor& grad_factor) {
  if (!zero_) return opt_->step(params, grads, skip, grad_factor);
  opt_->step(zero_->masters(), grads, skip, grad_factor);
  zero_->all_gather_into(params);
}

namespace {
// Abandons a step's overlapped buckets (GradientSync::reset, ZeroShards::reset) when the step throws
// before finishing them (forward, backward, a pipeline transfer), so the next step starts afresh.
class AbandonOnThrow {
 public:
  AbandonOnThrow(GradientSync* sync, ZeroShards* zero) : sync_(sync), zero_(zero) {}
  ~AbandonOnThrow() {
    if (!armed_) return;
    if (sync_) sync_->reset();
    if (zero_) zero_->reset();
  }
  AbandonOnThrow(const AbandonOnThrow&) = delete;
  AbandonOnThrow& operator=(const AbandonOnThrow&) = delete;
  void dismiss() { armed_ = false; }

 private:
  GradientSync* sync_;
  ZeroShards* zero_;
  bool armed_ = true;
};

// An optimizer's per-parameter state entries "<kind>/<path>" by kind ("m", "v", "momentum"), each a tree by
// parameter path (sorted by kind: the same order on every rank); the other entries ("step") into `rest`.
std::map<std::string, ParamTree> state_by_kind(const ParamTree& state, ParamTree* rest = nullptr) {
  std::map<std::string, ParamTree> kinds;
  for (const auto& [name, t] : state) {
    const size_t slash = name.find('/');
    if (slash != std::string::npos) kinds[name.substr(0, slash)].insert(name.substr(slash + 1), t);
    else if (rest) rest->insert(name, t);
  }
  return kinds;
}
}  // namespace

double Engine::dp_mean(double v) const {
  if (dp_size() == 1) return v;
  Tensor l = scalar(v, DType::f64);
  mesh_.comm(plan_.dp->axis).all_reduce(l);
  return l.item() / dp_size();
}

nn::PipelineModule& Engine::pipeline_module(nn::Module& model) const {
  auto* pm = dynamic_cast<nn::PipelineModule*>(&model);
  const std::string& axis = plan_.pp->axis;
  if (!pm)
    throw PlanError("the plan has pipeline parallelism but the model cannot run as pipeline stages",
                    "a model implementing nn::PipelineModule (nn::GPT)", model.name(),
                    "drop Plan::pp, or use a model that splits into stages");
  if (pm->pipeline_stages() != mesh_.axis_size(axis) || pm->pipeline_stage() != mesh_.axis_index(axis))
    throw PlanError("the model is not split into the stages of pipe axis '" + axis + "'",
                    std::to_string(mesh_.axis_size(axis)) + " stages, this rank's being " + std::to_string(mesh_.axis_index(axis)),
                    std::to_string(pm->pipeline_stages()) + " stage(s), this rank's being " + std::to_string(pm->pipeline_stage()),
                    "build the model on the mesh with its pipeline axis set (nn::GPTConfig.pp_axis = \"" + axis + "\")");
  return *pm;
}

StepResult Engine::pipeline_step(nn::Module& model, const Batch& batch) {
  const PP& pp = *plan_.pp;
  nn::PipelineModule& pm = pipeline_module(model);
  const int M = pp.microbatches;
  const int64_t B = batch.size();
  if (B % M != 0 || B == 0)
    throw PlanError("the local batch does not split into the pipeline's microbatches",
                    "a local batch divisible by microbatches=" + std::to_string(M), std::to_string(B) + " examples",
                    "make batch_size a multiple of (data-parallel ranks x microbatches)");
  if (pp.recompute != Recompute::none && model.stochastic())
    throw PlanError("activation recomputation of a model that draws randomness in its forward (dropout)",
                    "a deterministic model with recompute " + std::string(recompute_name(pp.recompute)),
                    model.name() + " (a recomputed dropout mask would differ from the one used)",
                    "set the plan's recompute to none, or drop the dropout");
  const int64_t micro = B / M;
  std::vector<Batch> mbs;
  for (int i = 0; i < M; ++i) mbs.push_back(batch.slice(i * micro, (i + 1) * micro));
  ParamTree params = model.trainable_parameters();
  std::map<std::string, PartitionSpec> tp_specs;
  if (plan_.tp) tp_specs = partition_specs(model);
  begin_step(model, params);
  pm.set_recompute_layers(pp.recompute == Recompute::layers ? pp.recompute_layers : 0);
  TensorList tensors;
  for (const auto& [p, t] : params) tensors.push_back(t);
  const std::vector<nn::PipelineModule::Tied> tied = pm.tied_parameters();
  auto is_tied = [&](const std::string& path) {
    return std::any_of(tied.begin(), tied.end(), [&](const nn::PipelineModule::Tied& t) { return t.path == path; });
  };
  // Data parallelism: the stage's last backward hands each gradient to the bucketed all-reduce (or
  // reduce-scatter) as soon as its sum over the microbatches is final; a tied weight's waits for the
  // other stage's part (below).
  PipelineStageFns fns{
      .forward = [&](int i, const Tensor& in) { return pm.stage_forward(in, mbs[size_t(i)], Reduction::mean); },
      .input_spec = [&](int i) { return pm.stage_input_spec(mbs[size_t(i)]); }};
  if (sync_ || zero_)
    fns.on_grad_ready = [&](size_t k, const Tensor& g) {
      if (!is_tied(params[k].first)) report_grad(k, g);
    };
  AbandonOnThrow abandon(sync_.get(), zero_.get());
  PipelineResult pr = run_pipeline(mesh_.comm(pp.axis), pp, tensors, fns);
  last_pipeline_stats_ = pr.stats;

  ParamTree grads;
  for (size_t k = 0; k < params.size(); ++k) grads.insert(params[k].first, pr.grads[k]);
  // Tied weights: both stages add the other's gradient (a + b == b + a in IEEE arithmetic, so the two
  // copies get bit-identical gradients and stay identical under the same update).
  std::set<std::string> not_counted;
  for (const auto& t : tied) {
    if (!grads.contains(t.path)) continue;  // frozen (on both stages: the same paths are frozen there)
    NoGradGuard ng;
    Tensor& g = grads.at(t.path);
    g = add(g, mesh_.comm(pp.axis).sendrecv(g, t.peer_stage, t.peer_stage));
    if (!t.counted) not_counted.insert(t.path);
  }
  if (sync_ || zero_) {
    for (size_t k = 0; k < params.size(); ++k)
      if (is_tied(params[k].first)) report_grad(k, grads[k].second);
    abandon.dismiss();  // finish() resets on its own errors
    grads = sync_ ? sync_->finish() : zero_->finish();  // zero_: this rank's part of each mean over its stage's DP group
  }

  StepResult r;
  r.lr = opt_->lr();
  r.grad_norm = optim::global_norm(grads, norm_specs(tp_specs), mesh_, pp.axis, not_counted);
  // No loss scaling with pipelines. A tied weight's copies have bit-identical gradients on both stages, so
  // their sharded updates stay identical too.
  update(params, grads, {}, grad_factor(r.grad_norm, 1.0));
  r.loss = dp_mean(pr.loss);
  return r;
}

StepResult Engine::step(nn::Module& model, const LossFn& loss_fn, const Batch& local_batch) {
  const Batch batch = local_batch.to(model.device());  // the loader's batches live on the CPU
  if (plan_.pp) return pipeline_step(model, batch);
  if (opts_.jit) return jit_step(model, loss_fn, batch);
  const int acc = accumulate_steps(batch);
  const int64_t B = batch.size();
  const int64_t micro = B / acc;
  ParamTree params = model.trainable_parameters();
  std::map<std::string, PartitionSpec> tp_specs;
  if (plan_.tp) tp_specs = partition_specs(model);  // cheap (glob matching); checked before any work
  begin_step(model, params);
  const double scale = scaler_ ? scaler_->scale() : 1.0;

  ParamTree acc_grads;
  double loss_sum = 0;
  AbandonOnThrow abandon(sync_.get(), zero_.get());
  for (int i = 0; i < acc; ++i) {
    Batch mb = acc == 1 ? batch : batch.slice(i * micro, (i + 1) * micro);
    const bool last = i == acc - 1;
    BackwardOptions bo;
    if (last && (sync_ || zero_)) {
      // Overlap: hand each parameter's final gradient (accumulated, averaged over microbatches) to the
      // bucketed all-reduce (or reduce-scatter) as soon as backward produces it.
      // Neither the backward pass nor acc_grads keep a gradient once it is handed over: a bucket's
      // gradients are freed when it is packed.
      bo.on_grad_ready = [&](size_t idx, const Tensor& g) {
        NoGradGuard ng;
        Tensor total = acc_grads.empty() ? g : add(std::exchange(acc_grads[idx].second, Tensor()), g);
        if (acc > 1) total = total * (1.0 / acc);
        report_grad(idx, total);
      };
      bo.release_reported = true;
    }
    auto [loss, grads] = value_and_grad(
        [&] {
          Tensor l = policy_loss(model, loss_fn, mb);
          return scaler_ ? l * scale : l;  // backward of S * loss: every gradient scaled by S
        },
        params, bo);
    loss_sum += loss.item() / scale;
    if (!last || !bo.on_grad_ready) {
      NoGradGuard ng;
      if (acc_grads.empty()) acc_grads = grads;
      else
        for (size_t k = 0; k < grads.size(); ++k) acc_grads[k].second = add(acc_grads[k].second, grads[k].second);
    }
  }
  abandon.dismiss();  // finish() resets on its own errors
  ParamTree grads;
  if (sync_) {
    grads = sync_->finish();
  } else if (zero_) {
    grads = zero_->finish();  // this rank's part of each mean
  } else {
    NoGradGuard ng;
    grads = acc == 1 ? acc_grads : acc_grads.map([&](const std::string&, const Tensor& g) { return g * (1.0 / acc); });
  }

  StepResult r;
  r.lr = opt_->lr();
  r.loss_scale = scale;
  // Split parameters: squares summed over the TP axis, replicated ones counted once. The norm is the same
  // on every rank (DP averages, TP sums), so is the loss scaler's decision: an inf or NaN in any
  // gradient on any rank makes it non-finite everywhere. The gradients stay scaled by S: their norm over
  // S is the unscaled norm, and 1 / S is part of the optimizer's grad_factor (grad_factor()).
  const double scaled_norm = zero_ || plan_.tp ? optim::global_norm(grads, norm_specs(tp_specs), mesh_) : optim::global_norm(grads);
  r.grad_norm = scaled_norm / scale;
  if (scaler_ && scaler_->update(!std::isfinite(r.grad_norm))) {
    r.skipped = true;  // no update: parameters, moments and the optimizer's step counter unchanged
  } else {
    update(params, grads, {}, grad_factor(r.grad_norm, scale));
  }
  r.loss = dp_mean(loss_sum / acc);
  return r;
}

Tensor Engine::grad_factor(double norm, double scale) const {
  double f = 1.0 / scale;
  if (opts_.grad_clip > 0) {
    const double coef = optim::clip_coefficient(norm, opts_.grad_clip);
    if (coef < 1) f *= coef;
  }
  return f != 1 ? scalar(f, DType::f64) : Tensor();
}

int Engine::accumulate_steps(const Batch& batch) const {
  const int acc = plan_.dp ? plan_.dp->accumulate_steps : 1;
  const int64_t B = batch.size();
  if (B % acc != 0 || B == 0)
    throw PlanError("the local batch does not split into accumulate_steps microbatches",
                    "a local batch divisible by accumulate_steps=" + std::to_string(acc), std::to_string(B) + " examples",
                    "make batch_size a multiple of (data-parallel ranks x accumulate_steps)");
  return acc;
}

void Engine::check_jit(nn::Module& model, const Batch& batch) const {
  const int tp = plan_.tp ? mesh_.axis_size(plan_.tp->axis) : 1;
  if (plan_.pp || mesh_.size() != dp_size() * tp)
    throw PlanError("the JIT-compiled step runs data- and tensor-parallel plans only",
                    "every rank on the plan's DP and TP axes with jit (other mesh axes of size 1)",
                    std::to_string(mesh_.size()) + " rank(s), " + std::to_string(dp_size()) + " on the DP axis x " +
                        std::to_string(tp) + " on the TP axis; " + plan_.describe(),
                    "give the plan an axis for every mesh axis of size > 1, or set jit: false");
  accumulate_steps(batch);
}

std::function<TensorList(const TensorList&)> Engine::step_function(nn::Module& model, const LossFn& loss_fn,
                                                                   const std::vector<std::string>& keys) {
  const int acc = plan_.dp ? plan_.dp->accumulate_steps : 1;
  return [this, &model, loss_fn, keys, acc](const TensorList& in) {
    Batch b;
    for (size_t i = 0; i < keys.size(); ++i) b.items[keys[i]] = in[i];
    ParamTree params = model.trainable_parameters();
    const int64_t micro = b.size() / acc;
    // Loss scaling: S is the scaler's f64 state tensor (read at every replay), moved to the model's device;
    // 1 / S in f64, rounded to each use's dtype as the eager step's double factor is.
    Tensor scale, inv_scale;
    if (scaler_) {
      scale = scaler_->scale_tensor().to(model.device());
      inv_scale = reciprocal(scale);
    }
    Tensor loss;
    ParamTree grads;
    for (int i = 0; i < acc; ++i) {
      Batch mb = acc == 1 ? b : b.slice(i * micro, (i + 1) * micro);
      auto [l, g] = value_and_grad(
          [&] {
            Tensor l = policy_loss(model, loss_fn, mb);
            return scaler_ ? l * scale.astype(l.dtype()) : l;  // backward of S * loss: gradients scaled by S
          },
          params);
      NoGradGuard ng;
      loss = loss.defined() ? loss + l : l;
      if (grads.empty()) grads = g;
      else
        for (size_t k = 0; k < g.size(); ++k) grads[k].second = add(grads[k].second, g[k].second);
    }
    NoGradGuard ng;
    if (acc > 1) {
      loss = loss * (1.0 / acc);
      grads = grads.map([&](const std::string&, const Tensor& g) { return g * (1.0 / acc); });
    }
    if (dp_size() > 1) {  // the averages over the DP replicas, as traced collectives the graph replays
      grads = zero_ ? zero_->reduce_scatter_mean(grads) : bucketed_pmean(mesh_, grads, plan_.dp->axis, opts_.bucket_bytes);
      loss = pmean(mesh_, loss, plan_.dp->axis);
    }
    // Split parameters (TP): squares summed over their axes by traced psums, replicated ones counted once;
    // this rank's parts of the parameters (zero_): squares summed over the DP axis too.
    const auto specs = plan_.tp ? partition_specs(model) : std::map<std::string, PartitionSpec>{};
    Tensor norm = zero_ || plan_.tp ? optim::global_norm_tensor(grads, norm_specs(specs), mesh_) : optim::global_norm_tensor(grads);
    // Unscaling and clipping as in the eager step: the gradients stay scaled, the norm is divided by S and
    // the optimizer multiplies by 1 / S and the clipping coefficient as it reads them (no pass of its own).
    Tensor skip, factor;
    if (scaler_) {  // the scaler's decision on the norm (inf or NaN: skip the update)
      loss = loss * inv_scale.astype(loss.dtype());
      norm = norm / scale;
      factor = inv_scale;
      skip = scaler_->update_traced(lt(abs(norm), scalar(INFINITY, norm.dtype(), norm.device())).to(Device::cpu()));
    }
    if (opts_.grad_clip > 0) {
      const Tensor coef = optim::clip_coefficient(norm, opts_.grad_clip);
      factor = factor.defined() ? factor * coef : coef;
    }
    update(params, grads, skip, factor);  // sharded: a skipped update gathers the unchanged parts
    return TensorList{loss, norm};
  };
}

namespace {
std::pair<std::vector<std::string>, TensorList> batch_args(const Batch& batch) {
  std::vector<std::string> keys;
  TensorList args;
  for (const auto& [k, t] : batch.items) keys.push_back(k), args.push_back(t);
  return {keys, args};
}

void check_eval_batch(const EvalSpec& eval) {
  if (eval.batch_size < 1)  // the evaluation loop would never advance
    throw ValueError("EvalSpec::batch_size must be >= 1", ">= 1 examples per evaluation batch",
                     std::to_string(eval.batch_size), "set the evaluation batch size (data.eval_batch_size)");
}

void check_fit_options(const FitOptions& fo) {
  const std::pair<const char*, int64_t> counts[] = {{"steps", fo.steps}, {"stop_at", fo.stop_at},
                                                    {"log_every", fo.log_every}, {"checkpoint_every", fo.checkpoint_every},
                                                    {"eval.every", fo.eval.every}};
  for (const auto& [name, v] : counts)
    if (v < 0)
      throw ValueError(std::string("FitOptions::") + name + " must be >= 0", ">= 0 (0 = off / the default)",
                       std::to_string(v));
  if (fo.eval.data) check_eval_batch(fo.eval);
}
}  // namespace

StepResult Engine::jit_step(nn::Module& model, const LossFn& loss_fn, const Batch& batch) {
  check_jit(model, batch);
  auto [keys, args] = batch_args(batch);
  using LossPtr = Tensor (*)(nn::Module&, const Batch&);
  const LossPtr* fp = loss_fn.target<LossPtr>();
  const std::pair<const std::type_info*, const void*> loss_id{&loss_fn.target_type(), fp ? reinterpret_cast<const void*>(*fp) : nullptr};
  const ParamTree trainable = model.trainable_parameters();
  if (!jit_step_ || jit_model_ != &model || jit_keys_ != keys || jit_loss_ != loss_id || jit_trainable_ != trainable.paths()) {
    jit_model_ = &model;
    jit_keys_ = keys;
    jit_loss_ = loss_id;
    jit_trainable_ = trainable.paths();
    jit_step_ = std::make_unique<jit::Compiled>(step_function(model, loss_fn, keys));
  }
  begin_step(model, trainable);
  StepResult r;
  r.lr = opt_->lr();
  r.loss_scale = scaler_ ? scaler_->scale() : 1.0;
  const int64_t skipped = scaler_ ? scaler_->skipped_steps() : 0;
  const TensorList out = (*jit_step_)(args);
  r.loss = out[0].item();
  r.grad_norm = out[1].item();
  r.skipped = scaler_ && scaler_->skipped_steps() > skipped;
  return r;
}

jit::Graph Engine::trace_step(nn::Module& model, const LossFn& loss_fn, const Batch& local_batch) {
  const Batch batch = local_batch.to(model.device());
  check_jit(model, batch);
  auto [keys, args] = batch_args(batch);
  begin_step(model, model.trainable_parameters());
  jit::Graph g = jit::trace(step_function(model, loss_fn, keys), args);
  jit::optimize_for_replay(g);  // the options of the engine's jit step (the defaults)
  return g;
}

const jit::JitStats* Engine::jit_stats() const { return jit_step_ ? &jit_step_->stats() : nullptr; }

Metrics Engine::evaluate(nn::Module& model, const EvalSpec& eval) {
  Metrics out;
  if (!eval.data) return out;
  check_eval_batch(eval);
  NoGradGuard ng;
  model.eval();
  const int64_t N = eval.data->size();
  const int shards = dp_size(), me = plan_.dp ? mesh_.axis_index(plan_.dp->axis) : 0;
  if (N < shards)
    throw ValueError("the evaluation set is smaller than the number of data-parallel ranks",
                     "at least " + std::to_string(shards) + " examples", std::to_string(N) + " examples");
  const int64_t lo = N * me / shards, hi = N * (me + 1) / shards;
  Metrics sums;
  nn::PipelineModule* pm = plan_.pp ? &pipeline_module(model) : nullptr;
  const Device device = model.device();
  for (int64_t s = lo; s < hi; s += eval.batch_size) {
    std::vector<int64_t> idx;
    for (int64_t i = s; i < std::min(hi, s + eval.batch_size); ++i) idx.push_back(i);
    const Batch b = eval.data->get(idx).to(device);
    if (pm) pipeline_eval_batch(*pm, b, sums);
    else
      for (const auto& [k, v] : eval.fn(model, b)) sums[k] += v;
  }
  if (pm) {  // the sums live on the last stage: every stage reports them
    Tensor t = from_vector(std::vector<double>{sums["loss"], sums["count"]}, Shape{2});
    mesh_.comm(plan_.pp->axis).broadcast(t, pm->pipeline_stages() - 1);
    sums = {{"loss", t.to_vector<double>()[0]}, {"count", t.to_vector<double>()[1]}};
  }
  model.train(true);
  // Sum over the data-parallel ranks in a fixed key order (every rank has the same keys).
  std::vector<std::string> keys;
  for (const auto& [k, v] : sums) keys.push_back(k);
  if (shards > 1) {
    Tensor t = zeros(Shape{int64_t(keys.size())}, DType::f64);
    double* p = t.data<double>();
    for (size_t i = 0; i < keys.size(); ++i) p[i] = sums[keys[i]];
    mesh_.comm(plan_.dp->axis).all_reduce(t);
    for (size_t i = 0; i < keys.size(); ++i) sums[keys[i]] = p[i];
  }
  const double count = sums.count("count") ? sums["count"] : 0;
  for (const auto& [k, v] : sums)
    if (k != "count") out["eval/" + k] = count > 0 ? v / count : 0.0;
  return out;
}

// One evaluation batch through the stages: each stage receives the previous stage's activation
// (blocking; stages run batches back to back, so consecutive batches overlap across stages), computes,
// and sends on; the last stage adds the summed loss and the number of targets to `sums`.
void Engine::pipeline_eval_batch(nn::PipelineModule& pm, const Batch& b, Metrics& sums) {
  Communicator& pipe = mesh_.comm(plan_.pp->axis);
  const int s = pm.pipeline_stage(), S = pm.pipeline_stages();
  Tensor x;
  if (s > 0) {
    const TensorSpec sp = pm.stage_input_spec(b);
    x = empty(sp.shape, sp.dtype, sp.device);
    pipe.recv(x, s - 1, 0);
  }
  Tensor y = pm.stage_forward(x, b, Reduction::sum);
  if (s < S - 1) {
    pipe.send(y, s + 1, 0);
    return;
  }
  sums["loss"] += y.item();
  sums["count"] += double(b["y"].numel());
}

ParamTree Engine::state_tree(nn::Module& model, FlatParts& flat) {
  ParamTree params = model.parameters();
  if (shards_optimizer()) ensure_zero(model.trainable_parameters());
  else if (opt_->state().size() <= 1) opt_->init(model.trainable_parameters());  // the moments, for loading to fill
  ParamTree t;
  for (const auto& [p, v] : params) t.insert("params/" + p, v);  // frozen ones too: the whole model
  for (const auto& [p, v] : opt_->state()) t.insert("opt/" + p, v);
  // Sharded: each per-parameter entry is this rank's part of the parameter's elements (ZeroShards::range), saved
  // and loaded as such (nothing gathered); the checkpoint holds whole tensors either way, so it does not depend
  // on sharding or the DP degree.
  if (zero_) {
    const std::vector<std::string> paths = zero_->paths();
    for (const auto& [kind, parts] : state_by_kind(opt_->state()))
      for (size_t i = 0; i < paths.size(); ++i)
        if (parts.contains(paths[i]))
          flat["opt/" + kind + "/" + paths[i]] = FlatPart{params.at(paths[i]).shape(), zero_->range(i).first};
  }
  if (scaler_) {
    t.insert("scaler/scale", scaler_->scale_tensor());
    t.insert("scaler/good", scaler_->good_tensor());
    t.insert("scaler/skipped", scaler_->skipped_tensor());
  }
  return t;
}

std::map<std::string, PartitionSpec> Engine::state_specs(nn::Module& model, const ParamTree& state) {
  std::map<std::string, PartitionSpec> specs;  // each split parameter ("params/<path>") and its optimizer
  if (!plan_.tp) return specs;                 // state ("opt/m/<path>", ...) share the parameter's spec
  auto ps = partition_specs(model);
  for (const auto& [name, v] : state) {
    std::string rest;
    if (name.rfind("params/", 0) == 0) rest = name.substr(7);
    else if (name.rfind("opt/", 0) == 0 && name.find('/', 4) != std::string::npos) rest = name.substr(name.find('/', 4) + 1);
    auto it = ps.find(rest);
    if (it != ps.end() && is_sharded(it->second)) specs[name] = it->second;
  }
  return specs;
}

void Engine::save(nn::Module& model) { save_impl(model, false); }

void Engine::save_async(nn::Module& model) { save_impl(model, true); }

void Engine::save_impl(nn::Module& model, bool async) {
  if (!opts_.checkpointer)
    throw ValueError(std::string(async ? "save_async" : "save") + "() without a checkpointer", "EngineOptions::checkpointer set", "none");
  FlatParts flat;
  ParamTree t = state_tree(model, flat);
  const auto specs = state_specs(model, t);
  if (async) opts_.checkpointer->save_async(global_step(), t, specs, mesh_, "{}", plan_.to_json(), flat);
  else opts_.checkpointer->save(global_step(), t, specs, mesh_, "{}", plan_.to_json(), flat);
}

std::optional<int64_t> Engine::restore(nn::Module& model) {
  if (!opts_.checkpointer) return std::nullopt;
  auto latest = opts_.checkpointer->latest();
  if (!latest) return std::nullopt;
  FlatParts flat;
  ParamTree t = state_tree(model, flat);
  // Resharding load: the checkpoint may come from another TP degree, mesh or number of ranks, with or without
  // the optimizer state sharded. A pipeline stage loads only its own tensors; the stages together must load
  // every saved one.
  const CheckpointInfo info = opts_.checkpointer->load(*latest, t, state_specs(model, t), mesh_, plan_.pp.has_value(), flat);
  if (plan_.pp) {
    std::string mine;
    for (const auto& [name, v] : t) mine += name + "\n";
    std::set<std::string> loaded;
    for (const auto& names : mesh_.comm(plan_.pp->axis).all_gather_string(mine))
      for (size_t a = 0, b; a < names.size(); a = b + 1) loaded.insert(names.substr(a, (b = names.find('\n', a)) - a));
    for (const auto& name : info.saved_tensors)
      if (!loaded.count(name))
        throw CheckpointError("checkpoint step " + std::to_string(*latest) + " in '" + opts_.checkpointer->dir() +
                                  "' holds tensor '" + name + "' that no pipeline stage of this model has",
                              "only tensors of this model", "'" + name + "'", "the checkpoint is from another model");
  }
  return *latest;
}

namespace {
bool eval_due(const FitOptions& fo, int64_t step) {
  if (!fo.eval.data) return false;
  return step == fo.steps || (fo.eval.every > 0 && step % fo.eval.every == 0);
}
}  // namespace

FitResult Engine::fit(nn::Module& model, const LossFn& loss, DataLoader& data, const FitOptions& fo) {
  check_fit_options(fo);  // before any step: a bad evaluation batch must not surface after the training
  if (opts_.checkpointer) opts_.checkpointer->prepare();  // nor an unwritable checkpoint directory
  FitResult res;
  if (fo.resume)
    if (auto s = restore(model)) {
      res.resumed_from = *s;
      if (mesh_.rank() == 0) spdlog::info("resumed from checkpoint step {} in {}", *s, opts_.checkpointer->dir());
    }
  std::vector<std::shared_ptr<Logger>> loggers = fo.loggers;
  if (loggers.empty()) loggers.push_back(std::make_shared<ConsoleLogger>(fo.steps));
  const bool main = mesh_.rank() == 0;
  auto log = [&](int64_t step, const Metrics& m) {
    if (main)
      for (auto& l : loggers) l->log(step, m);
  };

  data.seek(global_step());
  const int64_t global_batch = data.options().batch_size;
  auto t_start = std::chrono::steady_clock::now();
  auto t_last = t_start;
  int64_t steps_since = 0, steps_done = 0, eval_step = -1;
  const int64_t end = fo.stop_at > 0 ? std::min(fo.stop_at, fo.steps) : fo.steps;
  while (global_step() < end) {
    Batch b = data.next();
    StepResult r = step(model, loss, b);
    ++steps_since;
    ++steps_done;
    res.final_loss = r.loss;
    const int64_t s = global_step();
    if (!std::isfinite(r.loss) && !r.skipped)
      throw ValueError("the training loss is not finite at step " + std::to_string(s), "a finite loss",
                       std::to_string(r.loss), "lower the learning rate or enable grad_clip; to find the op that made it, run with anomaly detection "
                       "(debug.nans: true, or TITANAX_DEBUG_NANS=1)");
    bool log_now = fo.log_every > 0 && (s % fo.log_every == 0 || s == fo.steps);
    bool eval_now = eval_due(fo, s);
    if (log_now) {
      auto now = std::chrono::steady_clock::now();
      double dt = std::chrono::duration<double>(now - t_last).count();
      Metrics m{{"train/loss", r.loss}, {"train/lr", r.lr}, {"train/grad_norm", r.grad_norm},
                {"train/samples_per_s", dt > 0 ? double(global_batch * steps_since) / dt : 0.0},
                {"train/step_ms", steps_since ? 1e3 * dt / double(steps_since) : 0.0}};
      if (scaler_) {
        m["train/loss_scale"] = scaler_->scale();
        m["train/skipped_steps"] = double(scaler_->skipped_steps());
      }
      if (eval_now) {
        res.final_eval = evaluate(model, fo.eval);
        eval_step = s;
        for (const auto& [k, v] : res.final_eval) m[k] = v;
      }
      log(s, m);
      t_last = std::chrono::steady_clock::now();
      steps_since = 0;
    } else if (eval_now) {
      Metrics m = evaluate(model, fo.eval);
      res.final_eval = m;
      eval_step = s;
      log(s, m);
    }
    if (opts_.checkpointer && opts_.checkpointer->pending()) opts_.checkpointer->poll();
    if (opts_.checkpointer && fo.checkpoint_every > 0 && s % fo.checkpoint_every == 0 && s < end) save_impl(model, fo.async_checkpoint);
  }
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  res.samples_per_s = res.seconds > 0 ? double(global_batch * steps_done) / res.seconds : 0;
  res.steps = global_step();
  res.steps_run = steps_done;
  if (fo.eval.data && eval_step != global_step()) {  // stopped early, or nothing left to train: still report
    res.final_eval = evaluate(model, fo.eval);
    log(global_step(), res.final_eval);
  }
  if (opts_.checkpointer && steps_done > 0) save(model);
  for (auto& l : loggers) l->flush();
  return res;
}

}  // namespace titanax
