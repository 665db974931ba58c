#include "engine/tp_layers.h"

#include "autodiff/tape.h"

namespace titanax::nn {
namespace {

void check_positive(int64_t v, const char* what, const char* module) {
  if (v <= 0) throw ValueError(std::string(module) + ": " + what + " must be positive", "> 0", std::to_string(v));
}

/// Draws the full global tensor N(0, std^2) from the key and keeps this rank's block.
std::function<void(Tensor&, RngKey)> sharded_normal(TPGroup tp, Shape global, PartitionSpec spec, double std) {
  return [tp = std::move(tp), global, spec = std::move(spec), std](Tensor& t, RngKey k) {
    NoGradGuard ng;
    Tensor full = random_normal(k, global, DType::f64) * std;
    copy_(t, tp.shard(full, spec));
  };
}

void zero_init(Tensor& t, RngKey) { fill_(t, 0.0); }

/// The spec a parameter reports: the layout's spec on a mesh, replicated without one.
PartitionSpec reported(const TPGroup& tp, const PartitionSpec& spec) { return tp.has_mesh() ? spec : PartitionSpec{}; }

}  // namespace

// ------------------------------------------------------------------------------ ColumnParallelLinear
Shape ColumnParallelLinear::weight_shape(int64_t in, int64_t out, int64_t groups) {
  return groups == 1 ? Shape{out, in} : Shape{groups, out / groups, in};
}
PartitionSpec ColumnParallelLinear::weight_spec(const std::string& axis, int64_t groups) {
  return groups == 1 ? PartitionSpec{axis, ""} : PartitionSpec{"", axis, ""};
}
Shape ColumnParallelLinear::bias_shape(int64_t out, int64_t groups) {
  return groups == 1 ? Shape{out} : Shape{groups, out / groups};
}
PartitionSpec ColumnParallelLinear::bias_spec(const std::string& axis, int64_t groups) {
  return groups == 1 ? PartitionSpec{axis} : PartitionSpec{"", axis};
}

ColumnParallelLinear::ColumnParallelLinear(int64_t in, int64_t out, TPGroup tp, bool has_bias, int64_t groups,
                                           double init_std, DType dtype)
    : in_(in), out_(out), groups_(groups), tp_(std::move(tp)) {
  check_positive(in, "in_features", "ColumnParallelLinear");
  check_positive(out, "out_features", "ColumnParallelLinear");
  check_positive(groups, "groups", "ColumnParallelLinear");
  if (out % groups != 0)
    throw ValueError("ColumnParallelLinear: out_features must divide into the groups", "a multiple of " + std::to_string(groups),
                     std::to_string(out));
  const Shape wg = weight_shape(in, out, groups), bg = bias_shape(out, groups);
  const PartitionSpec ws = weight_spec(tp_.axis(), groups), bs = bias_spec(tp_.axis(), groups);
  weight = register_parameter("weight", empty(tp_.local_shape(wg, ws, "ColumnParallelLinear weight"), dtype),
                              sharded_normal(tp_, wg, ws, init_std));
  if (has_bias) bias = register_parameter("bias", empty(tp_.local_shape(bg, bs, "ColumnParallelLinear bias"), dtype), zero_init);
  init_parameters(0);
}

Tensor ColumnParallelLinear::forward(const Tensor& x) {
  const int64_t local_out = out_ / tp_.size();
  // [groups, out_g / n, in] is contiguous, so viewing it as [out / n, in] is free.
  Tensor w = groups_ == 1 ? weight : weight.reshape(Shape{local_out, in_});
  Tensor b = !bias.defined() || groups_ == 1 ? bias : bias.reshape(Shape{local_out});
  if (!tp_.has_mesh()) return linear(x, w, b);
  return column_parallel_linear(tp_.mesh(), x, w, b, tp_.axis());
}

std::string ColumnParallelLinear::name() const {
  return "ColumnParallelLinear(" + std::to_string(in_) + " -> " + std::to_string(out_) +
         (groups_ > 1 ? ", groups=" + std::to_string(groups_) : std::string()) + ", split " + std::to_string(tp_.size()) +
         (tp_.has_mesh() ? " ways on '" + tp_.axis() + "'" : std::string(" ways")) + (bias.defined() ? ", bias)" : ")");
}

std::map<std::string, PartitionSpec> ColumnParallelLinear::partition_specs() const {
  std::map<std::string, PartitionSpec> m{{"weight", reported(tp_, weight_spec(tp_.axis(), groups_))}};
  if (bias.defined()) m["bias"] = reported(tp_, bias_spec(tp_.axis(), groups_));
  return m;
}

// ------------------------------------------------------------------------------ RowParallelLinear
RowParallelLinear::RowParallelLinear(int64_t in, int64_t out, TPGroup tp, bool has_bias, double init_std, DType dtype)
    : in_(in), out_(out), tp_(std::move(tp)) {
  check_positive(in, "in_features", "RowParallelLinear");
  check_positive(out, "out_features", "RowParallelLinear");
  const Shape wg{out, in};
  const PartitionSpec ws{"", tp_.axis()};
  weight = register_parameter("weight", empty(tp_.local_shape(wg, ws, "RowParallelLinear weight"), dtype),
                              sharded_normal(tp_, wg, ws, init_std));
  if (has_bias) bias = register_parameter("bias", empty(Shape{out}, dtype), zero_init);
  init_parameters(0);
}

Tensor RowParallelLinear::forward(const Tensor& x) {
  if (!tp_.has_mesh()) return linear(x, weight, bias);
  return row_parallel_linear(tp_.mesh(), x, weight, bias, tp_.axis());
}

std::string RowParallelLinear::name() const {
  return "RowParallelLinear(" + std::to_string(in_) + " -> " + std::to_string(out_) + ", split " +
         std::to_string(tp_.size()) + (tp_.has_mesh() ? " ways on '" + tp_.axis() + "'" : std::string(" ways")) +
         (bias.defined() ? ", bias)" : ")");
}

std::map<std::string, PartitionSpec> RowParallelLinear::partition_specs() const {
  std::map<std::string, PartitionSpec> m{{"weight", reported(tp_, {"", tp_.axis()})}};
  if (bias.defined()) m["bias"] = {};
  return m;
}

// ------------------------------------------------------------------------------ VocabParallelEmbedding
VocabParallelEmbedding::VocabParallelEmbedding(int64_t num, int64_t dim, TPGroup tp, double init_std, DType dtype)
    : num_(num), dim_(dim), tp_(std::move(tp)) {
  check_positive(num, "num_embeddings", "VocabParallelEmbedding");
  check_positive(dim, "dim", "VocabParallelEmbedding");
  const Shape wg{num, dim};
  const PartitionSpec ws{tp_.axis(), ""};
  weight = register_parameter("weight", empty(tp_.local_shape(wg, ws, "VocabParallelEmbedding weight"), dtype),
                              sharded_normal(tp_, wg, ws, init_std));
  init_parameters(0);
}

Tensor VocabParallelEmbedding::forward(const Tensor& ids) {
  if (!tp_.has_mesh()) return embedding(weight, ids);
  return vocab_parallel_embedding(tp_.mesh(), weight, ids, tp_.axis());
}

std::string VocabParallelEmbedding::name() const {
  return "VocabParallelEmbedding(" + std::to_string(num_) + ", " + std::to_string(dim_) + ", split " +
         std::to_string(tp_.size()) + (tp_.has_mesh() ? " ways on '" + tp_.axis() + "')" : std::string(" ways)"));
}

std::map<std::string, PartitionSpec> VocabParallelEmbedding::partition_specs() const {
  return {{"weight", reported(tp_, {tp_.axis(), ""})}};
}

}  // namespace titanax::nn
