// The engine: one training step (microbatched gradient accumulation, data-parallel gradient averaging
// overlapped with backward, clipping, the optimizer update) and the fit loop around it (periodic eval,
// logging, checkpoints, resume).
//
//   tx::Engine engine(mesh, plan, tx::optim::adamw(tx::optim::warmup_cosine(1e-3, 100, 3000)));
//   engine.fit(model, loss, loader, {.steps = 3000, .log_every = 50, .eval = {.data = test, .every = 500}});
//
// Tensor parallelism (Plan::tp): the model holds only its block of each split parameter and runs the
// collectives itself (nn::GPT built with the mesh; parallel/tp.h). The engine takes each parameter's
// PartitionSpec from the model (nn::Module::partition_specs()) or, when the model does not say (an empty
// map), from the plan's TP rules; when both exist they must agree (PlanError naming the first parameter
// that differs, e.g. a plan with TP rules and a model built without the mesh). With those specs:
//   * gradients of split parameters stay local (each rank owns its block): nothing is all-reduced over
//     the TP axis; data-parallel averaging runs over the DP axis only (its groups hold ranks with the
//     same TP index, hence the same blocks);
//   * global gradient-norm clipping is TP-aware: squares of split parameters are summed over the TP axis,
//     replicated ones counted once (optim::global_norm(grads, specs, mesh)), so every rank clips by the
//     same factor as the unsplit model would;
//   * the reported loss is the mean over the global batch (TP ranks hold the same loss; the mean runs
//     over the DP axis), and per-step randomness is the same on the ranks of a TP group;
//   * checkpoints record each parameter's (and its optimizer moments') spec.
//
// Optimizer sharding (DP::shard_optimizer, ZeRO stage 1; parallel/zero.h): each rank of the DP axis
// keeps the optimizer state of its 1 / n part of every trainable parameter. The step reduce-scatters the
// gradients (no overlap with the backward: after it), clips by the norm of the parts (squares summed over
// the DP axis, and the TP axis for split parameters), updates its parts and all-gathers them into every
// rank's whole parameters; eager, under jit, and per pipeline stage. Checkpoints hold the whole
// optimizer state (all-gathered at save, each rank's part taken at restore), so they load with or without
// sharding, at any DP degree.
//
// Pipeline parallelism (Plan::pp): the model is an nn::PipelineModule built on the mesh's pipe axis
// (nn::GPT with GPTConfig.pp_axis), holding one stage. step() cuts the local batch into PP::microbatches
// and runs run_pipeline() (parallel/pipeline.h) with the plan's schedule and recompute policy; tied
// parameters (GPT's token embedding on the first and last stage) get the sum of both stages'
// gradients; DP averages each stage's gradients over its DP group; the clipping norm is TP-aware per
// stage and summed over the stages (a tied weight counted once); the loss comes from the last stage.
// evaluate() runs the batches through the stages (forward only; the metrics are the last stage's
// summed loss and the number of targets, as lm_metrics reports them); restore() loads each stage's own
// tensors and checks that the stages together loaded every saved one.
//
// Determinism: a step's result depends only on the seed, the step number and the data, never on wall
// clock or thread scheduling, so a resumed run is bitwise identical to an uninterrupted one (same rank
// count), and different rank counts agree to rounding.
#pragma once

#include <algorithm>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#include "engine/logger.h"
#include "engine/loss_scale.h"
#include "engine/nn.h"
#include "engine/pipeline_module.h"
#include "engine/optim.h"
#include "io/checkpoint.h"
#include "io/data.h"
#include "parallel/mesh.h"
#include "parallel/pipeline.h"
#include "parallel/plan.h"

namespace titanax {

class GradientSync;
class ZeroShards;
namespace jit {
class Compiled;
class Graph;
struct JitStats;
}  // namespace jit

/// Dtypes of the master weights and of the computation (mixed precision, Micikevicius et al. 2018): the
/// parameters, their gradients and the optimizer state stay f32; with bf16 / fp16 compute the Engine runs
/// the loss function under autocast (core/op.h AutocastGuard, PyTorch's torch.autocast op lists: GEMMs
/// in the compute dtype, softmax / cross-entropy / layer-norm / sums in f32), and the loss is f32. The
/// backward follows the forward's dtypes; gradients reach the f32 parameters through the casts. On the
/// CPU the 16-bit ops compute in f32 and round (correct, not fast); on CUDA the GEMMs are native cuBLASLt
/// bf16 / fp16. Data-parallel plans only (PlanError with TP or PP axes of size > 1).
struct Precision {
  DType params = DType::f32;
  DType compute = DType::f32;
  static Precision f32() { return {}; }
  static Precision bf16() { return {DType::f32, DType::bf16}; }
  /// f32 master weights, fp16 compute; the Engine then scales the loss dynamically unless
  /// EngineOptions::loss_scale says otherwise (fp16's range needs it; bf16's does not).
  static Precision fp16() { return {DType::f32, DType::f16}; }
  std::string str() const;
};


/// Scalar loss of a batch (mean over its examples).
using LossFn = std::function<Tensor(nn::Module&, const Batch&)>;
/// Per-batch SUMS of metrics ("loss", "correct", ...) plus "count" (examples); the engine sums over
/// batches and ranks and divides by count.
using EvalFn = std::function<Metrics(nn::Module&, const Batch&)>;

/// Cross-entropy loss of model(batch["x"]) against batch["y"].
Tensor classification_loss(nn::Module& model, const Batch& b);
/// {"loss": sum of cross-entropies, "accuracy": number correct, "count": examples}.
Metrics classification_metrics(nn::Module& model, const Batch& b);

struct EvalSpec {
  std::shared_ptr<const Dataset> data;  ///< none = no evaluation
  int64_t every = 0;                    ///< steps between evaluations (0 = only at the end)
  int64_t batch_size = 1000;
  EvalFn fn = classification_metrics;
};

struct EngineOptions {
  Precision precision = Precision::f32();
  /// Saves / resumes checkpoints when set.
  std::shared_ptr<Checkpointer> checkpointer;
  /// Seeds dropout and other per-step randomness (fold_in(fold_in(fold_in(seed, rank), call), step)).
  uint64_t seed = 0;
  /// Global gradient-norm clipping threshold (0 = off): every gradient times
  /// optim::clip_coefficient(norm, grad_clip), applied inside the fused optimizer update (its grad_factor,
  /// with the loss scaler's 1 / S).
  double grad_clip = 0.0;
  /// Loss scaling (engine/loss_scale.h): none by default; dynamic when precision is fp16 and this is
  /// left at none. Data- and tensor-parallel steps, eager or under jit (the scaler's decision is then an
  /// op of the graph: LossScaler::update_traced, Optimizer::step's skip); PlanError with pipeline parallelism.
  LossScaleOptions loss_scale;
  /// Bucket size for data-parallel all-reduces (reduce-scatters and all-gathers with DP::shard_optimizer).
  size_t bucket_bytes = 25u << 20;
  /// Compile the training step with the JIT (jit/graph.h): the first step of each batch signature is
  /// traced (forward, the tape's backward, clipping and the optimizer update: one graph) and later steps
  /// replay the optimised graph. Data- and tensor-parallel plans (every rank on the DP and TP axes: the
  /// gradient and loss averages are pmean collectives in the graph, gradients packed in buckets of
  /// bucket_bytes; Megatron's f / g, the vocabulary shard and the TP-aware gradient norm are nodes too;
  /// no Plan::pp): PlanError otherwise, pipeline plans at construction. Dropout keys are folded with
  /// the optimizer's step counter when the op runs (nn::RngContext), so each replay draws eager's masks.
  /// A step with another model, other batch keys or a loss function of another callable type (or
  /// another function pointer) compiles anew; a loss of the same lambda type with other captured values
  /// cannot be told apart and replays the first one's graph: use another Engine for it.
  bool jit = false;
};

struct FitOptions {
  int64_t steps = 1000;           ///< total optimizer steps of the run (a resumed run continues to this)
  int64_t stop_at = 0;            ///< stop (and checkpoint) once this global step is reached, keeping the
                                  ///< schedule of `steps`: splits a run over job time limits (0 = off)
  int64_t log_every = 50;
  int64_t checkpoint_every = 0;   ///< 0 = only at the end (when a checkpointer is set)
  /// Write the checkpoint_every checkpoints in the background (Checkpointer::save_async): the step waits
  /// only for the copy of this rank's blocks to host memory; each later step polls (one small all-gather)
  /// and commits the checkpoint once every rank has written its shard. The final checkpoint is
  /// synchronous (it commits the pending one first). A failed background write throws from the step
  /// that polls it.
  bool async_checkpoint = false;
  bool resume = true;             ///< continue from the latest checkpoint when there is one
  EvalSpec eval;
  std::vector<std::shared_ptr<Logger>> loggers;  ///< empty = console
};

struct StepResult {
  double loss = 0;       ///< mean over the global batch
  double grad_norm = 0;  ///< before clipping
  double lr = 0;         ///< the learning rate the step used
  double loss_scale = 1; ///< the loss scale the step used (1 without loss scaling)
  bool skipped = false;  ///< the gradients had an inf / NaN: no update (loss scaling only)
};

struct FitResult {
  int64_t steps = 0;          ///< optimizer steps done in total (including resumed ones)
  int64_t steps_run = 0;      ///< steps this call ran (0 when the resumed checkpoint had reached opts.steps)
  int64_t resumed_from = -1;  ///< checkpoint step resumed from, or -1
  double final_loss = 0;      ///< train loss of the last step this call ran (0 when it ran none)
  Metrics final_eval;         ///< metrics of the final evaluation ("eval/accuracy", ...)
  double seconds = 0;
  double samples_per_s = 0;   ///< global examples per second over the run
};

class Engine {
 public:
  /// Validates `plan` against `mesh` (PlanError) and the precision (DTypeError); ValueError for a
  /// negative or NaN grad_clip.
  Engine(const Mesh& mesh, Plan plan, std::unique_ptr<optim::Optimizer> opt, EngineOptions opts = {});
  ~Engine();

  /// Trains until opts.steps optimizer steps are done. Before the first step: ValueError for a negative
  /// count in `opts` or an evaluation batch_size below 1; with a checkpointer, Checkpointer::prepare()
  /// (its directory created and writable, or IOError / CheckpointError on every rank).
  FitResult fit(nn::Module& model, const LossFn& loss, DataLoader& data, const FitOptions& opts);
  /// Devices: the model computes where its parameters are (nn::Module::to); step(), evaluate() and
  /// trace_step() move each batch there (the loader's batches are CPU tensors). Scalars the engine
  /// reports (loss, gradient norm, metrics) are read back to the host.
  ///
  /// One optimizer step on this rank's part of a global batch (split into accumulate_steps microbatches,
  /// or under Plan::pp into PP::microbatches run by the pipeline schedule; loss_fn is then unused: the
  /// stages compute the loss). Throws PlanError when the local batch does not divide into the
  /// microbatches, or under Plan::pp when the model is not an nn::PipelineModule on the plan's pipe axis;
  /// ValueError when the loss carries no gradient history (computed under NoGradGuard, from detach()ed
  /// outputs or item() values: every gradient would be zero).
  StepResult step(nn::Module& model, const LossFn& loss, const Batch& local_batch);
  /// Evaluates on the whole dataset (each data-parallel rank takes a contiguous shard), in eval mode,
  /// without recording; returns "eval/<name>" = sum / count for each metric. ValueError for a
  /// batch_size below 1 or a dataset smaller than the data-parallel ranks.
  Metrics evaluate(nn::Module& model, const EvalSpec& eval);

  /// Saves parameters and optimizer state at the current step (collective), with each tensor's
  /// PartitionSpec and this mesh, so the checkpoint can be loaded under another layout.
  void save(nn::Module& model);
  /// save() through Checkpointer::save_async: returns once this rank's part is copied to host memory,
  /// and the checkpoint is committed by a later Checkpointer::poll() / wait() / save (fit() polls after
  /// each step).
  void save_async(nn::Module& model);
  /// Loads the latest checkpoint into the model and optimizer; returns its step, or nullopt if none.
  /// The checkpoint may come from another TP degree, mesh or world size: each rank reads its own slices
  /// (Checkpointer's resharding load); CheckpointError when it holds another model.
  std::optional<int64_t> restore(nn::Module& model);

  /// Optimizer steps done.
  /// Steps taken: optimizer updates plus steps skipped by the loss scaler (each consumed a batch).
  int64_t global_step() const;
  /// The loss scaler (nullptr without loss scaling).
  const LossScaler* loss_scaler() const { return scaler_.get(); }
  /// The optimizer. With DP::shard_optimizer over more than one rank its state() holds this rank's parts
  /// of the per-parameter tensors (1-d, ZeroShards' ranges; whole in checkpoints).
  optim::Optimizer& optimizer() { return *opt_; }
  const Plan& plan() const { return plan_; }
  const Mesh& mesh() const { return mesh_; }
  /// The PartitionSpec of every parameter of `model` as the engine uses it (empty specs = replicated):
  /// from the model and the plan's TP rules as described above; all replicated without Plan::tp. Throws
  /// PlanError when the model's specs and the plan's rules disagree, or a spec names an axis other than
  /// the TP axis.
  std::map<std::string, PartitionSpec> partition_specs(nn::Module& model) const;

  /// The graph of one training step on `local_batch` as EngineOptions::jit compiles it and replays it
  /// (traced, then jit::optimize_for_replay: fused, updates in place, the memory plan); tracing runs
  /// the step once, so the model and optimizer take that step.
  /// For `titanax describe --graph`. Throws what jit steps throw (PlanError, ValueError).
  jit::Graph trace_step(nn::Module& model, const LossFn& loss, const Batch& local_batch);
  /// Counters of the compiled step under EngineOptions::jit (nullptr before the first step or without jit).
  const jit::JitStats* jit_stats() const;
  /// Measurements of the last pipelined step on this rank (zeros without Plan::pp).
  const PipelineStats& last_pipeline_stats() const { return last_pipeline_stats_; }

 private:
  StepResult pipeline_step(nn::Module& model, const Batch& local_batch);
  StepResult jit_step(nn::Module& model, const LossFn& loss, const Batch& local_batch);
  /// The plan's accumulate_steps; PlanError when the batch does not split into that many microbatches.
  int accumulate_steps(const Batch& batch) const;
  /// The optimizer's grad_factor for an eager step whose gradients are scaled by the loss scale `scale`
  /// (1 without loss scaling) and whose unscaled global norm is `norm`: 1 / scale times the clipping
  /// coefficient when that is below 1, as an f64 CPU scalar; none when it is 1.
  Tensor grad_factor(double norm, double scale) const;
  /// PlanError / ValueError when the JIT cannot compile this step (see EngineOptions::jit).
  void check_jit(nn::Module& model, const Batch& batch) const;
  /// One whole training step over the batch tensors (in `keys` order) -> {loss, gradient norm}.
  std::function<TensorList(const TensorList&)> step_function(nn::Module& model, const LossFn& loss,
                                                             const std::vector<std::string>& keys);
  /// Per-step setup of both step paths: the gradient sync (first step, with DP), the step's RNG key,
  /// training mode.
  void begin_step(nn::Module& model, const ParamTree& params);
  /// The mean of v over the data-parallel ranks (collective over the DP axis; v itself without DP).
  double dp_mean(double v) const;
  void pipeline_eval_batch(nn::PipelineModule& pm, const Batch& b, Metrics& sums);
  /// The model as pipeline stages matching the plan's pipe axis; PlanError otherwise.
  nn::PipelineModule& pipeline_module(nn::Module& model) const;
  /// What a checkpoint holds: "params/<path>" (every parameter), "opt/<name>" (the optimizer's state) and
  /// the loss scaler's; `flat` gets the entries that are flat parts (the sharded optimizer state's).
  ParamTree state_tree(nn::Module& model, FlatParts& flat);
  /// ValueError unless `params` are the trainable parameters `made_for` (the paths of the first step's).
  void check_trainable(const std::vector<std::string>& made_for, const ParamTree& params) const;
  /// True when the plan shards the optimizer state over more than one DP rank.
  bool shards_optimizer() const;
  /// The first (smaller) gradient bucket of the overlapped collectives: min(bucket_bytes, 1 MiB), so
  /// communication starts early in backward (PyTorch DDP's first bucket).
  size_t first_bucket_bytes() const { return std::min<size_t>(opts_.bucket_bytes, 1u << 20); }
  /// Makes zero_ for `params` on first use, with the optimizer's state for its parts (collective over
  /// the DP axis); ValueError when `params` are not those it was made for.
  void ensure_zero(const ParamTree& params);
  /// The specs the gradient norm sums squares by (optim::global_norm): the TP specs, with the DP axis added
  /// to every parameter when the gradients are this rank's parts of them (ZeroShards::norm_specs).
  std::map<std::string, PartitionSpec> norm_specs(const std::map<std::string, PartitionSpec>& tp_specs) const;
  /// Hands trainable parameter k's final gradient to the overlapped bucketed all-reduce (sync_) or
  /// reduce-scatter (zero_); one of them must exist.
  void report_grad(size_t k, const Tensor& grad);
  /// The optimizer step of every path: opt_->step(params, ...), or with the state sharded the step of this
  /// rank's parts (grads are then their gradients) and the all-gather of the updated parts into params.
  void update(ParamTree& params, const ParamTree& grads, const Tensor& skip, const Tensor& grad_factor);
  std::map<std::string, PartitionSpec> state_specs(nn::Module& model, const ParamTree& state);
  void save_impl(nn::Module& model, bool async);
  int dp_size() const;
  /// The loss of one microbatch under the precision policy: loss_fn under autocast to the compute
  /// dtype (core/op.h AutocastGuard; none for f32), the loss itself in f32.
  Tensor policy_loss(nn::Module& model, const LossFn& loss_fn, const Batch& mb) const;
  uint64_t replica_rank() const;
  Mesh mesh_;
  Plan plan_;
  std::unique_ptr<optim::Optimizer> opt_;
  EngineOptions opts_;
  std::unique_ptr<GradientSync> sync_;
  std::unique_ptr<ZeroShards> zero_;  // with DP::shard_optimizer (then no sync_)
  std::unique_ptr<LossScaler> scaler_;
  PipelineStats last_pipeline_stats_;
  std::unique_ptr<jit::Compiled> jit_step_;
  // What jit_step_ was made for: another model, loss function or set of batch keys makes a new one. The
  // loss is told apart by its callable's type, and by the function itself when it is a function pointer
  // (two lambdas of one type with different captures look alike to std::function).
  const nn::Module* jit_model_ = nullptr;
  std::vector<std::string> jit_keys_;
  std::vector<std::string> jit_trainable_;  // the parameters the compiled step updates (set_trainable)
  std::pair<const std::type_info*, const void*> jit_loss_{nullptr, nullptr};
};

}  // namespace titanax
