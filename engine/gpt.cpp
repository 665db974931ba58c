#include "engine/gpt.h"

#include <cmath>
#include <algorithm>
#include <limits>
#include <numeric>

#include "autodiff/autodiff.h"
#include "parallel/tp.h"

namespace titanax::nn {

// ------------------------------------------------------------------------------ blocks

/// Causal self-attention with heads / n heads on this rank: qkv column-parallel (3 groups), proj
/// row-parallel. x [B, T, dim] replicated -> [B, T, dim] replicated.
class CausalSelfAttention final : public Module {
 public:
  CausalSelfAttention(int64_t dim, int64_t heads, const TPGroup& tp, DType dt) : dim_(dim), heads_(heads), n_(tp.size()) {
    qkv = register_module("qkv", std::make_shared<ColumnParallelLinear>(dim, 3 * dim, tp, true, 3, 0.02, dt));
    proj = register_module("proj", std::make_shared<RowParallelLinear>(dim, dim, tp, true, 0.02, dt));
  }
  Tensor forward(const Tensor& x) override {
    const int64_t B = x.shape()[0], T = x.shape()[1], hl = heads_ / n_, hd = dim_ / heads_;
    // softmax(q k^T / sqrt(hd) + causal mask) v for this rank's heads, fused (FlashAttention-2 tiling: no
    // [T, T] scores in memory) on the projection's layout [B, T, 3, hl, hd] (a view), giving [B, T, hl, hd]:
    // on a GPU nothing is copied either way (no permute of o, no concat of dq, dk, dv).
    const Tensor att = scaled_dot_product_attention_qkvpacked((*qkv)(x).reshape(Shape{B, T, 3, hl, hd}), /*is_causal=*/true);
    return (*proj)(att.reshape(Shape{B, T, hl * hd}));
  }
  // Incremental decoding: x [B, T, dim] at the positions after the `k` / `v` cached ([B, hl, L, hd], or
  // undefined for L = 0). A first call (L = 0) attends causally within x; later calls take one new
  // position (T = 1), which attends to every cached position and itself. Appends x's keys and values.
  Tensor forward_cached(const Tensor& x, Tensor& k, Tensor& v) {
    const int64_t B = x.shape()[0], T = x.shape()[1], hl = heads_ / n_, hd = dim_ / heads_;
    const Tensor p = (*qkv)(x).reshape(Shape{B, T, 3, hl, hd});
    auto part = [&](int j) { return p.slice(2, j, j + 1).reshape(Shape{B, T, hl, hd}).permute({0, 2, 1, 3}); };
    const bool first = !k.defined();
    k = first ? part(1).contiguous() : concat({k, part(1)}, 2);
    v = first ? part(2).contiguous() : concat({v, part(2)}, 2);
    const Tensor att = scaled_dot_product_attention(part(0), k, v, /*is_causal=*/first);  // [B, hl, T, hd]
    return (*proj)(att.permute({0, 2, 1, 3}).reshape(Shape{B, T, hl * hd}));
  }
  std::string name() const override {
    return "CausalSelfAttention(dim=" + std::to_string(dim_) + ", heads=" + std::to_string(heads_) +
           (n_ > 1 ? ", " + std::to_string(heads_ / n_) + " per rank)" : ")");
  }
  std::shared_ptr<ColumnParallelLinear> qkv;
  std::shared_ptr<RowParallelLinear> proj;

 private:
  int64_t dim_, heads_;
  int n_;
};

/// fc column-parallel -> tanh-GELU -> out row-parallel.
class GPTMLP final : public Module {
 public:
  GPTMLP(int64_t dim, const TPGroup& tp, DType dt) {
    fc = register_module("fc", std::make_shared<ColumnParallelLinear>(dim, 4 * dim, tp, true, 1, 0.02, dt));
    out = register_module("out", std::make_shared<RowParallelLinear>(4 * dim, dim, tp, true, 0.02, dt));
  }
  Tensor forward(const Tensor& x) override { return (*out)(gelu((*fc)(x), true)); }
  std::string name() const override { return "MLP(fc -> gelu(tanh) -> out)"; }
  std::shared_ptr<ColumnParallelLinear> fc;
  std::shared_ptr<RowParallelLinear> out;
};

/// Pre-LN transformer block.
class GPTBlock final : public Module {
 public:
  GPTBlock(int64_t dim, int64_t heads, const TPGroup& tp, DType dt) {
    ln1 = register_module("ln1", std::make_shared<LayerNorm>(dim, 1e-5, dt));
    attn = register_module("attn", std::make_shared<CausalSelfAttention>(dim, heads, tp, dt));
    ln2 = register_module("ln2", std::make_shared<LayerNorm>(dim, 1e-5, dt));
    mlp = register_module("mlp", std::make_shared<GPTMLP>(dim, tp, dt));
  }
  Tensor forward(const Tensor& x) override {
    Tensor h = add(x, (*attn)((*ln1)(x)));
    return add(h, (*mlp)((*ln2)(h)));
  }
  Tensor forward_cached(const Tensor& x, Tensor& k, Tensor& v) {
    Tensor h = add(x, attn->forward_cached((*ln1)(x), k, v));
    return add(h, (*mlp)((*ln2)(h)));
  }
  std::string name() const override { return "Block"; }
  std::shared_ptr<LayerNorm> ln1, ln2;
  std::shared_ptr<CausalSelfAttention> attn;
  std::shared_ptr<GPTMLP> mlp;
};

// ------------------------------------------------------------------------------ GPT

namespace {
const std::vector<std::string> kLoraTargets{"attn/qkv", "attn/proj", "mlp/fc", "mlp/out"};

/// A block layer that can take a LoRA adapter: its global input and output features and its groups (3
/// for qkv).
struct LoraLayer {
  int64_t in, out, groups;
};
LoraLayer lora_layer(const std::string& target, int64_t D) {
  if (target == "attn/qkv") return {D, 3 * D, 3};
  if (target == "attn/proj") return {D, D, 1};
  if (target == "mlp/fc") return {D, 4 * D, 1};
  return {4 * D, D, 1};  // mlp/out (check_config allows no other)
}

void check_config(const GPTConfig& c) {
  auto pos = [](int64_t v, const char* what) {
    if (v <= 0) throw ValueError(std::string("GPTConfig.") + what + " must be positive", "> 0", std::to_string(v));
  };
  pos(c.vocab, "vocab");
  pos(c.layers, "layers");
  pos(c.heads, "heads");
  pos(c.dim, "dim");
  pos(c.seq_len, "seq_len");
  pos(c.pad_vocab_multiple, "pad_vocab_multiple");
  if (c.dim % c.heads != 0)
    throw ValueError("GPTConfig.dim must divide by heads", "dim a multiple of heads=" + std::to_string(c.heads),
                     "dim=" + std::to_string(c.dim), "pick dim = heads * head_dim, e.g. 256 = 4 * 64");
  if (c.loss_chunk_tokens < 0)
    throw ValueError("GPTConfig.loss_chunk_tokens must be >= 0", ">= 0 (0 = the whole logits at once)",
                     std::to_string(c.loss_chunk_tokens), "e.g. 1024 tokens per chunk");
  if (c.lora_rank < 0)
    throw ValueError("GPTConfig.lora_rank must be >= 0", ">= 0 (0 = no LoRA adapters)", std::to_string(c.lora_rank));
  if (c.lora_rank > 0) {
    if (c.lora_targets.empty())
      throw ValueError("GPTConfig.lora_targets is empty while lora_rank is " + std::to_string(c.lora_rank),
                       "at least one of " + join(kLoraTargets), "none", "name the layers to adapt, e.g. [attn/qkv]");
    for (size_t i = 0; i < c.lora_targets.size(); ++i) {
      const std::string& t = c.lora_targets[i];
      if (std::find(kLoraTargets.begin(), kLoraTargets.end(), t) == kLoraTargets.end())
        throw ValueError("GPTConfig.lora_targets: '" + t + "' is not a layer of a GPT block", "one of " + join(kLoraTargets),
                         "'" + t + "'", did_you_mean(t, kLoraTargets));
      if (std::find(c.lora_targets.begin(), c.lora_targets.begin() + i, t) != c.lora_targets.begin() + i)
        throw ValueError("GPTConfig.lora_targets names '" + t + "' twice", "each layer once", "'" + t + "' twice");
    }
  }
  if (c.dtype != DType::f32 && c.dtype != DType::f64)
    throw DTypeError("GPTConfig.dtype must be f32 or f64", "f32 or f64", std::string(dtype_name(c.dtype)),
                     "use f32 (mixed precision comes with the CUDA backend)");
}
}  // namespace

void GPT::check_tensor_parallel(const GPTConfig& c, int n, const std::string& axis, Loc loc) {
  auto need = [&](int64_t v, const std::string& what, const std::string& fix) {
    if (v % n != 0)
      throw PlanError("GPT: " + what + " (" + std::to_string(v) + ") does not divide by the tensor-parallel size " +
                          std::to_string(n) + " of axis '" + axis + "'",
                      what + " a multiple of " + std::to_string(n), std::to_string(v),
                      "use a '" + axis + "' axis whose size divides " + std::to_string(v) + ", or " + fix, loc);
  };
  need(c.heads, "heads", "change GPTConfig.heads (each rank holds heads / n whole attention heads)");
  need(4 * c.dim, "4 * dim", "change GPTConfig.dim (the MLP width 4 * dim is split over the ranks)");
  need(c.padded_vocab(), c.padded_vocab() == c.vocab ? "vocab" : "padded vocab",
       "set GPTConfig.pad_vocab_multiple to a multiple of " + std::to_string(n) + " (model.pad_vocab_to; the padding "
       "ids' logits are masked)");
  // Every rank's vocabulary block holds a real id: a block of padding only has no finite logit.
  const int64_t block = c.padded_vocab() / n;
  if (c.padded_vocab() - c.vocab >= block)
    throw PlanError("GPT: the padding of the vocabulary fills the last tensor-parallel rank's block",
                    "padding (" + std::to_string(c.padded_vocab() - c.vocab) + " ids) below the block of " + std::to_string(block),
                    "padded vocab " + std::to_string(c.padded_vocab()) + " for vocab " + std::to_string(c.vocab),
                    "lower GPTConfig.pad_vocab_multiple", loc);
}

GPT::GPT(GPTConfig cfg) : cfg_(std::move(cfg)) {
  check_config(cfg_);
  layer_hi_ = cfg_.layers;
  build();
}

std::vector<int> GPT::check_pipeline(const GPTConfig& c, int stages, const std::string& axis, Loc loc) {
  if (c.pp_boundaries.empty() && c.layers % stages != 0)
    throw PlanError("GPT: layers (" + std::to_string(c.layers) + ") do not divide into the " + std::to_string(stages) +
                        " pipeline stages of axis '" + axis + "'",
                    "layers a multiple of " + std::to_string(stages), std::to_string(c.layers),
                    "use a '" + axis + "' axis whose size divides " + std::to_string(c.layers) +
                        ", change GPTConfig.layers, or give pp_boundaries",
                    loc);
  std::vector<std::vector<std::string>> blocks;
  for (int64_t i = 0; i < c.layers; ++i) blocks.push_back({"blocks/" + std::to_string(i)});
  return assign_stages(blocks, stages, StageSplit{.boundaries = c.pp_boundaries}, loc);
}

namespace {
// PlanError unless `axis` is in the mesh ("did you mean", the config field to set).
void need_axis(const Mesh& mesh, const std::string& axis, const char* role, const char* field, Loc loc) {
  if (mesh.has_axis(axis)) return;
  std::string hint = did_you_mean(axis, mesh.axes());
  const bool near = hint.rfind("did you mean", 0) == 0;
  throw PlanError("GPT: " + std::string(role) + " axis '" + axis + "' is not in the mesh" + (near ? "; " + hint : ""),
                  "one of [" + join(mesh.axes()) + "]", "'" + axis + "'",
                  near ? "set GPTConfig." + std::string(field) + " = \"" + nearest(axis, mesh.axes()) + "\""
                       : "add the axis to the mesh, e.g. MeshSpec{{\"data\", \"" + axis + "\"}, {-1, 2}}",
                  loc);
}
}  // namespace

GPT::GPT(GPTConfig cfg, const Mesh& mesh, Loc loc) : cfg_(std::move(cfg)) {
  check_config(cfg_);
  if (!cfg_.tp_axis.empty()) {
    need_axis(mesh, cfg_.tp_axis, "tensor-parallel", "tp_axis", loc);
    check_tensor_parallel(cfg_, mesh.axis_size(cfg_.tp_axis), cfg_.tp_axis, loc);
    tp_ = TPGroup(mesh, cfg_.tp_axis, loc);
  }
  if (!cfg_.pp_axis.empty()) {
    need_axis(mesh, cfg_.pp_axis, "pipeline", "pp_axis", loc);
    if (cfg_.pp_axis == cfg_.tp_axis)
      throw PlanError("GPT: tensor and pipeline parallelism on the same axis '" + cfg_.pp_axis + "'", "two different axes",
                      "tp_axis = pp_axis = '" + cfg_.pp_axis + "'", "e.g. tp_axis \"model\", pp_axis \"pipe\"", loc);
    pp_size_ = mesh.axis_size(cfg_.pp_axis);
    pp_index_ = mesh.axis_index(cfg_.pp_axis);
    const std::vector<int> st = check_pipeline(cfg_, pp_size_, cfg_.pp_axis, loc);
    layer_lo_ = std::find(st.begin(), st.end(), pp_index_) - st.begin();
    layer_hi_ = st.rend() - std::find(st.rbegin(), st.rend(), pp_index_);
  } else {
    layer_hi_ = cfg_.layers;
  }
  build();
}

void GPT::build() {
  const int64_t D = cfg_.dim;
  const DType dt = cfg_.dtype;
  const bool first = pp_index_ == 0, last = pp_index_ == pp_size_ - 1;
  if (first || last) wte_ = register_module("wte", std::make_shared<VocabParallelEmbedding>(cfg_.padded_vocab(), D, tp_, 0.02, dt));
  if (first) wpe_ = register_module("wpe", std::make_shared<Embedding>(cfg_.seq_len, D, 0.02, dt));
  for (int64_t i = layer_lo_; i < layer_hi_; ++i) blocks_.push_back(std::make_shared<GPTBlock>(D, cfg_.heads, tp_, dt));
  auto blocks = register_module("blocks", std::make_shared<NamedModules>());  // global indices: "blocks/2", ...
  for (size_t k = 0; k < blocks_.size(); ++k) blocks->add(std::to_string(layer_lo_ + int64_t(k)), blocks_[k]);
  if (last) lnf_ = register_module("lnf", std::make_shared<LayerNorm>(D, 1e-5, dt));
  for (const auto& b : blocks_)
    for (const std::string& t : cfg_.lora_rank > 0 ? cfg_.lora_targets : std::vector<std::string>{}) {
      if (t == "attn/qkv") b->attn->qkv->add_lora(cfg_.lora_rank, cfg_.lora_alpha, cfg_.lora_dropout);
      else if (t == "attn/proj") b->attn->proj->add_lora(cfg_.lora_rank, cfg_.lora_alpha, cfg_.lora_dropout);
      else if (t == "mlp/fc") b->mlp->fc->add_lora(cfg_.lora_rank, cfg_.lora_alpha, cfg_.lora_dropout);
      else b->mlp->out->add_lora(cfg_.lora_rank, cfg_.lora_alpha, cfg_.lora_dropout);
    }
  init_parameters(0);  // keys from the full paths ("blocks/1/mlp/fc/weight"), so layers differ
  if (cfg_.lora_rank > 0) {  // the adapters train, the base model stays (PEFT)
    set_trainable("**", false);
    set_trainable("**/lora_a", true);
    set_trainable("**/lora_b", true);
  }

  // The layers implement the compute; the rules are the declared layout the plan, the engine and
  // checkpoints read. They must agree (a broken invariant here is a bug in this file).
  if (tp_.has_mesh()) {
    auto from_rules = partition_specs();
    auto from_layers = Module::partition_specs();
    for (const auto& [p, t] : parameters()) {
      if (from_rules.at(p) != from_layers[p])
        throw InternalError("GPT: the sharding rules and the layers disagree on '" + p + "'", spec_str(from_layers[p]),
                            spec_str(from_rules.at(p)));
      Shape want = tp_.local_shape(global_shape(t.shape(), from_rules.at(p), tp_.mesh()), from_rules.at(p), p);
      if (want != t.shape()) throw InternalError("GPT: local shape of '" + p + "'", want.str(), t.shape().str());
    }
  }
}

ShardingRules GPT::sharding_rules(const std::string& a) {
  return {{"wte/weight", {a, ""}},
          {"blocks/*/attn/qkv/weight", {"", a, ""}},
          {"blocks/*/attn/qkv/bias", {"", a}},
          {"blocks/*/attn/proj/weight", {"", a}},
          {"blocks/*/mlp/fc/weight", {a, ""}},
          {"blocks/*/mlp/fc/bias", {a}},
          {"blocks/*/mlp/out/weight", {"", a}},
          {"blocks/*/attn/qkv/lora_b", {"", a, ""}},
          {"blocks/*/attn/proj/lora_a", {"", a}},
          {"blocks/*/mlp/fc/lora_b", {a, ""}},
          {"blocks/*/mlp/out/lora_a", {"", a}}};
}

std::vector<ParamLayout> GPT::layout(const GPTConfig& c) {
  check_config(c);
  const int64_t D = c.dim;
  std::vector<std::pair<std::string, Shape>> shapes{{"wte/weight", {c.padded_vocab(), D}}, {"wpe/weight", {c.seq_len, D}}};
  for (int64_t i = 0; i < c.layers; ++i) {
    const std::string b = "blocks/" + std::to_string(i) + "/";
    shapes.push_back({b + "ln1/weight", {D}});
    shapes.push_back({b + "ln1/bias", {D}});
    shapes.push_back({b + "attn/qkv/weight", ColumnParallelLinear::weight_shape(D, 3 * D, 3)});
    shapes.push_back({b + "attn/qkv/bias", ColumnParallelLinear::bias_shape(3 * D, 3)});
    shapes.push_back({b + "attn/proj/weight", {D, D}});
    shapes.push_back({b + "attn/proj/bias", {D}});
    shapes.push_back({b + "ln2/weight", {D}});
    shapes.push_back({b + "ln2/bias", {D}});
    shapes.push_back({b + "mlp/fc/weight", {4 * D, D}});
    shapes.push_back({b + "mlp/fc/bias", {4 * D}});
    shapes.push_back({b + "mlp/out/weight", {D, 4 * D}});
    shapes.push_back({b + "mlp/out/bias", {D}});
    for (const std::string& t : c.lora_rank > 0 ? c.lora_targets : std::vector<std::string>{}) {
      const LoraLayer l = lora_layer(t, D);
      shapes.push_back({b + t + "/lora_a", {c.lora_rank, l.in}});
      shapes.push_back({b + t + "/lora_b", ColumnParallelLinear::weight_shape(c.lora_rank, l.out, l.groups)});
    }
  }
  shapes.push_back({"lnf/weight", {D}});
  shapes.push_back({"lnf/bias", {D}});
  auto specs = titanax::partition_specs(sharding_rules(c.tp_axis), shapes);
  std::vector<ParamLayout> out;
  for (auto& [p, s] : shapes) out.push_back({p, s, specs.at(p)});
  return out;
}

std::map<std::string, PartitionSpec> GPT::partition_specs() const {
  std::map<std::string, PartitionSpec> out;
  ShardingRules rules = sharding_rules(cfg_.tp_axis);
  for (const auto& [p, t] : parameters()) out[p] = tp_.has_mesh() ? spec_for(rules, p) : PartitionSpec{};
  return out;
}

void GPT::load_global_parameters(const ParamTree& global) { load_global(global, false); }

void GPT::load_global_adapters(const ParamTree& adapters) { load_global(adapters, true); }

void GPT::load_global(const ParamTree& global, bool adapters_only) {
  const char* what = adapters_only ? "GPT::load_global_adapters" : "GPT::load_global_parameters";
  std::map<std::string, Shape> shapes;
  std::vector<std::string> paths;
  for (const ParamLayout& l : layout(cfg_))
    if (!adapters_only || is_lora_path(l.path)) shapes.emplace(l.path, l.global_shape), paths.push_back(l.path);
  for (const auto& [p, t] : global) {
    auto it = shapes.find(p);
    if (it == shapes.end())
      throw ValueError(std::string(what) + ": '" + p + "' is not " + (adapters_only ? "a LoRA adapter" : "a parameter") +
                           " of this GPT",
                       "a path of GPT::layout" + std::string(adapters_only ? " ending in /lora_a or /lora_b" : ""),
                       "'" + p + "'", did_you_mean(p, paths));
    if (!t.defined() || !is_floating(t.dtype()) || t.shape() != it->second)
      throw ValueError(std::string(what) + ": '" + p + "' does not fit the model's config",
                       "a floating tensor of global shape " + it->second.str(), t.defined() ? spec_str(t) : "undefined",
                       "build the GPT with the config the weights were made for");
  }
  for (const std::string& p : paths)
    if (!global.contains(p) && (adapters_only || !is_lora_path(p)))
      throw ValueError(std::string(what) + ": no tensor for '" + p + "'", "every path of GPT::layout", "none",
                       "give the whole model's " + std::string(adapters_only ? "adapters" : "parameters") + " (" +
                           std::to_string(paths.size()) + " tensors)");
  NoGradGuard ng;
  const std::map<std::string, PartitionSpec> specs = partition_specs();
  for (auto [p, t] : parameters()) {
    if (!global.contains(p)) continue;  // an adapter (or, loading adapters, a base weight) left as it is
    const Tensor& g = global.at(p);
    copy_(t, tp_.has_mesh() ? shard_of(g, specs.at(p), tp_.mesh()) : g);
  }
}

ParamTree GPT::merge_lora(const ParamTree& global, const GPTConfig& c) {
  std::map<std::string, Shape> shapes;
  for (const ParamLayout& l : layout(c)) shapes.emplace(l.path, l.global_shape);  // checks the config
  if (c.lora_rank == 0) return global;
  const auto whole = [&](const std::string& p) -> const Tensor& {
    if (!global.contains(p) || !global.at(p).defined() || global.at(p).shape() != shapes.at(p))
      throw ValueError("GPT::merge_lora: no tensor of global shape " + shapes.at(p).str() + " for '" + p + "'",
                       "every path of GPT::layout with its global shape",
                       global.contains(p) && global.at(p).defined() ? spec_str(global.at(p)) : "none",
                       "pass the whole model's parameters (gather tensor-parallel and pipeline shards first)");
    return global.at(p);
  };
  std::map<std::string, Tensor> merged;  // layer weight path -> the weight with its adapter merged
  const int64_t r = c.lora_rank;
  for (const auto& [p, s] : shapes) {
    if (!p.ends_with("/lora_a")) continue;
    const std::string layer = p.substr(0, p.size() - std::string("lora_a").size());  // "blocks/<i>/attn/qkv/"
    const Tensor &w = whole(layer + "weight"), &a = whole(p), &b = whole(layer + "lora_b");
    NoGradGuard ng;  // lora_b [out, r] (qkv's [3, dim, r]) times lora_a [r, in], in W's layout
    const Tensor delta = matmul(b.reshape(Shape{b.numel() / r, r}), a) * (c.lora_alpha / double(r));
    merged[layer + "weight"] = add(w, delta.astype(w.dtype()).reshape(w.shape()));
  }
  ParamTree out;
  for (const auto& [p, t] : global) {
    if (is_lora_path(p)) continue;
    auto it = merged.find(p);
    out.insert(p, it != merged.end() ? it->second : t);
  }
  return out;
}

void GPT::check_whole(const char* what) const {
  if (pp_size_ > 1)
    throw PlanError(std::string("GPT::") + what + " needs the whole model, but this rank holds pipeline stage " +
                        std::to_string(pp_index_) + " of " + std::to_string(pp_size_),
                    "a GPT built without a pipe axis", "stage " + std::to_string(pp_index_) + " of " + std::to_string(pp_size_),
                    "train through the Engine (it runs stage_forward on every stage), or load the checkpoint into a "
                    "GPT built without GPTConfig.pp_axis");
}

Tensor GPT::embed(const Tensor& ids, int64_t first_position) {
  check_dtype(ids, {DType::i32, DType::i64}, "GPT (token ids)");
  if (ids.dim() != 2)
    throw ShapeError("GPT takes token ids [B, T]", "a rank-2 tensor of token ids", ids.shape().str(),
                     "reshape a single sequence to [1, T]");
  const int64_t T = ids.shape()[1], end = first_position + T;
  if (end > cfg_.seq_len || T == 0)
    throw ShapeError("GPT: sequence length out of range",
                     "1 <= T and positions up to seq_len = " + std::to_string(cfg_.seq_len),
                     "T = " + std::to_string(T) + (first_position ? " after " + std::to_string(first_position) + " cached" : ""),
                     "raise GPTConfig.seq_len or cut the sequences");
  return add((*wte_)(ids), wpe_->weight.slice(0, first_position, end));
}

Tensor GPT::run_blocks(Tensor x) {
  std::vector<Module*> ls;
  for (auto& b : blocks_) ls.push_back(b.get());
  return run_layers(ls, std::move(x), recompute_layers_);
}

Tensor GPT::head(const Tensor& x0) {
  Tensor x = (*lnf_)(x0);
  // Tied head: logits = x @ wte^T; under TP, f before the local matmul gives this rank's vocabulary block.
  return logits_of(tp_.has_mesh() ? copy_to_tensor_parallel_region(tp_.mesh(), x, tp_.axis()) : x);
}

Tensor GPT::logits_of(const Tensor& x) {
  Tensor logits = linear(x, wte_->weight);
  if (cfg_.padded_vocab() == cfg_.vocab) return logits;
  // The padding ids of this rank's block [lo, lo + n): -inf, so softmax and cross-entropy ignore them.
  // Built once per device and dtype (not a host-to-device copy every step).
  if (!logit_mask_.defined() || logit_mask_.device() != logits.device() || logit_mask_.dtype() != logits.dtype()) {
    const int64_t n = logits.shape()[logits.dim() - 1], lo = n * tp_.index();
    std::vector<double> mask(size_t(n), 0.0);
    for (int64_t j = std::max<int64_t>(0, cfg_.vocab - lo); j < n; ++j) mask[size_t(j)] = -INFINITY;
    logit_mask_ = from_vector(mask, Shape{n}, logits.dtype()).to(logits.device());
  }
  return logits + logit_mask_;
}

namespace {
// Targets [B, T] for activations or logits whose leading dimensions are [B, T].
void check_targets(const Tensor& targets, const Tensor& x) {
  const Shape want{x.shape()[0], x.shape()[1]};
  if (targets.shape() != want)
    throw ShapeError("GPT::loss: targets do not match the ids", "targets of shape " + want.str(), targets.shape().str(),
                     "targets are the next tokens: y[b, t] = x[b, t + 1]");
}
}  // namespace

Tensor GPT::lm_loss_of(const Tensor& logits, const Tensor& targets, Reduction reduction) {
  check_targets(targets, logits);
  const int64_t V = logits.shape()[2];
  return token_losses(logits.reshape(Shape{-1, V}), targets.reshape(Shape{-1}), reduction);
}

Tensor GPT::token_losses(const Tensor& logits, const Tensor& targets, Reduction reduction) {
  if (tp_.size() > 1) return vocab_parallel_cross_entropy(tp_.mesh(), logits, targets, tp_.axis(), reduction);
  return cross_entropy(logits, targets, reduction);
}

Tensor GPT::head_loss(const Tensor& x0, const Tensor& targets, Reduction reduction) {
  const int64_t chunk = cfg_.loss_chunk_tokens;
  if (chunk <= 0) return lm_loss_of(head(x0), targets, reduction);
  check_targets(targets, x0);
  Tensor x = (*lnf_)(x0);
  if (tp_.has_mesh()) x = copy_to_tensor_parallel_region(tp_.mesh(), x, tp_.axis());  // once, not per chunk
  const int64_t N = targets.numel();
  const Tensor h = x.reshape(Shape{N, cfg_.dim}), y = targets.reshape(Shape{N});
  // Each chunk's loss as one checkpointed node: its logits live only inside it (made again in the backward).
  // Under jit the chunks are traced inline instead: recomputing them there (checkpoint() under a trace)
  // gave the same planned peak and took 15% longer (bench/gpt_step --jit --loss-chunk, docs/gpt.md).
  const Reduction per_chunk = reduction == Reduction::none ? Reduction::none : Reduction::sum;
  const bool traced = apply_observer() != nullptr;
  TensorList parts;
  for (int64_t lo = 0; lo < N; lo += chunk) {
    const Tensor yc = y.slice(0, lo, std::min(N, lo + chunk)), hc = h.slice(0, lo, std::min(N, lo + chunk));
    auto chunk_loss = [this, yc, per_chunk](const Tensor& x) { return token_losses(logits_of(x), yc, per_chunk); };
    parts.push_back(traced ? chunk_loss(hc) : checkpoint(chunk_loss, hc, {wte_->weight}));
  }
  if (reduction == Reduction::none) return parts.size() == 1 ? parts[0] : concat(parts, 0);
  Tensor total = parts[0];
  for (size_t i = 1; i < parts.size(); ++i) total = total + parts[i];
  if (reduction == Reduction::sum) return total;
  // The mean over the targets that are not cross_entropy's ignore_index, as the unchunked loss takes it.
  return total / sum(ne(y, scalar(-100.0, y.dtype(), y.device())).astype(total.dtype()));
}

Tensor GPT::forward(const Tensor& ids) {
  check_whole("forward");
  return head(run_blocks(embed(ids)));
}

Tensor GPT::forward_cached(const Tensor& ids, KVCache& cache, bool last_position_only) {
  check_whole("forward_cached");
  if (cache.k.empty()) cache.k.resize(blocks_.size()), cache.v.resize(blocks_.size());
  if (cache.length > 0 && (ids.dim() != 2 || ids.shape()[1] != 1))
    throw ShapeError("GPT::forward_cached: after the first call, one new position at a time",
                     "ids [B, 1]", ids.shape().str(), "pass the prompt in the first call, then one token per call");
  if (cache.length > 0 && ids.shape()[0] != cache.k[0].shape()[0])
    throw ShapeError("GPT::forward_cached: the batch differs from the cached one", std::to_string(cache.k[0].shape()[0]),
                     std::to_string(ids.shape()[0]), "use one KVCache per batch");
  Tensor x = embed(ids, cache.length);
  for (size_t i = 0; i < blocks_.size(); ++i) x = blocks_[i]->forward_cached(x, cache.k[i], cache.v[i]);
  const int64_t T = ids.shape()[1];
  cache.length += T;
  return head(last_position_only ? x.slice(1, T - 1, T) : x);
}

Tensor GPT::loss(const Tensor& ids, const Tensor& targets, Reduction reduction) {
  check_whole("loss");
  return head_loss(run_blocks(embed(ids)), targets, reduction);  // checks targets against the ids' [B, T]
}

Tensor GPT::stage_forward(const Tensor& input, const Batch& mb, Reduction reduction) {
  const bool first = pp_index_ == 0, last = pp_index_ == pp_size_ - 1;
  Tensor x;
  if (first) {
    x = embed(mb["x"]);
  } else {
    const TensorSpec want = stage_input_spec(mb);
    if (!input.defined() || input.shape() != want.shape)
      throw ShapeError("GPT stage " + std::to_string(pp_index_) + " got the wrong input activation",
                       want.shape.str() + " from stage " + std::to_string(pp_index_ - 1),
                       input.defined() ? input.shape().str() : "none",
                       "every stage must get the same microbatch (same B and T)");
    x = input;
  }
  x = run_blocks(x);
  return last ? head_loss(x, mb["y"], reduction) : x;
}

TensorSpec GPT::stage_input_spec(const Batch& mb) const {
  const Tensor& ids = mb["x"];
  if (ids.dim() != 2)
    throw ShapeError("GPT takes token ids [B, T]", "a rank-2 tensor of token ids", ids.shape().str(),
                     "reshape a single sequence to [1, T]");
  return {Shape{ids.shape()[0], ids.shape()[1], cfg_.dim}, cfg_.dtype, device()};
}

std::vector<PipelineModule::Tied> GPT::tied_parameters() const {
  if (pp_size_ == 1) return {};
  if (pp_index_ == 0) return {{"wte/weight", pp_size_ - 1, true}};
  if (pp_index_ == pp_size_ - 1) return {{"wte/weight", 0, false}};
  return {};
}

void GPT::set_recompute_layers(int k) {
  if (k < 0) throw ValueError("GPT::set_recompute_layers: k must be >= 0", ">= 0 (0 = off)", std::to_string(k));
  recompute_layers_ = k;
}

std::string GPT::name() const {
  return "GPT(vocab=" + std::to_string(cfg_.vocab) +
         (cfg_.padded_vocab() != cfg_.vocab ? " padded to " + std::to_string(cfg_.padded_vocab()) : "") +
         ", layers=" + std::to_string(cfg_.layers) +
         ", heads=" + std::to_string(cfg_.heads) + ", dim=" + std::to_string(cfg_.dim) +
         ", seq_len=" + std::to_string(cfg_.seq_len) +
         (cfg_.lora_rank > 0 ? ", LoRA r=" + std::to_string(cfg_.lora_rank) + " on " + join(cfg_.lora_targets) : "") +
         (tp_.has_mesh() ? ", tensor parallel " + std::to_string(tp_.size()) + " on '" + tp_.axis() + "'" : "") +
         (pp_size_ > 1 ? ", pipeline stage " + std::to_string(pp_index_) + " of " + std::to_string(pp_size_) + " on '" +
                             cfg_.pp_axis + "' (blocks " + std::to_string(layer_lo_) + ".." + std::to_string(layer_hi_ - 1) + ")"
                       : "") +
         ")";
}

Tensor lm_loss(Module& model, const Batch& b) {
  if (auto* g = dynamic_cast<GPT*>(&model)) return g->loss(b["x"], b["y"]);
  Tensor logits = model(b["x"]);
  return cross_entropy(logits.reshape(Shape{-1, logits.shape().back()}), b["y"].reshape(Shape{-1}));
}

Metrics lm_metrics(Module& model, const Batch& b) {
  const Tensor &x = b["x"], &y = b["y"];
  double loss;
  if (auto* g = dynamic_cast<GPT*>(&model)) {
    loss = g->loss(x, y, Reduction::sum).item();
  } else {
    Tensor logits = model(x);
    loss = cross_entropy(logits.reshape(Shape{-1, logits.shape().back()}), y.reshape(Shape{-1}), Reduction::sum).item();
  }
  return {{"loss", loss}, {"count", double(y.numel())}};
}

std::vector<int64_t> generate(GPT& model, std::vector<int64_t> prompt, const GenerateOptions& o) {
  const GPTConfig& cfg = model.config();
  if (prompt.empty()) throw ValueError("generate: empty prompt", "at least one token id", "none", "encode some text first");
  if (!(o.temperature >= 0 && std::isfinite(o.temperature)) || o.top_k < 0 || o.max_new_tokens < 0 ||
      !(o.top_p > 0 && o.top_p <= 1))
    throw ValueError("generate: temperature must be finite and >= 0, top_k and max_new_tokens >= 0, top_p in (0, 1]",
                     "temperature >= 0 (0 = greedy), top_k >= 0 (0 = all), max_new_tokens >= 0, 0 < top_p <= 1 (1 = all)",
                     "temperature " + std::to_string(o.temperature) + ", top_k " + std::to_string(o.top_k) +
                         ", max_new_tokens " + std::to_string(o.max_new_tokens) + ", top_p " + std::to_string(o.top_p));
  for (int64_t id : prompt)
    if (id < 0 || id >= cfg.vocab)
      throw ValueError("generate: prompt id out of range", "ids in [0, " + std::to_string(cfg.vocab) + ")",
                       std::to_string(id), "use the tokenizer the model was trained with");
  NoGradGuard no_grad;
  const bool was_training = model.training();
  model.eval();
  const RngKey key = RngKey::from_seed(o.seed);
  KVCache cache;
  for (int64_t i = 0; i < o.max_new_tokens; ++i) {
    Tensor logits;  // [1, 1, V / n]
    if (o.kv_cache && int64_t(prompt.size()) <= cfg.seq_len) {  // the new positions only
      std::vector<int64_t> fresh(prompt.begin() + cache.length, prompt.end());
      logits = model.forward_cached(from_vector(fresh, Shape{1, int64_t(fresh.size())}).to(model.device()), cache, true);
    } else {  // the window of the last seq_len tokens from position 0, as nanoGPT crops
      const int64_t T = std::min<int64_t>(int64_t(prompt.size()), cfg.seq_len);
      const Tensor window = from_vector(std::vector<int64_t>(prompt.end() - T, prompt.end()), Shape{1, T}).to(model.device());
      KVCache once;  // the head on the last position only
      logits = o.kv_cache ? model.forward_cached(window, once, true) : model.forward(window).slice(1, T - 1, T);
    }
    if (model.tp_size() > 1)
      logits = gather_from_tensor_parallel_region(model.tp_group().mesh(), logits, cfg.tp_axis, -1);
    std::vector<double> l = logits.astype(DType::f64).contiguous().to_vector<double>();
    int64_t next = 0;
    if (o.temperature == 0) {
      next = std::max_element(l.begin(), l.end()) - l.begin();
    } else {
      std::vector<int64_t> order(l.size());
      std::iota(order.begin(), order.end(), int64_t(0));
      size_t k = o.top_k > 0 ? std::min<size_t>(size_t(o.top_k), l.size()) : l.size();
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) { return l[a] > l[b]; });
      std::vector<double> p(k);
      double total = 0;
      for (size_t j = 0; j < k; ++j) total += p[j] = std::exp((l[order[j]] - l[order[0]]) / o.temperature);
      if (o.top_p < 1) {  // the nucleus: the first m of the sorted k whose mass reaches top_p of the total
        double mass = 0;
        size_t m = 0;
        while (m < k && mass < o.top_p * total) mass += p[m++];
        k = std::max<size_t>(m, 1), total = mass;
      }
      auto w = philox4x32({uint32_t(i), uint32_t(uint64_t(i) >> 32), 0, 0}, key);
      double u = double(((uint64_t(w[0]) << 32) | w[1]) >> 11) / 9007199254740992.0 * total;  // U[0, total), 53 bits
      size_t j = 0;
      while (j + 1 < k && u >= p[j]) u -= p[j++];
      next = order[j];
    }
    prompt.push_back(next);
    if (next == o.stop_token) break;
  }
  model.train(was_training);
  return prompt;
}

}  // namespace titanax::nn
