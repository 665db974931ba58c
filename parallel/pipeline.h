// Pipeline parallelism: the schedules (which microbatch each stage runs, in which order) and the
// executor of one training step of one stage (parallel/plan.h's PP says what to run).
//
//   auto actions = tx::pipeline_actions(tx::PipelineSchedule::one_f_one_b, /*stages=*/4, /*stage=*/0, /*M=*/8);
//   // F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7
//   std::cout << tx::pipeline_timeline(tx::PipelineSchedule::one_f_one_b, 4, 8).str();
//
// Schedules: GPipe (Huang et al. 2019, arXiv:1811.06965) and 1F1B (PipeDream-Flush, Narayanan et al.
// 2021, arXiv:2104.04473; Megatron-LM's non-interleaved schedule); see PipelineSchedule in plan.h.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/op.h"
#include "parallel/communicator.h"
#include "parallel/plan.h"

namespace titanax {

/// One unit of a stage's work: the forward (F) or backward (B) of one microbatch.
struct PipelineAction {
  enum class Kind : uint8_t { forward, backward };
  Kind kind = Kind::forward;
  int microbatch = 0;
  bool operator==(const PipelineAction&) const = default;
  /// "F3", "B0".
  std::string str() const;
};

/// The actions of stage `stage` (0 <= stage < stages) in the order it runs them, 2 M in all.
///   gpipe:       F0 .. F(M-1), then B0 .. B(M-1)
///   one_f_one_b: w = min(stages - stage - 1, M) warm-up forwards F0 .. F(w-1); then M - w pairs
///                F(w + i) B(i); then the cool-down backwards B(M - w) .. B(M-1).
/// Throws PlanError for stages < 1, a stage outside [0, stages), or microbatches < 1.
std::vector<PipelineAction> pipeline_actions(PipelineSchedule schedule, int stages, int stage, int microbatches);

/// The largest number of microbatches whose forward has run but whose backward has not, over `actions`
/// (what a stage holds activations for): M for GPipe, min(S - stage, M) for 1F1B.
int peak_in_flight(const std::vector<PipelineAction>& actions);

/// The schedule on a clock where every F and every B takes one tick and messages arrive at once: each
/// stage runs its next action at the first tick its input is there (F(s, i) after F(s - 1, i); B(s, i)
/// after B(s + 1, i), and on the last stage after F(S - 1, i)). What `titanax describe` prints.
struct PipelineTimeline {
  int stages = 0, microbatches = 0;
  /// grid[stage][tick]: the action run, or nullopt when the stage idles (the bubble).
  std::vector<std::vector<std::optional<PipelineAction>>> grid;
  int ticks() const { return grid.empty() ? 0 : int(grid[0].size()); }
  /// Idle ticks / all ticks over every stage: (S - 1) / (M + S - 1) for both schedules.
  double bubble_fraction() const;
  /// One row per stage, one column per tick ("F0", "B3", "." for idle), with a header line.
  std::string str() const;
};
/// Throws what pipeline_actions throws.
PipelineTimeline pipeline_timeline(PipelineSchedule schedule, int stages, int microbatches);
/// The ideal bubble fraction (S - 1) / (M + S - 1) of both schedules.
double ideal_bubble_fraction(int stages, int microbatches);

/// What the executor needs from the model for this rank's stage.
struct PipelineStageFns {
  /// Forward of this stage on microbatch i. `input`: the activation received from the previous stage
  /// (a leaf requiring grad), undefined on the first stage. Returns the activation to send to the next
  /// stage, or on the last stage the microbatch's scalar loss (its mean over the microbatch). Runs with
  /// grad mode on; parameters require grad.
  std::function<Tensor(int microbatch, const Tensor& input)> forward;
  /// Shape, dtype and device of what this stage receives for microbatch i (called on stages > 0).
  std::function<TensorSpec(int microbatch)> input_spec;
  /// Optional: called during this stage's last backward (its last microbatch's) with each parameter's
  /// gradient summed over the microbatches (PipelineResult::grads[k]) as soon as it is final, by index
  /// into `params` (BackwardOptions::on_grad_ready): data parallelism starts averaging buckets there, as
  /// Megatron-LM overlaps its gradient reduction with the pipeline's last backward.
  std::function<void(size_t param, const Tensor& grad)> on_grad_ready;
};

/// Measurements of one executed step on this rank.
struct PipelineStats {
  int peak_in_flight = 0;        ///< microbatches whose activations were held at once (measured)
  double step_seconds = 0;       ///< wall time of the whole schedule, up to the last send completing
  double compute_seconds = 0;    ///< time inside forwards and backwards (excluding waits for messages)
  double wait_seconds = 0;       ///< time blocked waiting for activations / gradients to arrive
  /// 1 - compute / step: the fraction of the step this stage did no compute.
  double bubble_fraction() const { return step_seconds > 0 ? 1.0 - compute_seconds / step_seconds : 0.0; }
};

struct PipelineResult {
  /// d(mean loss over the M microbatches) / d(params[k]): gradients summed over the microbatches, each
  /// microbatch's loss weighted 1 / M.
  TensorList grads;
  /// The mean of the microbatch losses, on every rank of the pipe group (computed on the last stage,
  /// broadcast).
  double loss = 0;
  PipelineStats stats;
};

/// Runs one training step of this rank's stage: the actions of pipeline_actions(pp.schedule, S,
/// pipe.rank(), pp.microbatches) with S = pipe.size(). Activations go to stage + 1 and their gradients
/// to stage - 1 with non-blocking sends (isend, tags 2 i and 2 i + 1); the receive for the next action
/// is posted before the current one computes, so transfers overlap compute. With pp.recompute == full
/// the whole stage forward is wrapped in checkpoint() (only its input is kept per microbatch); layer
/// groups (Recompute::layers) are the model's business (inside fns.forward).
/// Collective over `pipe` (every stage calls it for the same step). `params`: this stage's parameters
/// (their requires_grad flags are set for the step and restored). Throws what the forward throws,
/// CollectiveError for mismatched messages, AutodiffError when a forward returns a non-scalar loss on
/// the last stage.
PipelineResult run_pipeline(Communicator& pipe, const PP& pp, const TensorList& params, const PipelineStageFns& fns);

}  // namespace titanax
