// GPT-2 style decoder-only transformer (Radford et al. 2019, "Language Models are Unsupervised Multitask
// Learners"), optionally split over a mesh axis with Megatron-LM tensor parallelism (Shoeybi et al.
// 2019, arXiv:1909.08053).
//
// It computes exactly what ../shared/peers/gpt_small_torch.py computes:
//   x = wte[ids] + wpe[0:T]
//   per block (pre-LN):  x = x + proj(causal_attention(split_qkv(qkv(ln1(x)))))
//                        x = x + out(gelu_tanh(fc(ln2(x))))
//   logits = lnf(x) @ wte^T                       (head tied to the token embedding, no bias)
// with q, k, v = the three consecutive dim-wide blocks of qkv's output (PyTorch's split(C, 2)), heads
// = view(B, T, heads, dim / heads), attention softmax(q k^T / sqrt(dim / heads) + causal mask) v.
// Init: Linear and Embedding weights N(0, 0.02^2), biases 0, LayerNorm weight 1 and bias 0 (eps 1e-5).
//
// Parameters (global shapes; "/"-joined paths):
//   wte/weight [padded vocab, dim] wpe/weight [seq_len, dim]       lnf/weight, lnf/bias [dim]
//   blocks/<i>/ln1/{weight,bias} [dim]                 blocks/<i>/ln2/{weight,bias} [dim]
//   blocks/<i>/attn/qkv/weight [3, dim, dim]  bias [3, dim]   (the memory of PyTorch's [3 dim, dim])
//   blocks/<i>/attn/proj/weight [dim, dim]    bias [dim]
//   blocks/<i>/mlp/fc/weight [4 dim, dim]     bias [4 dim]
//   blocks/<i>/mlp/out/weight [dim, 4 dim]    bias [dim]
// qkv keeps q, k and v as a leading axis of 3 so that splitting its dim 1 over the TP axis gives every
// rank whole q, k and v for its heads with a plain block split (what Megatron does by interleaving).
//
// Tensor parallelism over axis `tp_axis` of size n (GPT(cfg, mesh)): sharding_rules() say which
// parameters are split (vocab-parallel wte, column-parallel qkv / fc, row-parallel proj / out; the rest
// replicated); the local shapes follow from those specs and the mesh. Each rank holds heads / n heads
// and its vocabulary block; forward returns logits [B, T, vocab / n] (this rank's vocabulary block) and
// loss() uses the vocabulary-parallel cross-entropy, so the full logits are never gathered. Every
// parameter is initialised as the full tensor from the key of its path and then cut, so TP = 1, 2, 4
// start from the same model.
//
// Pipeline parallelism over mesh axis `pp_axis` of size S (GPT(cfg, mesh) with cfg.pp_axis set): the
// rank at stage s holds blocks [s L / S, (s + 1) L / S) (or the split cfg.pp_boundaries gives) under
// their global paths ("blocks/2/..." on stage 1 of 2 for L = 4), stage 0 also wte and wpe, the last stage also lnf and wte (the tied head:
// one parameter of the model held by two stages, nn::PipelineModule::tied_parameters()). Parameters
// start as in the unsplit model (keys from the global paths). The engine runs the stages with
// stage_forward(); forward() and loss() need the whole model (S = 1).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/nn.h"
#include "engine/pipeline_module.h"
#include "engine/tp_layers.h"
#include "parallel/sharding.h"

namespace titanax::nn {

struct GPTConfig {
  int64_t vocab = 8192;
  int64_t layers = 4;
  int64_t heads = 4;
  int64_t dim = 256;
  int64_t seq_len = 128;          ///< the longest sequence (rows of the position embedding)
  std::string tp_axis = "model";  ///< mesh axis of tensor parallelism (used when built with a mesh; "" = none)
  std::string pp_axis;            ///< mesh axis of pipeline parallelism (used when built with a mesh; "" = none)
  /// First block of each pipeline stage after stage 0 (S - 1 ascending indices; nn::StageSplit);
  /// empty = the even split, which needs layers divisible by S. Uneven splits balance the stages: the
  /// first also embeds, the last also runs the vocabulary head.
  std::vector<int64_t> pp_boundaries;
  DType dtype = DType::f32;       ///< parameters and computation (f64 for gradient checks)
  /// The token embedding (and tied head) get padded_vocab() rows, vocab rounded up to a multiple of
  /// this (Megatron-LM's make-vocab-size-divisible-by), so tensor parallelism splits a vocabulary such as
  /// GPT-2's 50257. The padding rows are never looked up (ids stay below vocab) and their logits are
  /// -inf, so loss, gradients and samples are those of the unpadded model.
  int64_t pad_vocab_multiple = 1;
  /// vocab rounded up to a multiple of pad_vocab_multiple: the rows of wte/weight.
  int64_t padded_vocab() const { return (vocab + pad_vocab_multiple - 1) / pad_vocab_multiple * pad_vocab_multiple; }
  /// LoRA fine-tuning (Hu et al. 2021, arXiv:2106.09685; engine/tp_layers.h): lora_rank > 0 gives every
  /// block's layers named in lora_targets an adapter of that rank ("blocks/<i>/attn/qkv/lora_a" [r, dim],
  /// ".../lora_b" [3, dim, r], ...) with scale lora_alpha / lora_rank, and freezes every other parameter
  /// (Module::set_trainable), as PEFT's get_peft_model does: training updates the adapters only, and
  /// checkpoints hold both. 0 = no adapters.
  int64_t lora_rank = 0;
  double lora_alpha = 8;  ///< PEFT's default (with its default rank 8: scale 1)
  double lora_dropout = 0;  ///< PEFT's lora_dropout: dropout on the adapters' input in training, in [0, 1)
  /// Of "attn/qkv", "attn/proj", "mlp/fc", "mlp/out" (GPT-2's c_attn, attn.c_proj, c_fc, mlp.c_proj);
  /// the default is PEFT's for GPT-2 (c_attn).
  std::vector<std::string> lora_targets{"attn/qkv"};
  /// Chunked loss head (0 = off): the loss is computed over chunks of this many tokens, each chunk's
  /// logits [tokens, vocab / n] made, reduced to its loss and freed, then made again in the backward
  /// (autodiff checkpoint()), so no [B * T, vocab] logits or their gradient are ever whole in memory
  /// (torchtune's chunked cross-entropy; Liger-Kernel's fused linear cross-entropy computes the
  /// gradients in the forward instead of recomputing). Costs one more head GEMM per chunk; the loss and
  /// gradients are those of the whole logits up to the order of the sums. Under jit the chunks are traced
  /// inline, not recomputed: the JIT fuses each chunk's cross-entropy with its gradient in the forward,
  /// and recomputing gave the same planned peak, 15% slower (docs/gpt.md). Must be >= 0.
  int64_t loss_chunk_tokens = 0;
  /// This config without adapters (lora_rank 0): the base model the adapters are trained on.
  GPTConfig without_lora() const {
    GPTConfig c = *this;
    c.lora_rank = 0;
    return c;
  }
};

/// Whether `path` is a LoRA adapter's ("blocks/<i>/<layer>/lora_a" or ".../lora_b").
inline bool is_lora_path(const std::string& path) { return path.ends_with("/lora_a") || path.ends_with("/lora_b"); }

/// One parameter as the model declares it: path, global shape, and spec from the sharding rules.
struct ParamLayout {
  std::string path;
  Shape global_shape;
  PartitionSpec spec;
};

class CausalSelfAttention;
class GPTBlock;

/// The keys and values of every block of a GPT for the positions it has seen (incremental decoding, as
/// Hugging Face's past_key_values): per block k and v [B, heads / n, length, head_dim] in the model's
/// dtype and device. Start from an empty cache; GPT::forward_cached fills it.
struct KVCache {
  std::vector<Tensor> k, v;
  int64_t length = 0;  ///< positions cached
};

class GPT final : public Module, public PipelineModule {
 public:
  /// The whole model on this rank (no collectives). Throws ValueError for non-positive sizes or a dim
  /// not divisible by heads.
  explicit GPT(GPTConfig cfg);
  /// Split over mesh axis cfg.tp_axis (any size n >= 1) when it is set, and into stages over
  /// cfg.pp_axis when that is set; collective-free to construct. Throws what GPT(cfg) throws, and
  /// PlanError (at `loc`) when an axis is not in the mesh ("did you mean"), when heads, 4 * dim or vocab
  /// does not divide by n, or layers by S (naming the value and the fix).
  GPT(GPTConfig cfg, const Mesh& mesh, Loc loc = Loc::current());

  /// ids: i32 / i64 [B, T] with T <= seq_len and every id in [0, vocab) -> logits [B, T, padded_vocab / n]
  /// in the parameters' dtype (this rank's vocabulary block; the full logits when n = 1; -inf for the
  /// padding ids, GPTConfig::pad_vocab_multiple). ShapeError for a
  /// wrong rank or T > seq_len, DTypeError for non-integer ids, ValueError for an id out of range;
  /// PlanError on a pipeline stage (S > 1: use stage_forward).
  Tensor forward(const Tensor& ids) override;
  /// Incremental decoding (inference; call under NoGradGuard): logits [B, T, vocab / n] of `ids` [B, T]
  /// at positions cache.length .. cache.length + T - 1, each attending to the cached positions and
  /// causally within ids; their keys and values are appended to `cache`. The first call on an empty
  /// cache takes the prompt (any T), later calls one position (T = 1): the same logits as forward() of
  /// the whole sequence, in one position's work per layer instead of the sequence's. Throws ShapeError
  /// when the positions pass seq_len, for T != 1 on a filled cache or a batch other than the cached
  /// one, and what forward() throws. `last_position_only`: logits [B, 1, vocab / n] of the last new
  /// position only (what decoding reads), skipping the head's GEMM for the others.
  Tensor forward_cached(const Tensor& ids, KVCache& cache, bool last_position_only = false);
  /// Language-model loss: cross-entropy of forward(ids) against targets [B, T] (global token ids),
  /// averaged over the B * T positions for Reduction::mean (the same on every TP rank). Uses the
  /// vocabulary-parallel cross-entropy when n > 1, and chunks of GPTConfig::loss_chunk_tokens tokens when
  /// that is > 0. ShapeError when targets' shape differs from ids'.
  Tensor loss(const Tensor& ids, const Tensor& targets, Reduction reduction = Reduction::mean);

  std::string name() const override;
  /// Each parameter's spec from sharding_rules(cfg.tp_axis) when built with a mesh; all replicated
  /// (empty specs) for GPT(cfg), whose tensors are whole.
  std::map<std::string, PartitionSpec> partition_specs() const override;
  const GPTConfig& config() const { return cfg_; }
  // nn::PipelineModule (S = 1 without a pipe axis: one stage holding everything).
  int pipeline_stages() const override { return pp_size_; }
  int pipeline_stage() const override { return pp_index_; }
  /// Stage 0: embeds mb["x"] ([B, T] ids); other stages take `input` [B, T, dim]; runs this stage's
  /// blocks; the last stage returns loss(…) of the result against mb["y"] with `reduction`, the others
  /// the activation [B, T, dim]. Throws ShapeError / ValueError as forward() and loss(), and ShapeError
  /// when `input` is missing or of the wrong shape on a stage > 0.
  Tensor stage_forward(const Tensor& input, const Batch& mb, Reduction reduction) override;
  /// [B, T, dim] in the model's dtype, B and T from mb["x"].
  TensorSpec stage_input_spec(const Batch& mb) const override;
  /// {"wte/weight", the other end, counted on stage 0} on the first and last stage when S > 1; none else.
  std::vector<Tied> tied_parameters() const override;
  /// k >= 0 (ValueError otherwise): groups of k consecutive blocks of this stage (the last one shorter).
  void set_recompute_layers(int k) override;
  /// This stage's blocks: global indices [first_layer(), first_layer() + local layers).
  int64_t first_layer() const { return layer_lo_; }

  /// The TP size n and this rank's index on the TP axis (1 and 0 without a mesh).
  int tp_size() const { return tp_.size(); }
  int tp_index() const { return tp_.index(); }
  /// Where the model is split (a default group without a mesh).
  const TPGroup& tp_group() const { return tp_; }

  /// Sets the parameters this rank holds from whole tensors, in place (optimizers and checkpoints keep
  /// their references): `global` holds every path of layout(config()) with its global shape, in any
  /// floating dtype and on any device (cast to cfg.dtype, moved to the parameters' device); each rank
  /// copies its tensor-parallel block (shard_of its spec) of the parameters of its pipeline stage. The
  /// LoRA adapters' paths may be left out (base weights, e.g. a pretrained GPT-2): those keep their
  /// values. Not collective. Throws ValueError naming the first path that is missing, unexpected, of
  /// another shape or not floating; nothing is written then.
  void load_global_parameters(const ParamTree& global);
  /// The same for the LoRA adapters alone: `adapters` holds every "/lora_a" and "/lora_b" path of
  /// layout(config()) and nothing else (e.g. read from a PEFT folder); the base weights are left as they
  /// are. ValueError as load_global_parameters, and for a path that is not an adapter's.
  void load_global_adapters(const ParamTree& adapters);
  /// Whole parameters of a model with config `cfg` (the paths of layout(cfg)) with every LoRA adapter
  /// merged into its layer's weight, W + (lora_alpha / lora_rank) lora_b lora_a (PEFT's
  /// merge_and_unload), in W's dtype: the parameters of cfg.without_lora(), computing the same function.
  /// `global` unchanged when cfg has no adapters. ValueError for a missing path or a wrong shape.
  static ParamTree merge_lora(const ParamTree& global, const GPTConfig& cfg);

  /// Megatron's layout as glob rules over the parameter paths (parallel/sharding.h):
  ///   wte/weight -> {axis, ""}, blocks/*/attn/qkv/weight -> {"", axis, ""}, blocks/*/attn/qkv/bias ->
  ///   {"", axis}, blocks/*/attn/proj/weight -> {"", axis}, blocks/*/mlp/fc/weight -> {axis, ""},
  ///   blocks/*/mlp/fc/bias -> {axis}, blocks/*/mlp/out/weight -> {"", axis}; LoRA adapters split as their
  ///   layer's weight (column-parallel qkv / fc: lora_b's rows, row-parallel proj / out: lora_a's columns,
  ///   engine/tp_layers.h); everything else replicated.
  static ShardingRules sharding_rules(const std::string& axis = "model");
  /// Every parameter of a model with config `cfg` in parameter order, with its global shape and its
  /// spec from sharding_rules(cfg.tp_axis). Needs no mesh (for checkpoint metadata and resharding).
  static std::vector<ParamLayout> layout(const GPTConfig& cfg);
  /// Throws PlanError (at `loc`) unless heads, 4 * dim and vocab divide by `tp_size`.
  static void check_tensor_parallel(const GPTConfig& cfg, int tp_size, const std::string& axis, Loc loc = Loc::current());
  /// The stage of each block (assign_stages with cfg.pp_boundaries). Throws PlanError (at `loc`) when
  /// layers do not divide by `stages` for the even split, or the boundaries do not split the layers.
  static std::vector<int> check_pipeline(const GPTConfig& cfg, int stages, const std::string& axis, Loc loc = Loc::current());

 private:
  void build();
  void load_global(const ParamTree& global, bool adapters_only);
  Tensor embed(const Tensor& ids, int64_t first_position = 0);
  Tensor run_blocks(Tensor x);
  Tensor head(const Tensor& x);
  /// The logits of the final norm's output x (through Megatron's f under TP): x @ wte^T over this rank's
  /// vocabulary block, the padding ids at -inf.
  Tensor logits_of(const Tensor& x);
  Tensor lm_loss_of(const Tensor& logits, const Tensor& targets, Reduction reduction);
  /// Cross-entropy of logits [N, V / n] against targets [N] (vocabulary-parallel under TP).
  Tensor token_losses(const Tensor& logits, const Tensor& targets, Reduction reduction);
  /// lm_loss_of(head(x)), in chunks of cfg_.loss_chunk_tokens tokens when that is > 0.
  Tensor head_loss(const Tensor& x, const Tensor& targets, Reduction reduction);
  void check_whole(const char* what) const;
  GPTConfig cfg_;
  TPGroup tp_;
  int pp_size_ = 1, pp_index_ = 0;
  int64_t layer_lo_ = 0, layer_hi_ = 0;
  int recompute_layers_ = 0;
  std::shared_ptr<VocabParallelEmbedding> wte_;
  std::shared_ptr<Embedding> wpe_;
  std::vector<std::shared_ptr<GPTBlock>> blocks_;
  std::shared_ptr<LayerNorm> lnf_;
  Tensor logit_mask_;  // [padded_vocab / n]: 0, and -inf for the padding ids (GPTConfig::pad_vocab_multiple)
};

/// Options of generate(). temperature 0 = greedy (argmax); otherwise tokens are drawn from
/// softmax(logits / temperature), restricted to the top_k most likely tokens when top_k > 0, and then to
/// the nucleus when top_p < 1: the fewest most likely tokens whose probabilities sum to at least top_p
/// (Holtzman et al. 2019, arXiv:1904.09751; Hugging Face's TopPLogitsWarper), renormalised.
struct GenerateOptions {
  int64_t max_new_tokens = 100;
  double temperature = 1.0;
  int64_t top_k = 0;
  double top_p = 1.0;        ///< in (0, 1]; 1 = off
  uint64_t seed = 0;         ///< draw i uses philox4x32({i, 0, 0, 0}, key(seed)): the same on every rank
  int64_t stop_token = -1;   ///< stop after emitting this id (e.g. the tokenizer's end-of-text); -1 = never
  /// Decode with a KVCache while the sequence fits seq_len (the prompt once, then one position per
  /// token); false recomputes the whole window every token. Both give the same tokens.
  bool kv_cache = true;
};

/// Autoregressive sampling (as in GPT-2 / nanoGPT's generate): appends up to max_new_tokens ids to
/// `prompt` (ids in [0, vocab)). While the sequence fits seq_len each token costs one position's forward
/// (GPT::forward_cached); past it, the window of the last seq_len tokens is run from position 0 every
/// token (nanoGPT's crop: learned positions end at seq_len). Under TP it is collective (every rank of the model's TP group must
/// call it with the same arguments) and all ranks return the same ids. Runs without recording a tape.
/// Returns prompt + the new ids. Throws ValueError for an empty prompt, a temperature that is negative,
/// infinite or NaN, a negative top_k or max_new_tokens, a top_p outside (0, 1], or an id out of range.
std::vector<int64_t> generate(GPT& model, std::vector<int64_t> prompt, const GenerateOptions& opts = {});

/// Engine LossFn for language models: mean cross-entropy of batch "x" (token ids [B, T]) against "y"
/// (next tokens [B, T]): GPT::loss for a GPT (vocabulary-parallel under TP), else
/// cross_entropy(model(x) reshaped to [B * T, V], y reshaped to [B * T]).
Tensor lm_loss(Module& model, const Batch& batch);
/// Engine EvalFn for language models: {"loss": summed cross-entropy over the tokens, "count": B * T};
/// the engine reports "eval/loss" = mean per-token loss.
Metrics lm_metrics(Module& model, const Batch& batch);

}  // namespace titanax::nn
