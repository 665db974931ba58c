#include "engine/gpt_pretrained.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/npm.h"
#include "io/safetensors.h"
#include "ops/ops.h"

namespace titanax::nn {

namespace {

constexpr int32_t kLlmcMagic = 20240326;
constexpr int64_t kLlmcHeaderBytes = 256 * 4;

// A Titanax parameter path and the Hugging Face GPT-2 name of the same tensor; `conv1d`: stored
// transposed there ([in, out]).
struct HfName {
  std::string name;
  bool conv1d = false;
};

HfName hf_name(const std::string& path) {
  static const std::map<std::string, HfName> whole{{"wte/weight", {"wte.weight"}}, {"wpe/weight", {"wpe.weight"}},
                                                   {"lnf/weight", {"ln_f.weight"}}, {"lnf/bias", {"ln_f.bias"}}};
  static const std::map<std::string, HfName> block{
      {"ln1/weight", {"ln_1.weight"}},           {"ln1/bias", {"ln_1.bias"}},
      {"attn/qkv/weight", {"attn.c_attn.weight", true}}, {"attn/qkv/bias", {"attn.c_attn.bias"}},
      {"attn/proj/weight", {"attn.c_proj.weight", true}}, {"attn/proj/bias", {"attn.c_proj.bias"}},
      {"ln2/weight", {"ln_2.weight"}},           {"ln2/bias", {"ln_2.bias"}},
      {"mlp/fc/weight", {"mlp.c_fc.weight", true}},    {"mlp/fc/bias", {"mlp.c_fc.bias"}},
      {"mlp/out/weight", {"mlp.c_proj.weight", true}}, {"mlp/out/bias", {"mlp.c_proj.bias"}}};
  if (auto it = whole.find(path); it != whole.end()) return it->second;
  const size_t slash = path.find('/', 7);  // "blocks/<i>/<rest>"
  if (path.rfind("blocks/", 0) == 0 && slash != std::string::npos)
    if (auto it = block.find(path.substr(slash + 1)); it != block.end())
      return {"h." + path.substr(7, slash - 7) + "." + it->second.name, it->second.conv1d};
  throw InternalError("no GPT-2 name for the GPT parameter '" + path + "'");
}

// The Hugging Face name of a block layer within its block ("attn/qkv" -> "attn.c_attn").
std::string hf_layer(const std::string& target) {
  const std::string w = hf_name("blocks/0/" + target + "/weight").name;  // "h.0.attn.c_attn.weight"
  return w.substr(4, w.size() - 4 - std::string(".weight").size());
}

// A LoRA adapter of a GPT and its tensor in a PEFT adapter file: PEFT's name under GPT2LMHeadModel
// ("base_model.model.transformer.h.<i>.attn.c_attn.lora_A.weight") and shape ([r, in] for lora_A,
// [out, r] for lora_B, c_attn's [3 dim, r] being qkv's [3, dim, r]).
struct PeftTensor {
  ParamLayout param;
  std::string name;
  Shape shape;
};
constexpr const char* kPeftPrefix = "base_model.model.transformer.";

std::vector<PeftTensor> peft_tensors(const GPTConfig& cfg) {
  std::vector<PeftTensor> out;
  const int64_t r = cfg.lora_rank;
  for (const ParamLayout& l : GPT::layout(cfg)) {
    if (!is_lora_path(l.path)) continue;
    const bool a = l.path.ends_with("/lora_a");
    const std::string w = hf_name(l.path.substr(0, l.path.rfind('/')) + "/weight").name;  // "h.<i>.attn.c_attn.weight"
    const std::string module = w.substr(0, w.size() - std::string(".weight").size());
    const int64_t features = l.global_shape.numel() / r;
    out.push_back({l, kPeftPrefix + module + (a ? ".lora_A.weight" : ".lora_B.weight"), a ? Shape{r, features} : Shape{features, r}});
  }
  return out;
}

// The Hugging Face shape of a parameter of Titanax shape `s`: Conv1D weights [in, out] (Titanax keeps
// [out, in], qkv's as [3, dim, dim]); every other tensor but the embeddings is a vector.
Shape hf_shape(const Shape& s, const HfName& n) {
  if (n.conv1d) return Shape{s[s.rank() - 1], s.numel() / s[s.rank() - 1]};
  return n.name == "wte.weight" || n.name == "wpe.weight" ? s : Shape{s.numel()};
}

// Folder `dir` (created if absent) with the safetensors file `tensors_name` (metadata format "pt") and
// the JSON file `json_name`, each written under a temporary name and renamed into place.
void write_folder(const std::string& dir, const std::string& tensors_name, const ParamTree& tensors,
                  const std::string& json_name, const nlohmann::json& json) {
  const std::filesystem::path d(dir);
  std::error_code ec;
  std::filesystem::create_directories(d, ec);
  if (ec) throw IOError("cannot create folder '" + dir + "': " + ec.message());
  const std::filesystem::path tmp = detail::temp_path(d / tensors_name);
  write_safetensors(tmp.string(), tensors, {{"format", "pt"}});
  detail::rename_into_place(tmp, d / tensors_name);
  const std::filesystem::path jtmp = detail::temp_path(d / json_name);
  {
    std::ofstream f(jtmp);
    f << json.dump(2) << '\n';
    if (!f) throw IOError("cannot write '" + jtmp.string() + "'");
  }
  detail::rename_into_place(jtmp, d / json_name);
}

std::string config_field(const std::string& field) {
  return "GPTConfig." + field + " (model." + field + " in a run config)";
}

// ValueError for a size of the file that differs from the config's.
[[noreturn]] void size_mismatch(const std::string& path, const std::string& what, const std::string& field,
                                int64_t config_value, int64_t file_value) {
  throw ValueError("GPT-2 weights '" + path + "': the file's " + what + " is " + std::to_string(file_value) +
                       ", the model's " + std::to_string(config_value),
                   what + " " + std::to_string(config_value), std::to_string(file_value),
                   "set " + config_field(field) + " to " + std::to_string(file_value));
}

// The file's sizes against the config's. The positions may be cropped (nanoGPT's crop_block_size).
void check_sizes(const std::string& path, const GPTConfig& cfg, int64_t vocab, int64_t dim, int64_t layers,
                 int64_t positions) {
  if (vocab != cfg.vocab) size_mismatch(path, "vocabulary size", "vocab", cfg.vocab, vocab);
  if (dim != cfg.dim) size_mismatch(path, "width", "dim", cfg.dim, dim);
  if (layers != cfg.layers) size_mismatch(path, "number of blocks", "layers", cfg.layers, layers);
  if (positions < cfg.seq_len)
    throw ValueError("GPT-2 weights '" + path + "' have " + std::to_string(positions) + " positions, fewer than the model's seq_len",
                     "seq_len <= " + std::to_string(positions), std::to_string(cfg.seq_len),
                     "set " + config_field("seq_len") + " to at most " + std::to_string(positions));
}

// A file's tensor in the layout of parameter `l`: the embeddings' rows fitted (wpe's first seq_len rows,
// wte's followed by zero rows up to GPTConfig::padded_vocab()), every other tensor reshaped.
Tensor shaped(const Tensor& t, const ParamLayout& l) {
  if (l.path != "wte/weight" && l.path != "wpe/weight") return reshape(t, l.global_shape);
  const int64_t have = t.shape()[0], want = l.global_shape[0];
  return have >= want ? slice(t, 0, 0, want) : concat({t, zeros(Shape{want - have, t.shape()[1]}, t.dtype())}, 0);
}

ParamTree read_hf(const std::string& path, const GPTConfig& cfg) {
  SafetensorsFile f = read_safetensors(path);
  std::map<std::string, Tensor> by_name;
  std::vector<std::string> names;
  int64_t layers = 0;
  for (const auto& [raw, t] : f.tensors) {
    const std::string n = raw.rfind("transformer.", 0) == 0 ? raw.substr(12) : raw;
    if (n.rfind("h.", 0) == 0) {  // "h.<i>.": count the blocks; skip the causal-mask buffers
      const size_t dot = n.find('.', 2);
      const std::string idx = n.substr(2, dot == std::string::npos ? 0 : dot - 2);
      if (!idx.empty() && idx.find_first_not_of("0123456789") == std::string::npos && idx.size() < 9)
        layers = std::max<int64_t>(layers, std::stoll(idx) + 1);
      if (n.ends_with(".attn.bias") || n.ends_with(".attn.masked_bias")) continue;
    }
    if (!by_name.emplace(n, t).second)
      throw CheckpointError("GPT-2 weights '" + path + "' hold '" + n + "' twice (with and without 'transformer.')",
                            "each tensor once", "'" + raw + "'");
    names.push_back(n);
  }
  for (const char* n : {"wte.weight", "wpe.weight"})
    if (!by_name.count(n) || by_name.at(n).shape().rank() != 2)
      throw ValueError("GPT-2 weights '" + path + "' have no 2-D '" + std::string(n) + "'",
                       "a Hugging Face GPT2Model / GPT2LMHeadModel safetensors file", join(names, ", ").substr(0, 200),
                       "convert the model with transformers: model.save_pretrained(dir, safe_serialization=True)");
  const Shape wte = by_name.at("wte.weight").shape(), wpe = by_name.at("wpe.weight").shape();
  check_sizes(path, cfg, wte[0], wte[1], layers, wpe[0]);
  if (auto it = by_name.find("lm_head.weight"); it != by_name.end()) {
    const Tensor a = it->second.contiguous(), b = by_name.at("wte.weight").contiguous();  // tied: the same bytes
    const bool same = a.shape() == b.shape() && a.dtype() == b.dtype() &&
                      std::memcmp(a.raw_data(), b.raw_data(), size_t(a.numel()) * itemsize(a.dtype())) == 0;
    if (!same)
      throw ValueError("GPT-2 weights '" + path + "': lm_head.weight differs from wte.weight",
                       "the head tied to the token embedding (GPT-2's)", "an untied head " + spec_str(it->second),
                       "Titanax's GPT ties its head to wte: fine-tune from a tied model");
    by_name.erase(it);
  }
  ParamTree out;
  for (const ParamLayout& l : GPT::layout(cfg.without_lora())) {  // files hold base models
    const HfName h = hf_name(l.path);
    auto it = by_name.find(h.name);
    if (it == by_name.end())
      throw ValueError("GPT-2 weights '" + path + "' have no tensor '" + h.name + "' (" + l.path + ")",
                       "every tensor of a GPT-2 with " + std::to_string(cfg.layers) + " blocks", "none",
                       "check that the file is a whole GPT-2 checkpoint");
    Tensor t = it->second;
    by_name.erase(it);
    const Shape want = h.name == "wpe.weight" ? wpe : h.name == "wte.weight" ? wte : hf_shape(l.global_shape, h);
    if (t.shape() != want || !is_floating(t.dtype()))
      throw ValueError("GPT-2 weights '" + path + "': '" + h.name + "' has the wrong shape for the model",
                       "a floating tensor " + want.str(), spec_str(t),
                       "check " + config_field("dim") + " against the file's");
    if (h.conv1d) t = transpose(t, 0, 1);
    out.insert(l.path, shaped(t.astype(DType::f32), l));
  }
  if (!by_name.empty())
    throw ValueError("GPT-2 weights '" + path + "' hold a tensor a GPT-2 does not have: '" + by_name.begin()->first + "'",
                     "GPT-2's tensors only", "'" + by_name.begin()->first + "'",
                     "load a GPT-2 (GPT2Model / GPT2LMHeadModel) checkpoint");
  return out;
}

ParamTree read_llmc(const std::string& path, const GPTConfig& cfg, std::ifstream& in, int64_t file_bytes) {
  int32_t h[256] = {};
  if (file_bytes < kLlmcHeaderBytes || !in.read(reinterpret_cast<char*>(h), kLlmcHeaderBytes))
    throw CheckpointError("llm.c checkpoint '" + path + "' is truncated in its header",
                          std::to_string(kLlmcHeaderBytes) + " header bytes", std::to_string(file_bytes) + " bytes");
  const int32_t version = h[1];
  if (version != 3 && version != 5)
    throw CheckpointError("llm.c checkpoint '" + path + "' has version " + std::to_string(version),
                          "3 (f32) or 5 (bf16)", std::to_string(version),
                          "write it again with llm.c's current train_gpt2.py (write_model)");
  const int64_t maxT = h[2], V = h[3], L = h[4], NH = h[5], C = h[6], Vp = h[7];
  if (maxT < 1 || V < 1 || L < 1 || NH < 1 || C < 1 || Vp < V)
    throw CheckpointError("llm.c checkpoint '" + path + "' has a malformed header",
                          "positive max_seq_len, vocab, layers, heads, channels and padded_vocab >= vocab",
                          "[" + std::to_string(maxT) + ", " + std::to_string(V) + ", " + std::to_string(L) + ", " +
                              std::to_string(NH) + ", " + std::to_string(C) + ", " + std::to_string(Vp) + "]");
  check_sizes(path, cfg, V, C, L, maxT);
  if (NH != cfg.heads) size_mismatch(path, "number of attention heads", "heads", cfg.heads, NH);
  // llm.c's parameter tensors in file order, each [rows, cols] per layer (stacked L times when `per_layer`).
  struct Block {
    const char* ours;  // the Titanax path (suffix under blocks/<i>/ when per_layer)
    int64_t rows, cols;
    bool per_layer;
  };
  const std::vector<Block> blocks{{"wte/weight", Vp, C, false},     {"wpe/weight", maxT, C, false},
                                  {"ln1/weight", 1, C, true},       {"ln1/bias", 1, C, true},
                                  {"attn/qkv/weight", 3 * C, C, true}, {"attn/qkv/bias", 1, 3 * C, true},
                                  {"attn/proj/weight", C, C, true}, {"attn/proj/bias", 1, C, true},
                                  {"ln2/weight", 1, C, true},       {"ln2/bias", 1, C, true},
                                  {"mlp/fc/weight", 4 * C, C, true}, {"mlp/fc/bias", 1, 4 * C, true},
                                  {"mlp/out/weight", C, 4 * C, true}, {"mlp/out/bias", 1, C, true},
                                  {"lnf/weight", 1, C, false},      {"lnf/bias", 1, C, false}};
  int64_t count = 0;
  for (const Block& b : blocks) count += b.rows * b.cols * (b.per_layer ? L : 1);
  const DType dt = version == 3 ? DType::f32 : DType::bf16;
  const int64_t want = kLlmcHeaderBytes + count * int64_t(itemsize(dt));
  if (file_bytes != want)
    throw CheckpointError("llm.c checkpoint '" + path + "' does not hold the parameters its header describes",
                          std::to_string(want) + " bytes (" + std::to_string(count) + " parameters)",
                          std::to_string(file_bytes) + " bytes", "the file is truncated or not an llm.c checkpoint");
  Tensor flat = empty(Shape{count}, dt);
  if (!in.read(static_cast<char*>(flat.raw_data()), std::streamsize(count * int64_t(itemsize(dt)))))
    throw IOError("cannot read llm.c checkpoint '" + path + "'");
  flat = flat.astype(DType::f32);
  std::map<std::string, Tensor> by_path;
  int64_t off = 0;
  for (const Block& b : blocks) {
    for (int64_t i = 0; i < (b.per_layer ? L : 1); ++i, off += b.rows * b.cols) {
      Tensor t = reshape(slice(flat, 0, off, off + b.rows * b.cols), Shape{b.rows, b.cols});
      by_path[b.per_layer ? "blocks/" + std::to_string(i) + "/" + b.ours : b.ours] = t;
    }
  }
  ParamTree out;
  for (const ParamLayout& l : GPT::layout(cfg.without_lora())) {
    Tensor t = by_path.at(l.path);
    if (l.path == "wte/weight") t = slice(t, 0, 0, V);  // llm.c's padding rows: not GPT-2's
    out.insert(l.path, shaped(t, l));
  }
  return out;
}

}  // namespace

ParamTree read_gpt2_weights(const std::string& path, const GPTConfig& cfg) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IOError("cannot open GPT-2 weights '" + path + "'", "a readable file", path, "check the path");
  in.seekg(0, std::ios::end);
  const int64_t bytes = in.tellg();
  in.seekg(0);
  int32_t first = 0;
  if (bytes >= 4) in.read(reinterpret_cast<char*>(&first), 4), in.seekg(0);
  if (first == kLlmcMagic) return read_llmc(path, cfg, in, bytes);
  in.close();
  return read_hf(path, cfg);
}

void load_gpt2_weights(GPT& model, const std::string& path) {
  model.load_global_parameters(read_gpt2_weights(path, model.config()));
}

void write_gpt2_safetensors(const ParamTree& with_adapters, const GPTConfig& cfg, const std::string& dir) {
  const ParamTree params = GPT::merge_lora(with_adapters, cfg);  // GPT-2 has no adapters: merged into W
  ParamTree hf;
  for (const ParamLayout& l : GPT::layout(cfg.without_lora())) {
    if (!params.contains(l.path))
      throw ValueError("write_gpt2_safetensors: no tensor for '" + l.path + "'", "every path of GPT::layout", "none",
                       "pass the whole model's parameters (gather tensor-parallel and pipeline shards first)");
    const Tensor& t = params.at(l.path);
    if (!t.defined() || t.shape() != l.global_shape || !is_floating(t.dtype()))
      throw ValueError("write_gpt2_safetensors: '" + l.path + "' does not fit the config", "a floating tensor " +
                       l.global_shape.str(), t.defined() ? spec_str(t) : "undefined", "pass whole (global) tensors");
    const HfName h = hf_name(l.path);
    Tensor v = t.astype(DType::f32).to(Device::cpu());
    if (l.path == "wte/weight") v = slice(v, 0, 0, cfg.vocab);  // without GPTConfig::pad_vocab_multiple's rows
    if (h.conv1d) v = transpose(reshape(v, Shape{l.global_shape.numel() / l.global_shape[l.global_shape.rank() - 1],
                                                 l.global_shape[l.global_shape.rank() - 1]}), 0, 1);
    hf.insert(h.name, reshape(v.contiguous(), h.name == "wte.weight" ? v.shape() : hf_shape(l.global_shape, h)));
  }
  const nlohmann::json config{{"architectures", {"GPT2LMHeadModel"}},
                              {"model_type", "gpt2"},
                              {"vocab_size", cfg.vocab},
                              {"n_positions", cfg.seq_len},
                              {"n_ctx", cfg.seq_len},
                              {"n_embd", cfg.dim},
                              {"n_layer", cfg.layers},
                              {"n_head", cfg.heads},
                              {"n_inner", nullptr},
                              {"activation_function", "gelu_new"},
                              {"layer_norm_epsilon", 1e-5},
                              {"resid_pdrop", 0.0},
                              {"embd_pdrop", 0.0},
                              {"attn_pdrop", 0.0},
                              {"tie_word_embeddings", true},
                              {"torch_dtype", "float32"}};
  write_folder(dir, "model.safetensors", hf, "config.json", config);
}

void write_peft_adapter(const ParamTree& params, const GPTConfig& cfg, const std::string& dir, const std::string& base) {
  if (cfg.lora_rank == 0)
    throw ValueError("write_peft_adapter: the model has no LoRA adapters", "GPTConfig.lora_rank > 0", "lora_rank 0",
                     "set model.lora_rank (and train the adapters), or export the whole model with --format hf");
  ParamTree peft;
  for (const PeftTensor& pt : peft_tensors(cfg)) {
    const ParamLayout& l = pt.param;
    if (!params.contains(l.path) || !params.at(l.path).defined() || params.at(l.path).shape() != l.global_shape)
      throw ValueError("write_peft_adapter: no tensor of global shape " + l.global_shape.str() + " for '" + l.path + "'",
                       "every adapter of GPT::layout(cfg)", params.contains(l.path) ? spec_str(params.at(l.path)) : "none",
                       "pass the whole model's parameters (gather tensor-parallel and pipeline shards first)");
    peft.insert(pt.name, reshape(params.at(l.path).astype(DType::f32).to(Device::cpu()).contiguous(), pt.shape));
  }
  nlohmann::json modules = nlohmann::json::array();
  for (const std::string& t : cfg.lora_targets) modules.push_back(hf_layer(t));
  const nlohmann::json config{{"peft_type", "LORA"},
                              {"task_type", "CAUSAL_LM"},
                              {"base_model_name_or_path", base},
                              {"r", cfg.lora_rank},
                              {"lora_alpha", cfg.lora_alpha},
                              {"lora_dropout", cfg.lora_dropout},
                              {"target_modules", modules},
                              {"fan_in_fan_out", true},
                              {"bias", "none"},
                              {"use_rslora", false},
                              {"init_lora_weights", true},
                              {"modules_to_save", nullptr},
                              {"inference_mode", true}};
  write_folder(dir, "adapter_model.safetensors", peft, "adapter_config.json", config);
}

ParamTree read_peft_adapter(const std::string& dir, const GPTConfig& cfg) {
  const std::string where = "PEFT adapter '" + dir + "'";
  const std::string fix_config = "set model.lora_rank, model.lora_alpha and model.lora_targets as its adapter_config.json says";
  if (cfg.lora_rank == 0)
    throw ValueError(where + ": the model has no LoRA adapters to load it into", "GPTConfig.lora_rank > 0", "lora_rank 0", fix_config);
  nlohmann::json c;
  {
    std::ifstream f(dir + "/adapter_config.json");
    if (!f)
      throw IOError("cannot open '" + dir + "/adapter_config.json'", "a PEFT adapter folder (adapter_config.json, "
                    "adapter_model.safetensors)", dir, "pass the folder PeftModel.save_pretrained wrote");
    try {
      f >> c;
    } catch (const nlohmann::json::exception& e) {
      throw CheckpointError(where + ": adapter_config.json is not JSON", "a JSON object", e.what());
    }
  }
  const auto field = [&](const char* k) { return c.is_object() && c.contains(k) ? c[k] : nlohmann::json(); };
  if (field("peft_type") != "LORA")
    throw ValueError(where + " is not a LoRA adapter", "peft_type \"LORA\"", field("peft_type").dump(), "export a LoRA adapter");
  // What Titanax's adapters do not compute: refused rather than loaded into another function.
  const std::pair<const char*, bool> unsupported[] = {
      {"bias", !field("bias").is_null() && field("bias") != "none"},
      {"use_rslora", field("use_rslora") == true},
      {"use_dora", field("use_dora") == true},
      {"rank_pattern", field("rank_pattern").is_object() && !field("rank_pattern").empty()},
      {"alpha_pattern", field("alpha_pattern").is_object() && !field("alpha_pattern").empty()},
      {"modules_to_save", field("modules_to_save").is_array() && !field("modules_to_save").empty()}};
  for (const auto& [k, bad] : unsupported)
    if (bad)
      throw ValueError(where + ": " + k + " " + field(k).dump() + " is not supported", std::string(k) + " at PEFT's default",
                       field(k).dump(), "train the adapter without it (Titanax's LoRA: no biases, scale alpha / r, one rank)");
  if (!field("r").is_number_integer() || field("r").get<int64_t>() != cfg.lora_rank)
    throw ValueError(where + " has rank r " + field("r").dump() + ", the model " + std::to_string(cfg.lora_rank),
                     "r = model.lora_rank", field("r").dump(), "set model.lora_rank to " + field("r").dump());
  if (!field("lora_alpha").is_number() || std::abs(field("lora_alpha").get<double>() - cfg.lora_alpha) > 1e-12 * cfg.lora_alpha)
    throw ValueError(where + " has lora_alpha " + field("lora_alpha").dump() + ", the model " + std::to_string(cfg.lora_alpha),
                     "lora_alpha = model.lora_alpha", field("lora_alpha").dump(), "set model.lora_alpha to " + field("lora_alpha").dump());
  // target_modules: PEFT matches a module whose name is a target or ends with "." + target.
  if (!field("target_modules").is_array())
    throw ValueError(where + ": target_modules is not a list of module names", "a list such as [\"c_attn\"]",
                     field("target_modules").dump(), "save the adapter with target_modules as a list (a regex is not read)");
  std::vector<std::string> targets;
  for (const std::string t : {"attn/qkv", "attn/proj", "mlp/fc", "mlp/out"}) {
    const std::string m = hf_layer(t);
    for (const auto& pattern : field("target_modules")) {
      const std::string p = pattern.is_string() ? pattern.get<std::string>() : "";
      if (m == p || (m.size() > p.size() && m.compare(m.size() - p.size() - 1, std::string::npos, "." + p) == 0)) {
        targets.push_back(t);
        break;
      }
    }
  }
  std::vector<std::string> want = cfg.lora_targets;
  std::sort(want.begin(), want.end());
  std::vector<std::string> have = targets;
  std::sort(have.begin(), have.end());
  if (have != want)
    throw ValueError(where + " adapts [" + join(targets) + "] (target_modules " + field("target_modules").dump() +
                         "), the model [" + join(cfg.lora_targets) + "]",
                     "model.lora_targets = the adapted layers", "[" + join(targets) + "]",
                     "set model.lora_targets to [" + join(targets) + "]");

  const SafetensorsFile f = read_safetensors(dir + "/adapter_model.safetensors");
  std::map<std::string, Tensor> by_name(f.tensors.begin(), f.tensors.end());
  ParamTree out;
  for (const PeftTensor& pt : peft_tensors(cfg)) {
    std::string name = pt.name;  // under GPT2LMHeadModel ("transformer."), or GPT2Model's without it
    if (!by_name.count(name)) name = "base_model.model." + name.substr(std::string(kPeftPrefix).size());
    if (!by_name.count(name))
      throw ValueError(where + " has no tensor '" + pt.name + "'", "every adapter of a GPT-2 with " + std::to_string(cfg.layers) +
                           " blocks", "none", "check that the adapter is for this model (model.layers, model.lora_targets)");
    const Tensor v = by_name.at(name);
    by_name.erase(name);
    if (v.shape() != pt.shape || !is_floating(v.dtype()))
      throw ValueError(where + ": '" + name + "' has the wrong shape for the model", "a floating tensor " + pt.shape.str(),
                       spec_str(v), "check model.dim and model.lora_rank against the adapter's");
    out.insert(pt.param.path, reshape(v, pt.param.global_shape));
  }
  if (!by_name.empty())
    throw ValueError(where + " holds '" + by_name.begin()->first + "', which no adapted layer of the model takes",
                     "lora_A / lora_B weights of the adapted layers only", std::to_string(by_name.size()) + " more tensor(s)",
                     "check model.lora_targets and model.layers against the adapter's");
  return out;
}

void load_peft_adapter(GPT& model, const std::string& dir) {
  model.load_global_adapters(read_peft_adapter(dir, model.config()));
}

}  // namespace titanax::nn
