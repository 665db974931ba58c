// Plan: how a training step is parallelised over a mesh, declared explicitly by the user.
//
//   tx::Plan plan{.dp = tx::DP{"data", /*accumulate_steps=*/2}};
//   plan.validate(mesh);               // PlanError naming the problem, at this line
//   std::cout << plan.describe();
//
// A plan holds data parallelism (DP), tensor parallelism (TP: an axis and sharding rules over
// parameter paths, parallel/sharding.h) and pipeline parallelism (PP: an axis whose ranks each run one
// stage, microbatches, a schedule, activation recomputation; parallel/pipeline.h), each optional.
//
//   tx::Plan plan{.dp = tx::DP{"data"}, .tp = tx::TP{"model", tx::nn::GPT::sharding_rules("model")},
//                 .pp = tx::PP{"pipe", /*microbatches=*/8}};
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "parallel/sharding.h"

namespace titanax {

class Mesh;

/// Data parallelism: the batch is split over the ranks of `axis` and gradients are averaged over them.
struct DP {
  /// The mesh axis whose ranks hold different data shards.
  std::string axis = "data";
  /// Microbatches whose gradients are summed locally before each averaging step (>= 1).
  int accumulate_steps = 1;
  /// ZeRO stage 1 (Megatron-LM's distributed optimizer; parallel/zero.h): each rank of `axis` keeps the
  /// optimizer state of 1 / n of every parameter, gradients are reduce-scattered instead of all-reduced
  /// and the updated parts all-gathered. Same updates as without it (up to the order of the sums),
  /// optimizer memory divided by n; checkpoints hold each rank's part as written by that rank (nothing
  /// gathered) and describe the whole state, so they load with or without it, at any degree. With
  /// Plan::pp each stage shards its own parameters over its DP group.
  bool shard_optimizer = false;
};

/// Tensor parallelism (Megatron-LM, Shoeybi et al. 2019, arXiv:1909.08053): parameters matched by
/// `rules` are split over the ranks of `axis`; the model's forward pass holds the matching collectives
/// (parallel/tp.h). Gradients of split parameters stay local to their rank (each rank owns its block);
/// gradients of replicated parameters are identical on every rank of the axis by construction.
/// `rules` may be empty: the engine then takes the specs from the model (nn::Module::partition_specs());
/// when both are given they must agree (PlanError naming the first parameter where they differ).
/// Every rule's spec may only name `axis` (splitting over other axes is not supported).
struct TP {
  std::string axis = "model";
  ShardingRules rules;
};
/// The order in which a pipeline stage runs the forwards (F) and backwards (B) of its microbatches.
///   gpipe: all M forwards, then all M backwards (Huang et al. 2019, "GPipe", arXiv:1811.06965); every
///          stage holds all M microbatches' activations at the turn.
///   one_f_one_b: 1F1B (PipeDream-Flush: Narayanan et al. 2021, arXiv:2104.04473, the non-interleaved
///          schedule of Megatron-LM): stage s of S runs min(S - s - 1, M) warm-up forwards, then
///          alternates one forward and one backward, then the remaining backwards (cool-down); it holds
///          at most S - s microbatches' activations. Same bubble as GPipe, less memory.
enum class PipelineSchedule { one_f_one_b, gpipe };
/// "1f1b", "gpipe".
const char* schedule_name(PipelineSchedule s);
/// Parses "1f1b" / "gpipe"; PlanError naming the choices otherwise.
PipelineSchedule parse_schedule(const std::string& name, Loc loc = Loc::current());

/// Activation checkpointing inside a stage (autodiff checkpoint(): Chen et al. 2016, arXiv:1604.06174):
///   none:   every activation of a microbatch is kept from its forward to its backward;
///   full:   only the stage's input is kept; the whole stage forward runs again in the backward;
///   layers: the stage's layers are cut into groups of PP::recompute_layers consecutive layers; each
///           group keeps only its input and runs again in the backward.
enum class Recompute { none, full, layers };
/// "none", "full", "layers".
const char* recompute_name(Recompute r);
/// Parses "none" / "full" / "layers"; PlanError naming the choices otherwise.
Recompute parse_recompute(const std::string& name, Loc loc = Loc::current());

/// Pipeline parallelism: the model's layers are split into S consecutive stages, S = the size of
/// `axis`; the rank at coordinate s on the axis holds stage s's parameters and optimizer state (the
/// model decides the split: nn::GPT gives stage s layers [s L / S, (s + 1) L / S)). Each rank's batch is
/// cut into `microbatches` equal microbatches that flow through the stages by `schedule`; activations
/// and their gradients travel between neighbouring stages; gradients are summed over the microbatches
/// (the loss is the mean over them, as one big batch); the loss is computed on the last stage and
/// reported on all. With DP, the microbatches replace DP::accumulate_steps (which must then be 1).
struct PP {
  std::string axis = "pipe";
  /// M >= 1 (and M >= S for 1F1B; at most 16000: message tags). The bubble is (S - 1) / (M + S - 1).
  int microbatches = 1;
  PipelineSchedule schedule = PipelineSchedule::one_f_one_b;
  Recompute recompute = Recompute::none;
  /// Layers per recomputed group when recompute == layers (>= 1).
  int recompute_layers = 1;
};

struct Plan {
  std::optional<DP> dp;
  std::optional<TP> tp;
  std::optional<PP> pp;

  /// Checks the plan against `mesh`; throws PlanError (with `loc`) when DP's, TP's or PP's axis is empty
  /// or not an axis of the mesh (naming the mesh's axes and the nearest one), two of them name the same
  /// axis, accumulate_steps < 1, a TP rule's spec names an axis other than TP's, PP's microbatches are
  /// < 1 or > 16000, fewer than the stages under 1F1B, recompute_layers < 1, or accumulate_steps > 1
  /// together with PP. Not collective. (Model constraints, e.g. heads divisible by the TP size or layers
  /// by the stages, are checked by the model: nn::GPT.)
  void validate(const Mesh& mesh, Loc loc = Loc::current()) const;
  /// The same checks against a mesh's axis names and sizes (before a mesh is built, e.g. `titanax
  /// describe --ranks N`); an empty `shape` skips the checks that need sizes. Throws PlanError as above.
  void validate(const std::vector<std::string>& axes, const std::vector<int>& shape = {}, Loc loc = Loc::current()) const;
  /// Multi-line, human-readable:
  ///   plan:
  ///     data parallel: axis 'data', gradients averaged every 1 step(s)
  ///     tensor parallel: off            (or: axis 'model', 7 sharding rules, then one line per rule)
  ///     pipeline parallel: off         (or: axis 'pipe', 8 microbatches, schedule 1f1b, recompute none)
  std::string describe() const;
  /// describe() plus the group sizes on `mesh` ("over 4 ranks on axis 'data'").
  std::string describe(const Mesh& mesh) const;
  /// {"dp": {"axis": "data", "accumulate_steps": 1}, "tp": {"axis": "model", "rules": [{"pattern": "wte/weight",
  /// "spec": ["model", ""]}, ...]}, "pp": {"axis": "pipe", "microbatches": 8, "schedule": "1f1b",
  /// "recompute": "none", "recompute_layers": 1}} (null when off); for checkpoint metadata.
  std::string to_json() const;
};

}  // namespace titanax
