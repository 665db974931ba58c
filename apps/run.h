// The `titanax run` / `describe` configuration: its schema (every key, type, default and doc) and the
// builders that turn a validated Config into a mesh, a plan, a model, an optimizer and data.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <titanax/titanax.h>

namespace titanax::app {

/// The schema of run configs (examples/configs/*.yaml). `titanax describe --schema` prints it.
const ConfigSchema& run_schema();

/// Loads and validates a run config (ConfigError / IOError on bad input).
Config load_run_config(const std::string& path, const std::vector<std::string>& overrides);

/// The mesh spec from `mesh:`: axes in canonical order (data, other axes in name order, pipe, model;
/// the last varies fastest), so tensor-parallel groups are consecutive ranks, as Megatron lays them out.
MeshSpec mesh_spec(const Config& c);
/// The plan from `plan:` (DP always; TP when plan.tp.axis is set).
Plan plan(const Config& c);
/// The GPT configuration from `model:` (model.kind gpt).
nn::GPTConfig gpt_config(const Config& c);
/// The model from `model:` (initialised from `seed`, then with model.init_from's GPT-2 weights unless
/// `pretrained` is false, as describe needs no weights): split over the TP axis of `mesh` when the plan
/// has TP and a mesh is given, else whole. ConfigError when model.kind does not fit data.dataset, TP is
/// asked of a model without tensor-parallel layers, or model.init_from of a model that is not a GPT;
/// what nn::load_gpt2_weights throws.
std::shared_ptr<nn::Module> model(const Config& c, const Mesh* mesh, bool pretrained = true);
/// The learning-rate schedule and optimizer from `schedule:` and `optimizer:`; total_steps for decays.
std::unique_ptr<optim::Optimizer> optimizer(const Config& c, int64_t total_steps);

struct Data {
  std::unique_ptr<DataLoader> loader;  ///< this rank's part of each global batch
  EvalSpec eval;                       ///< test split (mnist) or the first data.val_batches of val.bin
  int64_t train_examples = 0;          ///< images, or T-token windows for token data
};
/// Loads the dataset (fetching it on rank 0 first when data.fetch is set and its files are absent).
Data data(const Config& c, const Mesh& mesh, const Plan& plan);
/// Optimizer steps of the run: train.steps, or train.epochs * (train examples / global batch).
int64_t total_steps(const Config& c, int64_t train_examples);

/// Everything `titanax run` does; returns the process exit code. Rank 0 prints the final train loss and
/// "test accuracy X" (classifiers) or "val loss X" / "val perplexity Y" (language models).
int run(const Config& c, Runtime& rt);

struct SampleOptions {
  std::string prompt;
  int64_t max_new_tokens = 100;
  double temperature = 0.8;
  int64_t top_k = 40;
  double top_p = 1.0;
  uint64_t seed = 0;
};
/// `titanax eval`: loads the weights as sample does (the latest checkpoint of checkpoint.dir, under any
/// mesh and plan, or model.init_from) and evaluates them on the config's evaluation data, as a run's
/// final evaluation does (data.val_batches of val.bin for a GPT, the test split for a classifier);
/// prints the weights' source, then "val loss" and "val perplexity" (GPT) or "test loss" and "test
/// accuracy", on rank 0. Throws what sample and run throw.
int evaluate(const Config& c, Runtime& rt);

/// `titanax sample`: loads the latest checkpoint of checkpoint.dir (under any mesh: it reshards), or
/// without checkpoint.dir or a checkpoint there the GPT-2 weights of model.init_from; encodes the prompt with data.tokenizer
/// (default <data.path>/tokenizer.model; a GPT-2 folder works too) and prints the weights' source, then
/// the prompt and its continuation as the tokenizer decodes it, on rank 0. Throws ConfigError without
/// either weights or for a tokenizer with more ids than model.vocab, CheckpointError without a checkpoint.
int sample(const Config& c, Runtime& rt, const SampleOptions& opts);

/// `titanax export`: loads the weights as sample does (a checkpoint, or model.init_from) and writes the model's
/// forward, in eval mode, as an ONNX model (io/onnx.h) to `path`: input "images" f32 [batch, 1, 28, 28]
/// (MNIST models) or "ids" i64 [batch, model.seq_len] (GPT), output "logits"; with `dynamic_batch` the
/// batch axis is the symbolic "batch" (OnnxExportOptions::dynamic_batch; traced at `batch` and
/// batch + 1). Prints what it wrote on rank 0. Throws ConfigError without weights or for batch < 1,
/// CheckpointError without a checkpoint, ValueError for a model with an op that has no ONNX form.
int export_onnx(const Config& c, Runtime& rt, const std::string& path, int64_t batch, bool dynamic_batch);

/// `titanax export --format hf`: loads the weights as sample does (under tensor parallelism every rank
/// takes part in gathering the blocks) and writes the GPT as a Hugging Face GPT2LMHeadModel into folder
/// `dir` (nn::write_gpt2_safetensors: model.safetensors, config.json; LoRA adapters merged), or with
/// `peft` (--format peft) its LoRA adapters alone (nn::write_peft_adapter: adapter_model.safetensors,
/// adapter_config.json). Prints what it wrote on rank 0. Throws ConfigError for a model that is not a GPT,
/// without weights, or without adapters for peft; CheckpointError without a checkpoint, IOError when a
/// file cannot be written.
int export_hf(const Config& c, Runtime& rt, const std::string& dir, bool peft = false);

/// `titanax tokenize`: token shards (io/tokens.h, the llm.c format) of UTF-8 text files for data.dataset
/// tokens. Each file is one document, encoded with Tokenizer::load(`tokenizer`) after the tokenizer's
/// end-of-text id (when it has one: GPT-2's <|endoftext|>, SentencePiece's </s>), as llm.c's data scripts
/// write them; the first `val_fraction` of all tokens (rounded up, at least one) go to <out_dir>/val.bin
/// and the rest to <out_dir>/train.bin (llm.c's tinyshakespeare split puts validation first too).
/// Prints what it wrote. Throws IOError for a file that cannot be read or written, ValueError for no
/// files, a val_fraction outside (0, 1), a tokenizer with more than 65536 ids (the shards hold uint16)
/// or fewer than two tokens in all, DataError for text the tokenizer cannot encode (naming the file).
int tokenize(const std::string& tokenizer, const std::vector<std::string>& files, const std::string& out_dir,
             double val_fraction);

/// Prints mesh, plan, model and parameter count for `world_size` ranks, without training.
/// With `graph_format` "text" or "dot" it prints instead the optimised graph of one training step as
/// train.jit compiles it (jit::Graph::str() / dot()), traced on a batch of zeros of the local batch's
/// shape, for the whole model on one rank; ConfigError under pipeline parallelism.
int describe(const Config& c, Runtime& rt, int world_size, const std::string& graph_format = "");

}  // namespace titanax::app
