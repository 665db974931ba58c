// Plan: how a training step is parallelised over a mesh, declared explicitly by the user.
//
//   tx::Plan plan{.dp = tx::DP{"data", /*accumulate_steps=*/2}};
//   plan.validate(mesh);               // PlanError naming the problem, at this line
//   std::cout << plan.describe();
//
// A plan holds data parallelism (DP) and tensor parallelism (TP: an axis and sharding rules over
// parameter paths, parallel/sharding.h); pipeline parallelism (PP: an axis, stages, microbatches) joins
// as a further optional member later, so `Plan{.dp = ..., .tp = ..., .pp = ...}` keeps working.
//
//   tx::Plan plan{.dp = tx::DP{"data"}, .tp = tx::TP{"model", tx::nn::GPT::sharding_rules("model")}};
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
// struct PP { std::string axis = "pipe"; int stages; int microbatches; };                                 (later)

struct Plan {
  std::optional<DP> dp;
  std::optional<TP> tp;
  // std::optional<PP> pp;  -- pipeline parallelism (later issue)

  /// Checks the plan against `mesh`; throws PlanError (with `loc`) when DP's or TP's axis is empty or not
  /// an axis of the mesh (naming the mesh's axes and the nearest one), accumulate_steps < 1, DP and TP
  /// name the same axis, or a TP rule's spec names an axis other than TP's. Not collective. (Model
  /// constraints, e.g. heads divisible by the TP size, are checked by the model: nn::GPT.)
  void validate(const Mesh& mesh, Loc loc = Loc::current()) const;
  /// The same checks against a mesh's axis names only (before a mesh is built, e.g. `titanax describe
  /// --ranks N`); throws PlanError as above.
  void validate(const std::vector<std::string>& axes, Loc loc = Loc::current()) const;
  /// Multi-line, human-readable:
  ///   plan:
  ///     data parallel: axis 'data', gradients averaged every 1 step(s)
  ///     tensor parallel: off            (or: axis 'model', 7 sharding rules, then one line per rule)
  ///     pipeline parallel: off
  std::string describe() const;
  /// describe() plus the group sizes on `mesh` ("over 4 ranks on axis 'data'").
  std::string describe(const Mesh& mesh) const;
  /// {"dp": {"axis": "data", "accumulate_steps": 1}, "tp": {"axis": "model", "rules": [{"pattern": "wte/weight",
  /// "spec": ["model", ""]}, ...]}} ("dp" / "tp": null when off); for checkpoint metadata.
  std::string to_json() const;
};

}  // namespace titanax
