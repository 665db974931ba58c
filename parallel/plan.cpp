#include "parallel/plan.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "parallel/mesh.h"

namespace titanax {

void Plan::validate(const Mesh& mesh, Loc loc) const {
  if (dp && mesh.axes().empty())
    throw PlanError("DP axis '" + dp->axis + "' is not in the mesh: the mesh is empty", "a built mesh", "Mesh{}",
                    "build one first: auto mesh = MeshSpec{{\"data\"}, {-1}}.build(rt);", loc);
  validate(mesh.axes(), loc);
}

void Plan::validate(const std::vector<std::string>& axes, Loc loc) const {
  if (!dp) return;
  if (dp->axis.empty())
    throw PlanError("DP has an empty axis name", "the name of a mesh axis, e.g. \"data\"", "\"\"",
                    axes.empty() ? "" : "use one of: " + join(axes), loc);
  if (std::find(axes.begin(), axes.end(), dp->axis) == axes.end()) {
    std::string hint = did_you_mean(dp->axis, axes);
    const bool near = hint.rfind("did you mean", 0) == 0;
    throw PlanError("DP axis '" + dp->axis + "' is not in the mesh" + (near ? "; " + hint : ""),
                    "one of [" + join(axes) + "]", "'" + dp->axis + "'",
                    near ? "set DP{.axis = \"" + nearest(dp->axis, axes) + "\"}" : hint, loc);
  }
  if (dp->accumulate_steps < 1)
    throw PlanError("DP accumulate_steps must be at least 1", ">= 1", std::to_string(dp->accumulate_steps),
                    "use 1 for no gradient accumulation", loc);
}

std::string Plan::describe() const {
  std::string s = "plan:\n";
  if (dp)
    s += "  data parallel: axis '" + dp->axis + "', gradients averaged every " + std::to_string(dp->accumulate_steps) +
         " step" + (dp->accumulate_steps == 1 ? "" : "s") + "\n";
  else
    s += "  data parallel: off\n";
  s += "  tensor parallel: off\n";
  s += "  pipeline parallel: off\n";
  return s;
}

std::string Plan::describe(const Mesh& mesh) const {
  std::string s = describe();
  s += "  on " + mesh.describe() + "\n";
  if (dp && mesh.has_axis(dp->axis))
    s += "  gradients averaged over " + std::to_string(mesh.axis_size(dp->axis)) + " rank(s) on axis '" + dp->axis + "'\n";
  return s;
}

std::string Plan::to_json() const {
  nlohmann::json j;
  if (dp) j["dp"] = {{"axis", dp->axis}, {"accumulate_steps", dp->accumulate_steps}};
  else j["dp"] = nullptr;
  return j.dump();
}

}  // namespace titanax
