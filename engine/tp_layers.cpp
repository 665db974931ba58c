#include "engine/tp_layers.h"

#include <cmath>
#include <sstream>

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

/// The same for U(-bound, bound).
std::function<void(Tensor&, RngKey)> sharded_uniform(TPGroup tp, Shape global, PartitionSpec spec, double bound) {
  return [tp = std::move(tp), global, spec = std::move(spec), bound](Tensor& t, RngKey k) {
    NoGradGuard ng;
    Tensor full = random_uniform(k, global, DType::f64) * (2 * bound) - bound;
    copy_(t, tp.shard(full, spec));
  };
}

void zero_init(Tensor& t, RngKey) { fill_(t, 0.0); }

/// add_lora's checks; returns the scale alpha / r.
double lora_scale(int64_t r, double alpha, double dropout, int64_t in, int64_t out, bool has_one, const char* module) {
  const std::string m(module);
  if (has_one) throw ValueError(m + ": a second LoRA adapter", "at most one adapter per layer", "add_lora called twice");
  if (r < 1 || r > std::min(in, out))
    throw ValueError(m + ": LoRA rank out of range", "1 <= r <= min(in, out) = " + std::to_string(std::min(in, out)),
                     std::to_string(r), "a small rank such as 8 (model.lora_rank)");
  if (!(alpha > 0 && std::isfinite(alpha)))
    throw ValueError(m + ": LoRA alpha must be finite and > 0", "alpha > 0 (the scale is alpha / r)", std::to_string(alpha),
                     "set model.lora_alpha, e.g. to the rank for a scale of 1");
  if (!(dropout >= 0 && dropout < 1))
    throw ValueError(m + ": LoRA dropout must lie in [0, 1)", "0 <= p < 1", std::to_string(dropout), "set model.lora_dropout");
  return alpha / double(r);
}

/// The adapter's input: x, or in training with p > 0 x under inverted dropout (RngContext's next key, as
/// nn::Dropout). `tp_block`: x is this rank's block of the last axis of an input split over tp, and its
/// mask is that block of a mask drawn for the whole input (the unsplit layer's).
Tensor lora_input(const Module& m, const Tensor& x, double p, const TPGroup& tp, bool tp_block) {
  if (!m.training() || p == 0) return x;
  const RngKey key = RngContext::next_key();
  const Tensor& step = RngContext::step();
  const auto drop = [&](const Tensor& t) { return step.defined() ? dropout(t, p, key, step) : dropout(t, p, key); };
  if (!tp_block || !tp.has_mesh()) return drop(x);
  const int last = x.dim() - 1;
  const int64_t n = x.shape()[last];
  Shape whole = x.shape();
  whole[last] = n * tp.size();
  const Tensor mask = drop(ones(whole, x.dtype(), x.device()));  // 0 or 1 / (1 - p)
  return mul(x, mask.slice(last, tp.index() * n, (tp.index() + 1) * n));
}

/// ", LoRA r=8 scale 2" in a layer's name when it has an adapter.
std::string lora_str(const Tensor& lora_a, double scale, double dropout) {
  if (!lora_a.defined()) return "";
  std::ostringstream o;
  o << ", LoRA r=" << lora_a.shape()[0] << " scale " << scale << (dropout > 0 ? " dropout " : "");
  if (dropout > 0) o << dropout;
  return o.str();
}

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
  Tensor y = tp_.has_mesh() ? column_parallel_linear(tp_.mesh(), x, w, b, tp_.axis()) : linear(x, w, b);
  if (!lora_a.defined()) return y;
  Tensor h = linear(lora_input(*this, x, lora_dropout_, tp_, false), lora_a) * lora_scale_;  // [..., r], the same on every rank
  if (tp_.has_mesh()) h = copy_to_tensor_parallel_region(tp_.mesh(), h, tp_.axis());  // its gradient: every block's
  const int64_t r = lora_a.shape()[0];
  return add(y, linear(h, groups_ == 1 ? lora_b : lora_b.reshape(Shape{local_out, r})));
}

void ColumnParallelLinear::add_lora(int64_t r, double alpha, double dropout) {
  lora_scale_ = lora_scale(r, alpha, dropout, in_, out_ / groups_, lora_a.defined(), "ColumnParallelLinear");
  lora_dropout_ = dropout;
  const DType dt = weight.dtype();
  const Shape bg = weight_shape(r, out_, groups_);
  const PartitionSpec bs = weight_spec(tp_.axis(), groups_);
  lora_a = register_parameter("lora_a", empty(Shape{r, in_}, dt), sharded_uniform(tp_, Shape{r, in_}, {}, 1 / std::sqrt(double(in_))));
  lora_b = register_parameter("lora_b", empty(tp_.local_shape(bg, bs, "ColumnParallelLinear lora_b"), dt), zero_init);
  init_parameter("lora_a", 0), init_parameter("lora_b", 0);
}

std::string ColumnParallelLinear::name() const {
  return "ColumnParallelLinear(" + std::to_string(in_) + " -> " + std::to_string(out_) +
         (groups_ > 1 ? ", groups=" + std::to_string(groups_) : std::string()) + ", split " + std::to_string(tp_.size()) +
         (tp_.has_mesh() ? " ways on '" + tp_.axis() + "'" : std::string(" ways")) + (bias.defined() ? ", bias" : "") +
         lora_str(lora_a, lora_scale_, lora_dropout_) + ")";
}

std::map<std::string, PartitionSpec> ColumnParallelLinear::partition_specs() const {
  std::map<std::string, PartitionSpec> m{{"weight", reported(tp_, weight_spec(tp_.axis(), groups_))}};
  if (bias.defined()) m["bias"] = reported(tp_, bias_spec(tp_.axis(), groups_));
  if (lora_a.defined()) m["lora_a"] = {}, m["lora_b"] = reported(tp_, weight_spec(tp_.axis(), groups_));
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
  Tensor y = tp_.has_mesh() ? row_parallel_linear(tp_.mesh(), x, weight, bias, tp_.axis()) : linear(x, weight, bias);
  if (!lora_a.defined()) return y;
  Tensor h = linear(lora_input(*this, x, lora_dropout_, tp_, true), lora_a) * lora_scale_;  // this rank's part of [..., r]
  if (tp_.has_mesh()) h = reduce_from_tensor_parallel_region(tp_.mesh(), h, tp_.axis());  // the whole sum
  return add(y, linear(h, lora_b));
}

void RowParallelLinear::add_lora(int64_t r, double alpha, double dropout) {
  lora_scale_ = lora_scale(r, alpha, dropout, in_, out_, lora_a.defined(), "RowParallelLinear");
  lora_dropout_ = dropout;
  const DType dt = weight.dtype();
  const Shape ag{r, in_};
  const PartitionSpec as{"", tp_.axis()};
  lora_a = register_parameter("lora_a", empty(tp_.local_shape(ag, as, "RowParallelLinear lora_a"), dt),
                              sharded_uniform(tp_, ag, as, 1 / std::sqrt(double(in_))));
  lora_b = register_parameter("lora_b", empty(Shape{out_, r}, dt), zero_init);
  init_parameter("lora_a", 0), init_parameter("lora_b", 0);
}

std::string RowParallelLinear::name() const {
  return "RowParallelLinear(" + std::to_string(in_) + " -> " + std::to_string(out_) + ", split " +
         std::to_string(tp_.size()) + (tp_.has_mesh() ? " ways on '" + tp_.axis() + "'" : std::string(" ways")) +
         (bias.defined() ? ", bias" : "") + lora_str(lora_a, lora_scale_, lora_dropout_) + ")";
}

std::map<std::string, PartitionSpec> RowParallelLinear::partition_specs() const {
  std::map<std::string, PartitionSpec> m{{"weight", reported(tp_, {"", tp_.axis()})}};
  if (bias.defined()) m["bias"] = {};
  if (lora_a.defined()) m["lora_a"] = reported(tp_, {"", tp_.axis()}), m["lora_b"] = {};
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
