// Helpers for the checkpoint resharding tests (unit and MPI): global tensors whose every element is a
// known function of its global index, and the local slice a rank holds under a layout, computed here
// by plain index arithmetic (independently of io/checkpoint).
#pragma once

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <titanax/titanax.h>

namespace reshard_test {

using namespace titanax;

/// A global tensor: element at row-major global index `lin` is id * 1000 + lin (exact in its dtype).
struct GlobalT {
  std::string name;
  int id;
  std::vector<int64_t> shape;
  DType dtype;
};

inline double fval(int id, int64_t lin) { return id * 1000.0 + double(lin); }

/// A rank's position in a mesh.
struct Pos {
  std::vector<std::string> axes;
  std::vector<int> shape;
  std::vector<int> coords;
  int rank = 0;
};

/// Rank `rank` laid out row-major (last axis fastest).
inline Pos pos_at(const std::vector<std::string>& axes, const std::vector<int>& shape, int rank) {
  Pos p{axes, shape, std::vector<int>(shape.size()), rank};
  int r = rank;
  for (size_t i = shape.size(); i-- > 0;) {
    p.coords[i] = r % shape[i];
    r /= shape[i];
  }
  return p;
}

inline int mesh_size(const std::vector<int>& shape) {
  int n = 1;
  for (int s : shape) n *= s;
  return n;
}

inline int axis_of(const Pos& p, const std::string& a) {
  for (size_t i = 0; i < p.axes.size(); ++i)
    if (p.axes[i] == a) return int(i);
  throw std::runtime_error("test bug: no axis " + a);
}

inline PartitionSpec spec_of(const std::map<std::string, PartitionSpec>& specs, const std::string& name) {
  auto it = specs.find(name);
  return it == specs.end() ? PartitionSpec{} : it->second;
}

/// The tensor rank `p` holds of `g` under `spec`: block coords[axis] of size global / axis size along
/// each split dim, with the values of the global tensor there.
inline Tensor slice_of(const GlobalT& g, const PartitionSpec& spec, const Pos& p) {
  const size_t n = g.shape.size();
  std::vector<int64_t> local = g.shape, lo(n, 0);
  for (size_t d = 0; d < spec.size(); ++d)
    if (!spec[d].empty()) {
      const int a = axis_of(p, spec[d]);
      local[d] = g.shape[d] / p.shape[size_t(a)];
      lo[d] = local[d] * p.coords[size_t(a)];
    }
  int64_t numel = 1;
  for (auto x : local) numel *= x;
  std::vector<double> v(static_cast<size_t>(numel));
  std::vector<int64_t> idx(n, 0);
  for (int64_t i = 0; i < numel; ++i) {
    int64_t lin = 0;
    for (size_t d = 0; d < n; ++d) lin = lin * g.shape[d] + lo[d] + idx[d];
    v[size_t(i)] = fval(g.id, lin);
    for (size_t d = n; d-- > 0;) {
      if (++idx[d] < local[d]) break;
      idx[d] = 0;
    }
  }
  return from_vector(v, Shape(local)).astype(g.dtype);
}

/// Tensors held as flat parts: name -> the mesh axis their blocks' flattened elements are split over.
using FlatAxes = std::map<std::string, std::string>;

/// ZeRO's partition of N flattened elements over k ranks (parallel/zero.h, restated): chunks of
/// C = ceil(N / k), chunk c is [c C, min(N, (c + 1) C)).
inline std::pair<int64_t, int64_t> zero_run(int64_t N, int k, int c) {
  const int64_t C = (N + k - 1) / k;
  return {std::min(N, c * C), std::min(N, (c + 1) * C)};
}

/// The run of its block's flattened elements rank `p` holds of `g` when split over `axis` ("": the whole block).
inline std::pair<int64_t, int64_t> run_of(const GlobalT& g, const PartitionSpec& spec, const std::string& axis, const Pos& p) {
  const int64_t N = slice_of(g, spec, p).numel();
  if (axis.empty()) return {0, N};
  const int a = axis_of(p, axis);
  return zero_run(N, p.shape[size_t(a)], p.coords[size_t(a)]);
}

/// What rank `p` holds of `g`: its block, or that run of it as a 1-d tensor when `g` is in `flat`.
inline Tensor held_of(const GlobalT& g, const PartitionSpec& spec, const FlatAxes& flat, const Pos& p) {
  Tensor b = slice_of(g, spec, p);
  auto f = flat.find(g.name);
  if (f == flat.end()) return b;
  const auto [lo, hi] = run_of(g, spec, f->second, p);
  return b.reshape(Shape{b.numel()}).slice(0, lo, hi).contiguous();
}

/// The FlatParts of rank `p`'s tensors in `flat`.
inline FlatParts flat_parts(const std::vector<GlobalT>& gs, const std::map<std::string, PartitionSpec>& specs,
                            const FlatAxes& flat, const Pos& p) {
  FlatParts out;
  for (const auto& g : gs)
    if (flat.count(g.name))
      out[g.name] = FlatPart{slice_of(g, spec_of(specs, g.name), p).shape(), run_of(g, spec_of(specs, g.name), flat.at(g.name), p).first};
  return out;
}

inline ParamTree local_tree(const std::vector<GlobalT>& gs, const std::map<std::string, PartitionSpec>& specs,
                            const Pos& p, const FlatAxes& flat = {}) {
  ParamTree t;
  for (const auto& g : gs) t.insert(g.name, held_of(g, spec_of(specs, g.name), flat, p));
  return t;
}

inline ParamTree zeros_tree(const std::vector<GlobalT>& gs, const std::map<std::string, PartitionSpec>& specs,
                            const Pos& p, const FlatAxes& flat = {}) {
  ParamTree t;
  for (const auto& g : gs) {
    Tensor s = held_of(g, spec_of(specs, g.name), flat, p);
    t.insert(g.name, s.numel() ? zeros_like(s) : s);
  }
  return t;
}

/// "" when every element of `got` equals the global function at its global index, else the first
/// difference.
inline std::string check_tree(const ParamTree& got, const std::vector<GlobalT>& gs,
                              const std::map<std::string, PartitionSpec>& specs, const Pos& p, const FlatAxes& flat = {}) {
  for (const auto& g : gs) {
    Tensor want = held_of(g, spec_of(specs, g.name), flat, p);
    const Tensor& t = got.at(g.name);
    if (t.shape() != want.shape() || t.dtype() != want.dtype()) return g.name + ": shape/dtype " + t.shape().str();
    auto a = t.astype(DType::f64).to_vector<double>(), b = want.astype(DType::f64).to_vector<double>();
    for (size_t i = 0; i < a.size(); ++i)
      if (a[i] != b[i])
        return g.name + "[" + std::to_string(i) + "] = " + std::to_string(a[i]) + ", want " + std::to_string(b[i]);
  }
  return "";
}

/// {"axes": [...], "shape": [...]} (the mesh_json form that keeps axis order).
inline std::string mesh_json(const std::vector<std::string>& axes, const std::vector<int>& shape) {
  return nlohmann::json{{"axes", axes}, {"shape", shape}}.dump();
}

inline MeshCoords coords_of(const Pos& p) { return MeshCoords{p.axes, p.shape, p.coords, p.rank}; }

/// The standard tensor set: w [8, 6] f32, v [6, 8] f64, b [6] bf16 (small values: exact), s i64 scalar,
/// and the layout they are saved in: {model: 2}, w split on dim 0, v on dim 1, b and s replicated.
inline std::vector<GlobalT> standard_tensors() {
  return {{"w", 1, {8, 6}, DType::f32}, {"v", 2, {6, 8}, DType::f64}, {"b", 0, {6}, DType::bf16}, {"s", 3, {}, DType::i64}};
}
inline std::map<std::string, PartitionSpec> tp_specs() { return {{"w", {"model", ""}}, {"v", {"", "model"}}}; }

/// Target layouts a checkpoint of standard_tensors() must load into.
struct Target {
  std::string what;
  std::vector<std::string> axes;
  std::vector<int> shape;
  std::map<std::string, PartitionSpec> specs;
  FlatAxes flat = {};  // tensors loaded as flat parts
};
inline std::vector<Target> standard_targets() {
  return {
      {"TP 4", {"model"}, {4}, tp_specs()},
      {"TP 1 (one rank)", {"model"}, {1}, tp_specs()},
      {"TP 2 (same)", {"model"}, {2}, tp_specs()},
      {"DP 2 x TP 2", {"data", "model"}, {2, 2}, tp_specs()},
      {"DP 4 (replicated)", {"data"}, {4}, {}},
      {"TP 2 on the other dims", {"model"}, {2}, {{"w", {"", "model"}}, {"v", {"model", ""}}}},
      {"TP 3 (blocks straddle saved ones)", {"model"}, {3}, {{"w", {"", "model"}}, {"v", {"model", ""}}}},
      {"2-D: w over data x model", {"data", "model"}, {2, 2}, {{"w", {"data", "model"}}, {"v", {"model", "data"}}}},
  };
}

}  // namespace reshard_test
