// Optimizers, learning-rate schedules and gradient clipping.
//
// Updates follow torch.optim exactly (same formulas, same order of operations), so a Titanax run and a
// PyTorch run from the same initial weights and batches follow the same trajectory up to rounding.
// Updates run in place on the parameters' storage with fused CPU kernels (kernels/cpu/optim.h).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <memory>
#include <string>

#include "core/tree.h"
#include "parallel/mesh.h"

namespace titanax::optim {

/// Learning rate as a function of the (0-based) step. The schedules below throw ValueError for a
/// learning rate or final_ratio that is negative, infinite or NaN, and for the bad counts they name.
using Schedule = std::function<double(int64_t step)>;

Schedule constant(double lr);
/// Cosine decay from lr to lr * final_ratio over total_steps (then flat): lr * (r + (1 - r) * 0.5 (1 + cos(pi t / T))).
Schedule cosine(double lr, int64_t total_steps, double final_ratio = 0.0);
/// Linear warm-up from lr / warmup to lr over `warmup` steps (step s gets lr * (s + 1) / warmup), then
/// cosine decay to lr * final_ratio at total_steps (as nanoGPT / llm.c).
Schedule warmup_cosine(double lr, int64_t warmup, int64_t total_steps, double final_ratio = 0.0);
/// lr * rate^(step / decay_steps) (continuous).
Schedule exponential(double lr, double rate, int64_t decay_steps);

/// Which parameters get weight decay (default: all). E.g. matrices only: [](auto&, const Tensor& t) { return t.dim() >= 2; }.
using DecayFilter = std::function<bool(const std::string& path, const Tensor& t)>;

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  /// Creates the state for `params` (zeros); called once before the first step (step() calls it lazily
  /// with the parameters it is given). `like` (empty: `params` themselves) holds, by path, the tensors
  /// per-parameter choices are made on (AdamOptions::decay_filter): the whole parameters when `params`
  /// are this rank's parts of them (ZeroShards::masters(), parallel/zero.h). ValueError for a path of
  /// `params` missing from a non-empty `like`.
  virtual void init(const ParamTree& params, const ParamTree& like = {}) = 0;
  /// One update of `params` in place with `grads` (same paths, shapes and dtypes; ValueError otherwise)
  /// at learning rate schedule(steps()); then steps() increases by one. `skip` (optional, a 0-d bool CPU
  /// tensor) is read when the update runs, in a traced step (jit/graph.h) at every replay: true leaves
  /// the parameters, the optimizer state and steps() unchanged (loss scaling's skipped step).
  /// `grad_factor` (optional, a 0-d floating tensor on the CPU or the parameters' device; ValueError
  /// otherwise): every gradient is multiplied by it, rounded to the gradient's dtype, inside the fused
  /// update, as if `grads` had been scaled first (bitwise the same), without a pass over the gradients
  /// of its own: the clipping coefficient of clip_coefficient below. Eagerly its value is read once
  /// (a device tensor waits for its stream); traced, the graph computes it at every replay. Note that
  /// it multiplies, where torch's fused Adam divides by its grad_scale (a loss scale).
  virtual void step(ParamTree& params, const ParamTree& grads, const Tensor& skip = {}, const Tensor& grad_factor = {}) = 0;
  /// The state as named tensors ("m/<path>", "v/<path>", "step"): the optimizer's own tensors, so
  /// loading a checkpoint into them (in place) restores the optimizer.
  virtual ParamTree state() const = 0;
  virtual std::string describe() const = 0;
  /// Updates done so far.
  int64_t steps() const;
  /// The step counter itself (0-d i64 on the CPU, the "step" of state()): read live by a traced step
  /// (jit) and by the dropout keys the Engine derives from it.
  const Tensor& step_tensor() const { return step_; }
  /// The learning rate the next step uses.
  double lr() const { return schedule_(steps()); }

 protected:
  explicit Optimizer(Schedule s);
  Schedule schedule_;
  Tensor step_;  // i64 scalar: part of state(), restored by checkpoints
};

struct AdamOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  DecayFilter decay_filter;  ///< empty = decay every parameter
};

/// The factories throw ValueError for a negative, infinite or NaN momentum or weight_decay, Adam betas
/// outside [0, 1), an eps that is not finite and > 0, and Nesterov without momentum.
/// SGD with (Nesterov) momentum and L2 weight decay (torch.optim.SGD).
std::unique_ptr<Optimizer> sgd(Schedule lr, double momentum = 0.0, double weight_decay = 0.0, bool nesterov = false);
/// Adam (Kingma & Ba 2015) with L2 weight decay added to the gradient (torch.optim.Adam).
std::unique_ptr<Optimizer> adam(Schedule lr, AdamOptions opts = {});
/// AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019; torch.optim.AdamW, whose default
/// weight_decay is 0.01).
std::unique_ptr<Optimizer> adamw(Schedule lr, AdamOptions opts = {.weight_decay = 0.01});

/// Global L2 norm over every gradient (accumulated in double, independent of the thread count).
double global_norm(const ParamTree& grads);
/// Scales every gradient in place by max_norm / norm when the global norm exceeds max_norm
/// (torch.nn.utils.clip_grad_norm_, with its 1e-6 guard). Returns the norm before clipping.
double clip_grad_norm(ParamTree& grads, double max_norm);
/// clip_grad_norm's scaling when the global norm is already known (norm: global_norm of grads, however
/// computed, e.g. TP-aware): every gradient times max_norm / (norm + 1e-6) when that is below 1.
/// ValueError unless max_norm > 0.
void clip_to_norm(ParamTree& grads, double norm, double max_norm);

/// global_norm and clip_grad_norm written with ops (the norm as an f64 scalar tensor; no value is read
/// on the host), so a traced training step (jit/graph.h) computes them at every replay: the sum of
/// squares in f64 and, when clipping, every gradient multiplied by min(max_norm / (norm + 1e-6), 1)
/// (torch.nn.utils.clip_grad_norm_'s clamped coefficient; a factor of exactly 1 leaves a gradient
/// bitwise unchanged, as the eager form's skipped scaling does). Equal to the double versions up to the
/// order of the f64 summation. ValueError for max_norm <= 0.
Tensor global_norm_tensor(const ParamTree& grads);
Tensor clip_grad_norm_tensor(ParamTree& grads, double max_norm);
/// clip_grad_norm_tensor's scaling for a known norm (an f64 0-d tensor, e.g. the TP-aware one below).
void clip_to_norm_tensor(ParamTree& grads, const Tensor& norm, double max_norm);

/// The clipping coefficient of torch.nn.utils.clip_grad_norm_ for a known global norm:
/// min(max_norm / (norm + 1e-6), 1), in f64; as a double, or as ops on an f64 0-d norm tensor (for a
/// traced step: computed at every replay, on the norm's device). What the clip_* functions multiply
/// every gradient by, and what the Engine hands the optimizer as its grad_factor (Optimizer::step), which
/// clips inside the fused update instead of in a pass of its own. ValueError unless max_norm > 0.
double clip_coefficient(double norm, double max_norm);
Tensor clip_coefficient(const Tensor& norm, double max_norm);

/// Global L2 norm of the gradients of a model whose parameters are split over mesh axes (tensor
/// parallelism): sqrt(sum over parameters of ||g||^2) where a parameter whose spec (specs[path]; absent =
/// replicated) names axes holds only its block, so its squares are summed over the ranks of those axes,
/// and a replicated parameter (whose gradient is the same on every rank) is counted once. Equals
/// global_norm() of the unsplit model's gradients. Collective over every axis a spec names (one
/// all-reduce per axis set; every rank must pass the same specs). Throws MeshError for an axis not in
/// the mesh.
/// Pipeline parallelism: `stage_axis` names the axis whose ranks hold different parameters (stages);
/// the per-stage sums are then added over it (one more all-reduce), and the paths in `not_counted`
/// are skipped on this rank (a tied weight held by two stages counts once). Every rank of a TP group
/// must pass the same specs (the ranks of one stage do); stages may differ.
double global_norm(const ParamTree& grads, const std::map<std::string, PartitionSpec>& specs, const Mesh& mesh,
                   const std::string& stage_axis = "", const std::set<std::string>& not_counted = {});
/// The TP-aware global_norm written with ops (f64 0-d on the gradients' device; the sums over split axes
/// are traced psum collectives), for a compiled tensor-parallel step; no pipeline stages.
Tensor global_norm_tensor(const ParamTree& grads, const std::map<std::string, PartitionSpec>& specs, const Mesh& mesh);
/// clip_grad_norm with that norm: every rank scales its gradients by the same factor.
double clip_grad_norm(ParamTree& grads, double max_norm, const std::map<std::string, PartitionSpec>& specs,
                      const Mesh& mesh, const std::string& stage_axis = "", const std::set<std::string>& not_counted = {});

}  // namespace titanax::optim
