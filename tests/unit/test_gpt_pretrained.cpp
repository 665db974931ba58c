// GPT-2 weights from Hugging Face safetensors and llm.c checkpoints, and back (engine/gpt_pretrained.h).
// The oracle is tests/gpt2/gpt2_reference.py: GPT-2 in NumPy written from transformers' GPT-2 and llm.c's
// write_model, sharing no code with Titanax. It writes random weights in each format with the logits
// they give; the GPT loaded here must compute those logits (in f64, to 1e-10), and a model written by
// write_gpt2_safetensors must compute, in the reference, the logits it computes here. The same both ways
// for PEFT LoRA adapters (write_peft_adapter, read_peft_adapter).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>

#include "autodiff/autodiff.h"
#include "engine/gpt.h"
#include "engine/gpt_pretrained.h"
#include "io/npy.h"
#include "io/safetensors.h"
#include "io_test_util.h"
#include "op_cases.h"
#include "ops/ops.h"
#include "test_util.h"

using namespace titanax;
using Catch::Matchers::Contains;
using testing::catch_error;

namespace {

const std::string kReference = std::string(TITANAX_SOURCE_DIR) + "/tests/gpt2/gpt2_reference.py";

// The reference's model: a vocabulary that no power of two pads (llm.c pads it to 64), more positions
// in the files than the model's seq_len (cropped on load).
constexpr int64_t kVocab = 61, kPaddedVocab = 64, kLayers = 2, kHeads = 4, kDim = 32, kPositions = 24, kSeq = 16;

nn::GPTConfig config(DType dt) {
  return {.vocab = kVocab, .layers = kLayers, .heads = kHeads, .dim = kDim, .seq_len = kSeq, .dtype = dt};
}

// The reference's files, written once for the whole test binary.
const io_test::TempDir& reference_files() {
  static const io_test::TempDir dir = [] {
    io_test::TempDir d;
    const std::string cmd = io_test::kPython + " " + kReference + " make --out " + d.path.string() +
                            " --vocab " + std::to_string(kVocab) + " --padded-vocab " + std::to_string(kPaddedVocab) +
                            " --layers " + std::to_string(kLayers) + " --heads " + std::to_string(kHeads) +
                            " --dim " + std::to_string(kDim) + " --positions " + std::to_string(kPositions) +
                            " --seq " + std::to_string(kSeq) + " --batch 2 --seed 5";
    const int rc = io_test::shell(cmd, d.path / "log.txt");
    if (rc != 0)  // python3-numpy missing? scripts/install-deps.sh installs it
      throw std::runtime_error("gpt2_reference.py make failed: " + io_test::read_text(d.path / "log.txt"));
    return d;
  }();
  return dir;
}

// max |a - b| / max(1, max |b|).
double rel_error(const Tensor& a, const Tensor& b) {
  REQUIRE(a.shape() == b.shape());
  const Tensor x = a.astype(DType::f64).contiguous(), y = b.astype(DType::f64).contiguous();
  double err = 0, scale = 1;
  for (int64_t i = 0; i < x.numel(); ++i) {
    err = std::max(err, std::abs(x.data<double>()[i] - y.data<double>()[i]));
    scale = std::max(scale, std::abs(y.data<double>()[i]));
  }
  return err / scale;
}

// f64 with adapters of the reference's PEFT adapter's rank 3 and lora_alpha 6 on `targets`.
nn::GPTConfig lora_config(std::vector<std::string> targets) {
  nn::GPTConfig c = config(DType::f64);
  c.lora_rank = 3;
  c.lora_alpha = 6;
  c.lora_targets = std::move(targets);
  return c;
}

Tensor logits_of(const std::string& weights, DType dt) {
  nn::GPT m(config(dt));
  nn::load_gpt2_weights(m, weights);
  NoGradGuard ng;
  return m.forward(load_npy(reference_files() / "ids.npy"));
}

}  // namespace

TEST_CASE("GPT-2 weights from Hugging Face and llm.c files compute the reference's logits", "[gpt][io][pretrained]") {
  const auto& d = reference_files();
  struct Case {
    const char* file;
    const char* logits;
  };
  for (const Case& c : {Case{"hf.safetensors", "logits_f32.npy"}, Case{"hf_f16.safetensors", "logits_f16.npy"},
                        Case{"llmc.bin", "logits_f32.npy"}, Case{"llmc_bf16.bin", "logits_bf16.npy"}}) {
    INFO(c.file);
    const Tensor want = load_npy(d / c.logits);
    CHECK(rel_error(logits_of(d / c.file, DType::f64), want) < 1e-10);
    // f32 parameters and arithmetic: two blocks of f32 rounding, well above 1e-10, far below a wrong weight.
    CHECK(rel_error(logits_of(d / c.file, DType::f32), want) < 1e-4);
  }
  // Into a model whose vocabulary is padded (61 -> 64, for tensor parallelism): zero rows after GPT-2's,
  // the same logits for the real ids; written back, GPT-2's 61 rows only.
  nn::GPTConfig padded = config(DType::f64);
  padded.pad_vocab_multiple = 8;
  for (const char* file : {"hf.safetensors", "llmc.bin"}) {
    INFO(file);
    nn::GPT m(padded);
    nn::load_gpt2_weights(m, d / file);
    CHECK(rel_error(m.parameters().at("wte/weight").slice(0, kVocab, 64), zeros(Shape{64 - kVocab, kDim})) == 0.0);
    NoGradGuard ng;
    CHECK(rel_error(m.forward(load_npy(d / "ids.npy")).slice(2, 0, kVocab), load_npy(d / "logits_f32.npy")) < 1e-10);
    io_test::TempDir out;
    nn::write_gpt2_safetensors(m.parameters(), padded, out / "m");
    CHECK(read_safetensors(out / "m/model.safetensors").tensors.at("wte.weight").shape() == Shape{kVocab, kDim});
  }
}

TEST_CASE("GPT-2 weights: the same tensors from either format, and a written model loads in the reference",
          "[gpt][io][pretrained]") {
  const auto& d = reference_files();
  const ParamTree hf = nn::read_gpt2_weights(d / "hf.safetensors", config(DType::f32));
  const ParamTree llmc = nn::read_gpt2_weights(d / "llmc.bin", config(DType::f32));
  REQUIRE(hf.paths() == llmc.paths());
  for (const auto& [p, t] : hf) {
    INFO(p);
    CHECK(rel_error(t, llmc.at(p)) == 0.0);
  }

  nn::GPT m(config(DType::f64));
  m.load_global_parameters(hf);
  Tensor logits;
  {
    NoGradGuard ng;
    logits = m.forward(load_npy(d / "ids.npy"));
  }
  io_test::TempDir out;
  nn::write_gpt2_safetensors(m.parameters(), m.config(), out / "model");
  save_npy(out / "logits.npy", logits);
  const int rc = io_test::shell(io_test::kPython + " " + kReference + " check --model-dir " + (out / "model") +
                                    " --ids " + (d / "ids.npy") + " --logits " + (out / "logits.npy"),
                                out.path / "log.txt");
  INFO(io_test::read_text(out.path / "log.txt"));
  CHECK(rc == 0);
  // And back: the written file reads as the tensors it was written from.
  const ParamTree again = nn::read_gpt2_weights(out / "model/model.safetensors", config(DType::f32));
  for (const auto& [p, t] : hf) {
    INFO(p);
    CHECK(rel_error(again.at(p), t) == 0.0);
  }
}

TEST_CASE("GPT-2 weights that do not fit the model are refused by name", "[gpt][io][pretrained]") {
  const auto& d = reference_files();
  auto refused = [&](const std::string& file, nn::GPTConfig cfg) {
    nn::GPT m(cfg);
    const Tensor before = m.parameters().at("wte/weight").astype(DType::f64);
    auto e = catch_error<ValueError>([&] { nn::load_gpt2_weights(m, file); });
    CHECK(rel_error(m.parameters().at("wte/weight"), before) == 0.0);  // nothing loaded
    return std::string(e.what());
  };
  for (const char* file : {"hf.safetensors", "llmc.bin"}) {
    INFO(file);
    nn::GPTConfig c = config(DType::f32);
    c.layers = 3;
    CHECK_THAT(refused(d / file, c), Contains("number of blocks is 2") && Contains("model.layers"));
    c = config(DType::f32), c.vocab = 64;
    CHECK_THAT(refused(d / file, c), Contains("vocabulary size is 61") && Contains("set GPTConfig.vocab"));
    c = config(DType::f32), c.dim = 16, c.heads = 2;
    CHECK_THAT(refused(d / file, c), Contains("width is 32"));
    c = config(DType::f32), c.seq_len = 25;
    CHECK_THAT(refused(d / file, c), Contains("24 positions") && Contains("at most 24"));
  }
  nn::GPTConfig c = config(DType::f32);
  c.heads = 2;  // llm.c stores the head count; a safetensors file does not
  CHECK_THAT(refused(d / "llmc.bin", c), Contains("number of attention heads is 4"));

  // A file with a tensor missing, one extra, one of another shape, an untied head.
  SafetensorsFile f = read_safetensors(d / "hf.safetensors");
  io_test::TempDir tmp;
  auto with = [&](const std::function<void(ParamTree&)>& edit) {
    ParamTree t;
    for (const auto& [n, x] : f.tensors) t.insert(n, x);
    edit(t);
    write_safetensors(tmp / "edited.safetensors", t);
    return refused(tmp / "edited.safetensors", config(DType::f32));
  };
  CHECK_THAT(with([](ParamTree& t) {
               ParamTree u;
               for (const auto& [n, x] : t)
                 if (n != "h.1.mlp.c_fc.bias") u.insert(n, x);
               t = u;
             }),
             Contains("no tensor 'h.1.mlp.c_fc.bias' (blocks/1/mlp/fc/bias)"));
  CHECK_THAT(with([](ParamTree& t) { t.insert("h.0.attn.q_norm.weight", zeros(Shape{kDim})); }),
             Contains("'h.0.attn.q_norm.weight'"));
  CHECK_THAT(with([](ParamTree& t) { t.at("h.0.attn.c_proj.weight") = zeros(Shape{kDim, kDim + 1}); }),
             Contains("'h.0.attn.c_proj.weight' has the wrong shape"));
  CHECK_THAT(with([](ParamTree& t) { t.insert("lm_head.weight", zeros(Shape{kVocab, kDim})); }),
             Contains("lm_head.weight differs from wte.weight"));
}

TEST_CASE("GPT-2 weights: files that are neither format, or broken, are refused", "[gpt][io][pretrained]") {
  const auto& d = reference_files();
  io_test::TempDir tmp;
  auto load = [&](const std::vector<unsigned char>& bytes) {
    io_test::write_bytes(tmp / "w.bin", bytes);
    return std::string(catch_error<CheckpointError>([&] { nn::read_gpt2_weights(tmp / "w.bin", config(DType::f32)); }).what());
  };
  std::vector<unsigned char> llmc = io_test::read_bytes(d / "llmc.bin");
  CHECK_THAT(load(std::vector<unsigned char>(llmc.begin(), llmc.end() - 4)), Contains("does not hold the parameters"));
  std::vector<unsigned char> v2 = llmc;
  v2[4] = 2;  // version 2
  CHECK_THAT(load(v2), Contains("has version 2") && Contains("3 (f32) or 5 (bf16)"));
  CHECK_THAT(load(std::vector<unsigned char>(llmc.begin(), llmc.begin() + 100)), Contains("truncated in its header"));
  CHECK_THAT(load({'h', 'e', 'l', 'l', 'o'}), Contains("w.bin"));
  CHECK_THROWS_AS(nn::read_gpt2_weights(tmp / "absent.safetensors", config(DType::f32)), IOError);
}

TEST_CASE("GPT::load_global_parameters refuses trees that are not the model's", "[gpt][pretrained]") {
  nn::GPT m(config(DType::f32));
  ParamTree whole = m.parameters();
  ParamTree extra = whole;
  extra.insert("blocks/2/ln1/weight", zeros(Shape{kDim}));
  CHECK_THAT(catch_error<ValueError>([&] { m.load_global_parameters(extra); }).what(),
             Contains("'blocks/2/ln1/weight' is not a parameter"));
  ParamTree wrong;
  for (const auto& [p, t] : whole) wrong.insert(p, p == "lnf/bias" ? zeros(Shape{kDim + 1}) : t);
  CHECK_THAT(catch_error<ValueError>([&] { m.load_global_parameters(wrong); }).what(),
             Contains("'lnf/bias' does not fit") && Contains("[32]"));
  ParamTree missing;
  for (const auto& [p, t] : whole)
    if (p != "wpe/weight") missing.insert(p, t);
  CHECK_THAT(catch_error<ValueError>([&] { m.load_global_parameters(missing); }).what(), Contains("no tensor for 'wpe/weight'"));
}

TEST_CASE("LoRA adapters written for PEFT give, merged by the reference into the base GPT-2, the adapted logits",
          "[gpt][io][pretrained][lora]") {
  const auto& d = reference_files();
  const nn::GPTConfig c = lora_config({"attn/qkv", "attn/proj", "mlp/fc", "mlp/out"});
  nn::GPT m(c);
  nn::load_gpt2_weights(m, d / "hf.safetensors");  // the base: f32 values, written back exactly
  {
    NoGradGuard ng;
    uint64_t k = 0;
    for (auto [p, t] : m.parameters())
      if (p.find("/lora_") != std::string::npos)  // adapters of f32 values too (lora_b is 0 at init)
        copy_(t, testing::randn64(RngKey::from_seed(40 + k++), t.shape(), 0.3).astype(DType::f32));
  }
  Tensor logits;
  {
    NoGradGuard ng;
    logits = m.forward(load_npy(d / "ids.npy"));
  }
  io_test::TempDir out;
  ParamTree base;
  for (const auto& [p, t] : m.parameters())
    if (p.find("/lora_") == std::string::npos) base.insert(p, t);
  nn::write_gpt2_safetensors(base, c.without_lora(), out / "base");
  nn::write_peft_adapter(m.parameters(), c, out / "adapter", "gpt2-base");
  save_npy(out / "logits.npy", logits);
  const int rc = io_test::shell(io_test::kPython + " " + kReference + " check --model-dir " + (out / "base") +
                                    " --adapter-dir " + (out / "adapter") + " --ids " + (d / "ids.npy") + " --logits " +
                                    (out / "logits.npy"),
                                out.path / "log.txt");
  INFO(io_test::read_text(out.path / "log.txt"));
  CHECK(rc == 0);
  const std::string config_json = io_test::read_text(out.path / "adapter" / "adapter_config.json");
  CHECK_THAT(config_json, Contains("\"base_model_name_or_path\": \"gpt2-base\"") && Contains("\"r\": 3") &&
                              Contains("\"mlp.c_proj\""));
  CHECK_THAT(catch_error<ValueError>([&] { nn::write_peft_adapter(base, c.without_lora(), out / "none"); }).what(),
             Contains("no LoRA adapters"));
  CHECK_THAT(catch_error<ValueError>([&] { nn::write_peft_adapter(base, c, out / "none"); }).what(),
             Contains("'blocks/0/attn/qkv/lora_a'"));
}

TEST_CASE("A PEFT adapter written by the reference loads into a LoRA GPT and computes the reference's logits",
          "[gpt][io][pretrained][lora]") {
  const auto& d = reference_files();
  const nn::GPTConfig c = lora_config({"attn/qkv", "attn/proj", "mlp/out"});  // the reference's target_modules [c_attn, c_proj]
  nn::GPT m(c);
  nn::load_gpt2_weights(m, d / "hf.safetensors");
  nn::load_peft_adapter(m, d / "peft");
  {
    NoGradGuard ng;
    CHECK(rel_error(m.forward(load_npy(d / "ids.npy")), load_npy(d / "logits_peft.npy")) < 1e-10);
  }
  // Written back and read again: the same adapters, bitwise (their values are f32).
  io_test::TempDir out;
  nn::write_peft_adapter(m.parameters(), c, out / "again");
  const ParamTree again = nn::read_peft_adapter(out / "again", c), first = nn::read_peft_adapter(d / "peft", c);
  REQUIRE(again.paths() == first.paths());
  CHECK(again.size() == size_t(2 * 3 * kLayers));
  for (const auto& [p, t] : first) {
    INFO(p);
    CHECK(rel_error(again.at(p), t) == 0.0);
  }
  // A model whose settings differ from the adapter's is told which key to set; nothing is loaded then.
  auto refused = [&](nn::GPTConfig bad, const std::string& dir) {
    nn::GPT other(bad);
    return std::string(catch_error<ValueError>([&] { nn::load_peft_adapter(other, dir); }).what());
  };
  nn::GPTConfig bad = c;
  bad.lora_rank = 4;
  CHECK_THAT(refused(bad, d / "peft"), Contains("rank r 3") && Contains("set model.lora_rank to 3"));
  bad = c;
  bad.lora_alpha = 8;
  CHECK_THAT(refused(bad, d / "peft"), Contains("set model.lora_alpha to 6"));
  bad = c;
  bad.lora_targets = {"attn/qkv"};
  CHECK_THAT(refused(bad, d / "peft"), Contains("set model.lora_targets to [attn/qkv, attn/proj, mlp/out]"));
  CHECK_THAT(refused(c.without_lora(), d / "peft"), Contains("no LoRA adapters to load it into"));
  // What Titanax's adapters do not compute is refused, not loaded into another function.
  std::filesystem::copy(d / "peft", out / "rslora");
  {
    std::ofstream f(out / "rslora/adapter_config.json");
    f << R"({"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": ["c_attn", "c_proj"], "use_rslora": true})";
  }
  CHECK_THAT(refused(c, out / "rslora"), Contains("use_rslora true is not supported"));
  CHECK_THROWS_AS(nn::read_peft_adapter(out / "missing", c), IOError);
}
