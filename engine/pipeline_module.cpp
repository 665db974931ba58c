#include "engine/pipeline_module.h"

#include <set>

#include "autodiff/autodiff.h"
#include "parallel/sharding.h"

namespace titanax::nn {

std::vector<int> assign_stages(const std::vector<std::vector<std::string>>& layer_params, int S, const StageSplit& split,
                               Loc loc) {
  const int64_t L = int64_t(layer_params.size());
  if (S < 1) throw PlanError("a pipeline needs at least one stage", "stages >= 1", std::to_string(S), "", loc);
  if (L < S)
    throw PlanError("fewer layers than pipeline stages", "at least " + std::to_string(S) + " layers",
                    std::to_string(L) + " layers", "use fewer stages", loc);
  if (!split.boundaries.empty() && !split.path_filters.empty())
    throw PlanError("StageSplit has both boundaries and path_filters", "one of them (or neither: an even split)",
                    "both", "keep the one you mean", loc);
  std::vector<int> st(size_t(L), 0);
  auto layer = [](int64_t i) { return "layer " + std::to_string(i); };
  if (!split.boundaries.empty()) {
    const auto& b = split.boundaries;
    bool ok = int(b.size()) == S - 1;
    for (size_t k = 0; ok && k < b.size(); ++k) ok = b[k] > (k ? b[k - 1] : 0) && b[k] < L;
    if (!ok) {
      std::string found;
      for (auto v : b) found += (found.empty() ? "" : ", ") + std::to_string(v);
      throw PlanError("StageSplit boundaries do not cut " + std::to_string(L) + " layers into " + std::to_string(S) + " stages",
                      std::to_string(S - 1) + " strictly ascending layer indices in (0, " + std::to_string(L) + ")",
                      "{" + found + "}", "e.g. {" + std::to_string(L / S) + "} for 2 stages", loc);
    }
    for (int64_t i = 0; i < L; ++i)
      for (int64_t v : b) st[size_t(i)] += i >= v;
  } else if (!split.path_filters.empty()) {
    if (int(split.path_filters.size()) != S)
      throw PlanError("StageSplit path_filters need one list of patterns per stage", std::to_string(S) + " lists",
                      std::to_string(split.path_filters.size()) + " lists", "", loc);
    for (int64_t i = 0; i < L; ++i) {
      std::set<int> hits;
      for (const auto& path : layer_params[size_t(i)])
        for (int s = 0; s < S; ++s)
          for (const auto& pat : split.path_filters[size_t(s)])
            if (glob_match(pat, path)) hits.insert(s);
      if (layer_params[size_t(i)].empty()) {
        st[size_t(i)] = i ? st[size_t(i - 1)] : 0;  // no parameters: stays with the layer before
        continue;
      }
      if (hits.empty())
        throw PlanError("no stage's path filter matches " + layer(i) + " ('" + layer_params[size_t(i)][0] + "')",
                        "every layer with parameters matched by one stage's patterns", "no match",
                        "add a pattern such as \"layers/" + std::to_string(i) + "/**\" to its stage", loc);
      if (hits.size() > 1)
        throw PlanError("path filters of stages " + std::to_string(*hits.begin()) + " and " + std::to_string(*hits.rbegin()) +
                            " both match " + layer(i),
                        "one stage per layer", "'" + layer_params[size_t(i)][0] + "' matched twice",
                        "make the patterns disjoint", loc);
      st[size_t(i)] = *hits.begin();
    }
  } else {
    for (int s = 0; s < S; ++s)
      for (int64_t i = L * s / S; i < L * (s + 1) / S; ++i) st[size_t(i)] = s;
  }
  std::vector<int64_t> count(size_t(S), 0);
  for (int64_t i = 0; i < L; ++i) {
    if (i && st[size_t(i)] < st[size_t(i - 1)])
      throw PlanError(layer(i) + " is on stage " + std::to_string(st[size_t(i)]) + ", before the stage " +
                          std::to_string(st[size_t(i - 1)]) + " of " + layer(i - 1),
                      "contiguous stages: each layer on the same stage as the one before or a later one",
                      "stages out of order", "assign consecutive layers to consecutive stages", loc);
    ++count[size_t(st[size_t(i)])];
  }
  for (int s = 0; s < S; ++s)
    if (count[size_t(s)] == 0)
      throw PlanError("pipeline stage " + std::to_string(s) + " gets no layer", "at least one layer per stage", "none",
                      "move a boundary or a path filter", loc);
  return st;
}

Tensor run_layers(const std::vector<Module*>& layers, Tensor x, int k) {
  const size_t n = layers.size(), g = k > 0 ? size_t(k) : n;
  for (size_t lo = 0; lo < n; lo += g) {
    const size_t hi = std::min(n, lo + g);
    // By value: checkpoint() keeps the function for the backward, after this call has returned.
    std::vector<Module*> mine(layers.begin() + std::ptrdiff_t(lo), layers.begin() + std::ptrdiff_t(hi));
    auto group = [mine](const Tensor& in) {
      Tensor h = in;
      for (Module* l : mine) h = (*l)(h);
      return h;
    };
    if (k <= 0) {
      x = group(x);
      continue;
    }
    TensorList params;
    for (size_t i = lo; i < hi; ++i)
      for (const auto& [p, t] : layers[i]->parameters()) params.push_back(t);
    x = checkpoint(group, x, params);
  }
  return x;
}

PipelineSequential::PipelineSequential(std::vector<Factory> layers, const Mesh& mesh, const std::string& axis,
                                       StageSplit split, StageLoss loss, ActivationSpec activation, Loc loc)
    : total_(int64_t(layers.size())), loss_(std::move(loss)), activation_(std::move(activation)) {
  if (!mesh.has_axis(axis))
    throw PlanError("PipelineSequential: pipeline axis '" + axis + "' is not in the mesh", "one of [" + join(mesh.axes()) + "]",
                    "'" + axis + "'", did_you_mean(axis, mesh.axes()), loc);
  if (!loss_ || !activation_)
    throw ValueError("PipelineSequential needs a loss and an activation spec", "both functions", "an empty function");
  S_ = mesh.axis_size(axis);
  s_ = mesh.axis_index(axis);
  std::vector<std::shared_ptr<Module>> all;
  std::vector<std::vector<std::string>> paths;
  for (int64_t i = 0; i < total_; ++i) {
    auto m = layers[size_t(i)] ? layers[size_t(i)]() : nullptr;
    if (!m) throw ValueError("PipelineSequential: layer " + std::to_string(i) + " has no factory or it returned nullptr", "a module", "nullptr");
    paths.emplace_back();
    for (const auto& [p, t] : m->parameters()) paths.back().push_back("layers/" + std::to_string(i) + "/" + p);
    all.push_back(std::move(m));
  }
  const std::vector<int> st = assign_stages(paths, S_, split, loc);
  auto held = register_module("layers", std::make_shared<NamedModules>());
  for (int64_t i = 0; i < total_; ++i)
    if (st[size_t(i)] == s_) {
      layers_.push_back(held->add(std::to_string(i), all[size_t(i)]));
      mine_.push_back(i);
    }
  init_parameters(0);  // keys from the global paths: any S starts from the same parameters
}

Tensor PipelineSequential::forward(const Tensor& x) {
  if (S_ > 1)
    throw PlanError("PipelineSequential::forward needs the whole stack, but this rank holds stage " + std::to_string(s_) +
                        " of " + std::to_string(S_),
                    "one stage", std::to_string(S_) + " stages", "train through the Engine with a Plan::pp");
  Tensor h = x;
  for (auto& l : layers_) h = (*l)(h);
  return h;
}

std::string PipelineSequential::name() const {
  return "PipelineSequential(" + std::to_string(total_) + " layers, stage " + std::to_string(s_) + " of " +
         std::to_string(S_) + ": layers " + std::to_string(mine_.front()) + ".." + std::to_string(mine_.back()) + ")";
}

Tensor PipelineSequential::stage_forward(const Tensor& input, const Batch& mb, Reduction reduction) {
  Tensor h = s_ == 0 ? mb["x"] : input;
  if (s_ > 0) {
    const TensorSpec want = activation_(s_, mb);
    if (!h.defined() || h.shape() != want.shape)
      throw ShapeError("PipelineSequential stage " + std::to_string(s_) + " got the wrong input activation",
                       want.shape.str(), h.defined() ? h.shape().str() : "none",
                       "check the activation spec against what the previous stage's last layer returns");
  }
  std::vector<Module*> ls;
  for (auto& l : layers_) ls.push_back(l.get());
  h = run_layers(ls, h, recompute_);
  return s_ == S_ - 1 ? loss_(h, mb, reduction) : h;
}

void PipelineSequential::set_recompute_layers(int k) {
  if (k < 0) throw ValueError("set_recompute_layers: k must be >= 0", ">= 0 (0 = off)", std::to_string(k));
  recompute_ = k;
}

}  // namespace titanax::nn
