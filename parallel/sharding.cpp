#include "parallel/sharding.h"

#include <algorithm>
#include <set>

#include "ops/ops.h"
#include "parallel/collectives.h"

namespace titanax {
namespace {

std::vector<std::string_view> segments(std::string_view s) {
  std::vector<std::string_view> out;
  size_t start = 0;
  for (size_t i = 0; i <= s.size(); ++i)
    if (i == s.size() || s[i] == '/') {
      out.push_back(s.substr(start, i - start));
      start = i + 1;
    }
  return out;
}

// `*` inside one segment: iterative wildcard match with single-star backtracking.
bool segment_match(std::string_view p, std::string_view s) {
  size_t pi = 0, si = 0, star = std::string_view::npos, mark = 0;
  while (si < s.size()) {
    if (pi < p.size() && p[pi] == '*') {
      star = pi++;
      mark = si;
    } else if (pi < p.size() && p[pi] == s[si]) {
      ++pi;
      ++si;
    } else if (star != std::string_view::npos) {
      pi = star + 1;
      si = ++mark;
    } else {
      return false;
    }
  }
  while (pi < p.size() && p[pi] == '*') ++pi;
  return pi == p.size();
}

bool match_from(const std::vector<std::string_view>& p, size_t i, const std::vector<std::string_view>& s, size_t j) {
  if (i == p.size()) return j == s.size();
  if (p[i] == "**") {
    for (size_t k = j; k <= s.size(); ++k)  // zero or more whole segments
      if (match_from(p, i + 1, s, k)) return true;
    return false;
  }
  return j < s.size() && segment_match(p[i], s[j]) && match_from(p, i + 1, s, j + 1);
}

}  // namespace

bool glob_match(std::string_view pattern, std::string_view path) {
  return match_from(segments(pattern), 0, segments(path), 0);
}

PatternSpecificity specificity(std::string_view pattern) {
  PatternSpecificity r;
  auto segs = segments(pattern);
  r.literal_chars = int(segs.size()) - 1;  // the "/" separators
  for (auto seg : segs) {
    if (seg == "**") {
      ++r.double_stars;
      continue;
    }
    bool in_star = false;
    for (char c : seg) {
      if (c == '*') {
        if (!in_star) ++r.stars;  // a run of stars is one wildcard
        in_star = true;
      } else {
        ++r.literal_chars;
        in_star = false;
      }
    }
  }
  return r;
}

bool PatternSpecificity::more_specific_than(const PatternSpecificity& o) const {
  if (double_stars != o.double_stars) return double_stars < o.double_stars;
  if (stars != o.stars) return stars < o.stars;
  return literal_chars > o.literal_chars;
}
bool PatternSpecificity::same_as(const PatternSpecificity& o) const {
  return double_stars == o.double_stars && stars == o.stars && literal_chars == o.literal_chars;
}

std::string spec_str(const PartitionSpec& spec) {
  std::string s = "[";
  for (size_t i = 0; i < spec.size(); ++i) s += (i ? ", " : "") + (spec[i].empty() ? std::string("-") : spec[i]);
  return s + "]";
}

bool is_sharded(const PartitionSpec& spec) {
  return std::any_of(spec.begin(), spec.end(), [](const std::string& a) { return !a.empty(); });
}

std::vector<std::string> spec_axes(const PartitionSpec& spec) {
  std::vector<std::string> out;
  for (const auto& a : spec)
    if (!a.empty() && std::find(out.begin(), out.end(), a) == out.end()) out.push_back(a);
  return out;
}

const ShardingRule* match_rule(const ShardingRules& rules, const std::string& path, Loc loc) {
  const ShardingRule* best = nullptr;
  PatternSpecificity best_s;
  for (const auto& r : rules) {
    if (!glob_match(r.pattern, path)) continue;
    PatternSpecificity s = specificity(r.pattern);
    if (!best || s.more_specific_than(best_s)) {
      best = &r;
      best_s = s;
    } else if (s.same_as(best_s) && r.spec != best->spec) {
      throw PlanError("sharding rules are ambiguous for '" + path + "'",
                      "one most specific rule (fewer **, then fewer *, then more literal characters)",
                      "'" + best->pattern + "' -> " + spec_str(best->spec) + " and '" + r.pattern + "' -> " +
                          spec_str(r.spec) + " are equally specific",
                      "add a rule naming '" + path + "' more precisely, or make the two specs agree", loc);
    }
  }
  return best;
}

PartitionSpec spec_for(const ShardingRules& rules, const std::string& path, Loc loc) {
  const ShardingRule* r = match_rule(rules, path, loc);
  return r ? r->spec : PartitionSpec{};
}

namespace {
void check_spec_shape(const std::string& path, const Shape& shape, const PartitionSpec& spec, Loc loc) {
  if (int(spec.size()) > shape.rank())
    throw PlanError("the sharding spec of '" + path + "' has more entries than the tensor has dimensions",
                    "at most " + std::to_string(shape.rank()) + " entries for shape " + shape.str(), spec_str(spec),
                    "one entry per dimension: \"\" for a dimension that is not split", loc);
  std::set<std::string> seen;
  for (const auto& a : spec)
    if (!a.empty() && !seen.insert(a).second)
      throw PlanError("the sharding spec of '" + path + "' splits two dimensions over axis '" + a + "'",
                      "each mesh axis at most once per spec", spec_str(spec), "split one dimension per axis", loc);
}
}  // namespace

std::map<std::string, PartitionSpec> partition_specs(const ShardingRules& rules,
                                                     const std::vector<std::pair<std::string, Shape>>& shapes,
                                                     Loc loc) {
  std::map<std::string, PartitionSpec> out;
  for (const auto& [path, shape] : shapes) {
    PartitionSpec s = spec_for(rules, path, loc);
    check_spec_shape(path, shape, s, loc);
    out[path] = std::move(s);
  }
  return out;
}

std::map<std::string, PartitionSpec> partition_specs(const ShardingRules& rules, const ParamTree& params, Loc loc) {
  std::vector<std::pair<std::string, Shape>> shapes;
  for (const auto& [p, t] : params) shapes.emplace_back(p, t.shape());
  return partition_specs(rules, shapes, loc);
}

void check_spec(const Shape& global, const PartitionSpec& spec, const Mesh& mesh, const std::string& what, Loc loc) {
  check_spec_shape(what, global, spec, loc);
  for (size_t d = 0; d < spec.size(); ++d) {
    if (spec[d].empty()) continue;
    mesh.check_axis(spec[d], loc);
    const int n = mesh.axis_size(spec[d], loc);
    if (global[d] % n != 0)
      throw ShapeError(what + ": dimension " + std::to_string(d) + " of " + global.str() +
                           " does not divide by the size of axis '" + spec[d] + "'",
                       "a multiple of " + std::to_string(n), std::to_string(global[d]),
                       "pick sizes divisible by the axis size, or use a smaller '" + spec[d] + "' axis", loc);
  }
}

Shape local_shape(const Shape& global, const PartitionSpec& spec, const Mesh& mesh, Loc loc) {
  check_spec(global, spec, mesh, "tensor", loc);
  Shape s = global;
  for (size_t d = 0; d < spec.size(); ++d)
    if (!spec[d].empty()) s[d] /= mesh.axis_size(spec[d], loc);
  return s;
}

Shape global_shape(const Shape& local, const PartitionSpec& spec, const Mesh& mesh, Loc loc) {
  Shape s = local;
  check_spec_shape("tensor", local, spec, loc);
  for (size_t d = 0; d < spec.size(); ++d)
    if (!spec[d].empty()) {
      mesh.check_axis(spec[d], loc);
      s[d] *= mesh.axis_size(spec[d], loc);
    }
  return s;
}

Tensor shard_of(const Tensor& global, const PartitionSpec& spec, const Mesh& mesh, Loc loc) {
  check_spec(global.shape(), spec, mesh, "shard_of", loc);
  Tensor t = global;
  for (size_t d = 0; d < spec.size(); ++d) {
    if (spec[d].empty()) continue;
    const int64_t n = global.shape()[d] / mesh.axis_size(spec[d], loc);
    const int64_t i = mesh.axis_index(spec[d], loc);
    t = slice(t, int(d), i * n, (i + 1) * n);
  }
  return t;
}

Tensor unshard(const Tensor& local, const PartitionSpec& spec, const Mesh& mesh, Loc loc) {
  Shape g = global_shape(local.shape(), spec, mesh, loc);
  (void)g;
  Tensor t = local;
  for (size_t d = 0; d < spec.size(); ++d)
    if (!spec[d].empty()) t = all_gather(mesh, t, spec[d], int(d), loc);
  return t;
}

}  // namespace titanax
