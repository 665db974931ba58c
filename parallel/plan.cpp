#include "parallel/plan.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "parallel/mesh.h"

namespace titanax {

void Plan::validate(const Mesh& mesh, Loc loc) const {
  if ((dp || tp) && mesh.axes().empty())
    throw PlanError(std::string(dp ? "DP" : "TP") + " axis '" + (dp ? dp->axis : tp->axis) + "' is not in the mesh: the mesh is empty", "a built mesh", "Mesh{}",
                    "build one first: auto mesh = MeshSpec{{\"data\"}, {-1}}.build(rt);", loc);
  validate(mesh.axes(), mesh.shape(), loc);
}

const char* schedule_name(PipelineSchedule s) { return s == PipelineSchedule::gpipe ? "gpipe" : "1f1b"; }

PipelineSchedule parse_schedule(const std::string& name, Loc loc) {
  if (name == "1f1b") return PipelineSchedule::one_f_one_b;
  if (name == "gpipe") return PipelineSchedule::gpipe;
  throw PlanError("unknown pipeline schedule '" + name + "'", "1f1b or gpipe", "'" + name + "'",
                  did_you_mean(name, {"1f1b", "gpipe"}), loc);
}

const char* recompute_name(Recompute r) {
  switch (r) {
    case Recompute::none: return "none";
    case Recompute::full: return "full";
    case Recompute::layers: return "layers";
  }
  return "?";
}

Recompute parse_recompute(const std::string& name, Loc loc) {
  for (Recompute r : {Recompute::none, Recompute::full, Recompute::layers})
    if (name == recompute_name(r)) return r;
  throw PlanError("unknown recompute policy '" + name + "'", "none, full or layers", "'" + name + "'",
                  did_you_mean(name, {"none", "full", "layers"}), loc);
}

namespace {
// PlanError for an axis name that is empty or not in the mesh; `what` is "DP" or "TP".
void check_plan_axis(const char* what, const std::string& axis, const std::vector<std::string>& axes, Loc loc) {
  if (axis.empty())
    throw PlanError(std::string(what) + " has an empty axis name",
                    std::string("the name of a mesh axis, e.g. \"") +
                        (what[0] == 'D' ? "data" : what[0] == 'P' ? "pipe" : "model") + "\"",
                    "\"\"",
                    axes.empty() ? "" : "use one of: " + join(axes), loc);
  if (std::find(axes.begin(), axes.end(), axis) == axes.end()) {
    std::string hint = did_you_mean(axis, axes);
    const bool near = hint.rfind("did you mean", 0) == 0;
    throw PlanError(std::string(what) + " axis '" + axis + "' is not in the mesh" + (near ? "; " + hint : ""),
                    "one of [" + join(axes) + "]", "'" + axis + "'",
                    near ? "set " + std::string(what) + "{.axis = \"" + nearest(axis, axes) + "\"}"
                         : what[0] == 'T' ? "add the axis to the mesh, e.g. MeshSpec{{\"data\", \"model\"}, {-1, 2}}"
                         : what[0] == 'P' ? "add the axis to the mesh, e.g. MeshSpec{{\"data\", \"pipe\"}, {-1, 2}}"
                                          : hint,
                    loc);
  }
}
}  // namespace

void Plan::validate(const std::vector<std::string>& axes, const std::vector<int>& shape, Loc loc) const {
  if (dp) {
    check_plan_axis("DP", dp->axis, axes, loc);
    if (dp->accumulate_steps < 1)
      throw PlanError("DP accumulate_steps must be at least 1", ">= 1", std::to_string(dp->accumulate_steps),
                      "use 1 for no gradient accumulation", loc);
  }
  if (tp) {
    check_plan_axis("TP", tp->axis, axes, loc);
    if (dp && dp->axis == tp->axis)
      throw PlanError("DP and TP use the same mesh axis '" + tp->axis + "'", "two different axes",
                      "DP{\"" + dp->axis + "\"} and TP{\"" + tp->axis + "\"}",
                      "build a mesh with both, e.g. MeshSpec{{\"data\", \"model\"}, {-1, 2}}", loc);
    for (const auto& r : tp->rules) {
      if (r.pattern.empty())
        throw PlanError("a TP sharding rule has an empty pattern", "a glob over parameter paths, e.g. \"blocks/*/mlp/fc/weight\"",
                        "\"\"", "", loc);
      for (const auto& a : r.spec)
        if (!a.empty() && a != tp->axis)
          throw PlanError("TP rule '" + r.pattern + "' splits over axis '" + a + "', not TP's axis '" + tp->axis + "'",
                          "specs naming only '" + tp->axis + "' (or \"\")", spec_str(r.spec),
                          "replace '" + a + "' by '" + tp->axis + "'; splitting parameters over other axes is not supported", loc);
    }
  }
  if (pp) {
    check_plan_axis("PP", pp->axis, axes, loc);
    for (const auto* other : {dp ? &dp->axis : nullptr, tp ? &tp->axis : nullptr})
      if (other && *other == pp->axis)
        throw PlanError("PP uses the mesh axis '" + pp->axis + "' that " + (dp && other == &dp->axis ? "DP" : "TP") + " uses",
                        "a mesh axis of its own", "'" + pp->axis + "' twice",
                        "build a mesh with a pipe axis, e.g. MeshSpec{{\"data\", \"pipe\", \"model\"}, {-1, 2, 2}}", loc);
    if (pp->microbatches < 1 || pp->microbatches > 16000)
      throw PlanError("PP microbatches out of range", "1 <= microbatches <= 16000", std::to_string(pp->microbatches),
                      "use M >= the number of stages (the bubble is (S - 1) / (M + S - 1))", loc);
    if (pp->recompute == Recompute::layers && pp->recompute_layers < 1)
      throw PlanError("PP recompute_layers must be at least 1 with recompute 'layers'", ">= 1",
                      std::to_string(pp->recompute_layers), "e.g. 1 (recompute every layer's inside)", loc);
    if (dp && dp->accumulate_steps != 1)
      throw PlanError("DP accumulate_steps > 1 together with pipeline parallelism", "accumulate_steps = 1 (PP's microbatches accumulate)",
                      std::to_string(dp->accumulate_steps),
                      "set PP microbatches to " + std::to_string(dp->accumulate_steps) + " x what you had instead", loc);
    if (!shape.empty()) {
      const int S = shape[size_t(std::find(axes.begin(), axes.end(), pp->axis) - axes.begin())];
      if (pp->schedule == PipelineSchedule::one_f_one_b && pp->microbatches < S)
        throw PlanError("1F1B needs at least as many microbatches as stages", "microbatches >= " + std::to_string(S) +
                            " (the size of axis '" + pp->axis + "')", std::to_string(pp->microbatches),
                        "raise microbatches (the bubble shrinks as M grows), or use schedule gpipe", loc);
    }
  }
}

std::string Plan::describe() const {
  std::string s = "plan:\n";
  if (dp)
    s += "  data parallel: axis '" + dp->axis + "', gradients averaged every " + std::to_string(dp->accumulate_steps) +
         " step" + (dp->accumulate_steps == 1 ? "" : "s") +
         (dp->shard_optimizer ? ", optimizer state sharded over it (ZeRO-1)" : "") + "\n";
  else
    s += "  data parallel: off\n";
  if (tp) {
    s += "  tensor parallel: axis '" + tp->axis + "', " +
         (tp->rules.empty() ? std::string("sharding rules from the model")
                            : std::to_string(tp->rules.size()) + " sharding rule" + (tp->rules.size() == 1 ? "" : "s")) +
         "\n";
    for (const auto& r : tp->rules) s += "    " + r.pattern + " -> " + spec_str(r.spec) + "\n";
  } else {
    s += "  tensor parallel: off\n";
  }
  if (pp)
    s += "  pipeline parallel: axis '" + pp->axis + "', " + std::to_string(pp->microbatches) + " microbatch" +
         (pp->microbatches == 1 ? "" : "es") + ", schedule " + schedule_name(pp->schedule) + ", recompute " +
         recompute_name(pp->recompute) +
         (pp->recompute == Recompute::layers ? " (every " + std::to_string(pp->recompute_layers) + " layer(s))" : "") + "\n";
  else
    s += "  pipeline parallel: off\n";
  return s;
}

std::string Plan::describe(const Mesh& mesh) const {
  std::string s = describe();
  s += "  on " + mesh.describe() + "\n";
  if (dp && mesh.has_axis(dp->axis))
    s += "  gradients averaged over " + std::to_string(mesh.axis_size(dp->axis)) + " rank(s) on axis '" + dp->axis + "'\n";
  if (tp && mesh.has_axis(tp->axis))
    s += "  parameters split over " + std::to_string(mesh.axis_size(tp->axis)) + " rank(s) on axis '" + tp->axis + "'\n";
  if (pp && mesh.has_axis(pp->axis))
    s += "  layers split into " + std::to_string(mesh.axis_size(pp->axis)) + " stage(s) on axis '" + pp->axis + "'\n";
  return s;
}

std::string Plan::to_json() const {
  nlohmann::json j;
  if (dp) j["dp"] = {{"axis", dp->axis}, {"accumulate_steps", dp->accumulate_steps}, {"shard_optimizer", dp->shard_optimizer}};
  else j["dp"] = nullptr;
  if (tp) {
    nlohmann::json rules = nlohmann::json::array();
    for (const auto& r : tp->rules) rules.push_back({{"pattern", r.pattern}, {"spec", r.spec}});
    j["tp"] = {{"axis", tp->axis}, {"rules", rules}};
  } else {
    j["tp"] = nullptr;
  }
  if (pp)
    j["pp"] = {{"axis", pp->axis}, {"microbatches", pp->microbatches}, {"schedule", schedule_name(pp->schedule)},
               {"recompute", recompute_name(pp->recompute)}, {"recompute_layers", pp->recompute_layers}};
  else
    j["pp"] = nullptr;
  return j.dump();
}

}  // namespace titanax
