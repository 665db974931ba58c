// Sharding rules: glob patterns over "/"-joined parameter paths mapped to a PartitionSpec, and the
// shapes and slices they imply on a mesh.
//
//   ShardingRules rules{{"blocks/*/mlp/fc/weight", {"model", ""}},     // column-parallel
//                       {"blocks/*/mlp/out/weight", {"", "model"}},    // row-parallel
//                       {"**/bias", {}}};                             // replicated
//   PartitionSpec s = spec_for(rules, "blocks/3/mlp/fc/weight");       // {"model", ""}
//
// Patterns (matched against the whole path, segment by segment):
//   literal text matches itself; `*` matches any run of characters inside one segment (never "/"),
//   so "blocks/*/attn" matches "blocks/12/attn" and "h*" matches "head"; a segment that is exactly `**`
//   matches zero or more whole segments ("**/bias" matches "bias" and "blocks/0/mlp/fc/bias").
// Precedence (the most specific matching rule wins), compared in this order:
//   1. fewer `**` segments,
//   2. fewer `*` wildcards (outside `**` segments),
//   3. more literal characters (everything that is not a wildcard, "/" included),
//   4. otherwise the two rules are equally specific: when their specs differ, spec_for throws PlanError
//      naming both patterns (an ambiguous rule set is a bug in the plan); equal specs are fine.
// So "blocks/0/attn/qkv/weight" (no wildcard) beats "blocks/*/attn/qkv/weight", which beats
// "**/weight". A path no rule matches is replicated (an empty spec).
//
// A PartitionSpec (parallel/mesh.h) has at most one entry per tensor dimension; missing trailing entries
// mean "not split". Dimension d split over axis a is cut into axis_size(a) equal contiguous blocks and
// the rank at coordinate i on a holds block i (the layout Megatron-LM and JAX use).
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "core/tensor.h"
#include "core/tree.h"
#include "parallel/mesh.h"

namespace titanax {

/// One rule: parameters whose path matches `pattern` get `spec`.
struct ShardingRule {
  std::string pattern;
  PartitionSpec spec;
};
using ShardingRules = std::vector<ShardingRule>;

/// Whether `path` matches the glob `pattern` (syntax above). Pure; never throws.
bool glob_match(std::string_view pattern, std::string_view path);

/// How specific a pattern is: larger compares as more specific (precedence rules 1-3 above).
struct PatternSpecificity {
  int double_stars = 0;     ///< `**` segments
  int stars = 0;            ///< `*` wildcards outside `**` segments
  int literal_chars = 0;    ///< characters that are not wildcards
  /// True when *this is strictly more specific than o.
  bool more_specific_than(const PatternSpecificity& o) const;
  bool same_as(const PatternSpecificity& o) const;
};
PatternSpecificity specificity(std::string_view pattern);

/// The most specific rule matching `path`, or nullptr when none does. Throws PlanError (at `loc`) when
/// two equally specific matching rules give different specs.
const ShardingRule* match_rule(const ShardingRules& rules, const std::string& path, Loc loc = Loc::current());

/// The spec of `path`: the most specific match's spec, or {} (replicated) when no rule matches.
/// Throws PlanError for an ambiguous match (see match_rule).
PartitionSpec spec_for(const ShardingRules& rules, const std::string& path, Loc loc = Loc::current());

/// The spec of every path of `params` (by spec_for), keyed by path. Also checks each spec against its
/// tensor: no more entries than dimensions and no axis named twice (PlanError naming the parameter).
std::map<std::string, PartitionSpec> partition_specs(const ShardingRules& rules, const ParamTree& params,
                                                     Loc loc = Loc::current());
/// The same from global shapes by path (no tensors needed: what the model computes before allocating).
std::map<std::string, PartitionSpec> partition_specs(const ShardingRules& rules,
                                                     const std::vector<std::pair<std::string, Shape>>& shapes,
                                                     Loc loc = Loc::current());

/// True when some entry of `spec` names an axis (the tensor is split, not replicated).
bool is_sharded(const PartitionSpec& spec);
/// The distinct axes `spec` splits over, in dimension order.
std::vector<std::string> spec_axes(const PartitionSpec& spec);
/// "[model, -]" ("-" for an unsplit dimension; "[]" for replicated).
std::string spec_str(const PartitionSpec& spec);

/// Checks `spec` for a tensor of `global` shape on `mesh`: at most one entry per dimension, each named
/// axis exists (MeshError with "did you mean"), no axis twice (PlanError), every split dimension divides
/// by its axis size (ShapeError naming the dimension and the axis). `what` names the tensor.
void check_spec(const Shape& global, const PartitionSpec& spec, const Mesh& mesh, const std::string& what = "tensor",
                Loc loc = Loc::current());

/// The shape one rank holds: each split dimension divided by its axis size. Throws as check_spec.
Shape local_shape(const Shape& global, const PartitionSpec& spec, const Mesh& mesh, Loc loc = Loc::current());
/// The global shape from a local one: each split dimension multiplied by its axis size.
Shape global_shape(const Shape& local, const PartitionSpec& spec, const Mesh& mesh, Loc loc = Loc::current());

/// This rank's block of a full (global) tensor: along each split dimension d over axis a, elements
/// [i * n, (i + 1) * n) with i = mesh.axis_index(a), n = global.shape[d] / axis_size(a). A view (slice)
/// of `global`, differentiable. Throws as check_spec.
Tensor shard_of(const Tensor& global, const PartitionSpec& spec, const Mesh& mesh, Loc loc = Loc::current());

/// The full tensor from every rank's block: all_gather over each split axis (collective over those
/// axes; every rank of each group must call it). Differentiable (the vjp of all_gather is reduce_scatter,
/// JAX's SPMD convention, parallel/collectives.h). Throws as check_spec.
Tensor unshard(const Tensor& local, const PartitionSpec& spec, const Mesh& mesh, Loc loc = Loc::current());

}  // namespace titanax
