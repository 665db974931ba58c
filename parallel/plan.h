// Plan: how a training step is parallelised over a mesh, declared explicitly by the user.
//
//   tx::Plan plan{.dp = tx::DP{"data", /*accumulate_steps=*/2}};
//   plan.validate(mesh);               // PlanError naming the problem, at this line
//   std::cout << plan.describe();
//
// Today a plan holds data parallelism; tensor parallelism (TP: an axis and PartitionSpec rules over
// parameter paths) and pipeline parallelism (PP: an axis, stages, microbatches) join as further optional
// members in later issues, so `Plan{.dp = ..., .tp = ..., .pp = ...}` keeps working.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "core/error.h"

namespace titanax {

class Mesh;

/// Data parallelism: the batch is split over the ranks of `axis` and gradients are averaged over them.
struct DP {
  /// The mesh axis whose ranks hold different data shards.
  std::string axis = "data";
  /// Microbatches whose gradients are summed locally before each averaging step (>= 1).
  int accumulate_steps = 1;
};

// struct TP { std::string axis = "model"; std::vector<std::pair<std::string, PartitionSpec>> rules; };  (later)
// struct PP { std::string axis = "pipe"; int stages; int microbatches; };                                 (later)

struct Plan {
  std::optional<DP> dp;
  // std::optional<TP> tp;  -- tensor parallelism (later issue)
  // std::optional<PP> pp;  -- pipeline parallelism (later issue)

  /// Checks the plan against `mesh`; throws PlanError (with `loc`) when DP's axis is empty or not an axis
  /// of the mesh (naming the mesh's axes and the nearest one) or accumulate_steps < 1. Not collective.
  void validate(const Mesh& mesh, Loc loc = Loc::current()) const;
  /// The same checks against a mesh's axis names only (before a mesh is built, e.g. `titanax describe
  /// --ranks N`); throws PlanError as above.
  void validate(const std::vector<std::string>& axes, Loc loc = Loc::current()) const;
  /// Multi-line, human-readable:
  ///   plan:
  ///     data parallel: axis 'data', gradients averaged every 1 step(s)
  ///     tensor parallel: off
  ///     pipeline parallel: off
  std::string describe() const;
  /// describe() plus the group sizes on `mesh` ("over 4 ranks on axis 'data'").
  std::string describe(const Mesh& mesh) const;
  /// {"dp": {"axis": "data", "accumulate_steps": 1}} ("dp": null when off); for checkpoint metadata.
  std::string to_json() const;
};

}  // namespace titanax
