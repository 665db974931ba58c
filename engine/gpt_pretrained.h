// GPT-2 weights from and for other frameworks: start a Titanax GPT from a pretrained GPT-2 (fine-tuning,
// sampling), and hand a Titanax-trained GPT to Hugging Face transformers.
//
//   nn::GPT model({.vocab = 50257, .layers = 12, .heads = 12, .dim = 768, .seq_len = 1024});
//   nn::load_gpt2_weights(model, "gpt2/model.safetensors");     // or llm.c's "gpt2_124M.bin"
//   nn::write_gpt2_safetensors(model.parameters(), model.config(), "out/");  // out/model.safetensors, config.json
//
// Titanax's GPT (engine/gpt.h) is GPT-2's architecture (pre-LN blocks, GELU in its tanh form, layer-norm
// eps 1e-5, learned positions, the head tied to the token embedding), so the weights carry over exactly;
// only names and layouts differ. Formats, told apart by the file's first bytes:
//  - Hugging Face safetensors of GPT2Model or GPT2LMHeadModel ("model.safetensors" of the Hub's gpt2,
//    gpt2-medium, ...): tensors "wte.weight", "wpe.weight", "h.<i>.ln_1.weight", "h.<i>.attn.c_attn.weight",
//    ..., "ln_f.bias", optionally under "transformer.". GPT-2's Conv1D layers keep their weights as
//    [in, out] (y = x W + b), the transpose of Titanax's (and torch.nn.Linear's) [out, in]. The causal
//    mask buffers "h.<i>.attn.bias" / "h.<i>.attn.masked_bias" are skipped; "lm_head.weight" is GPT-2's
//    tied head and must equal "wte.weight". Any of F32, F16, BF16, F64.
//  - llm.c checkpoints ("gpt2_124M.bin", "gpt2_124M_bf16.bin", as llm.c's train_gpt2.py writes them): a
//    header of 256 little-endian int32 (header[0] = 20240326 magic, header[1] = version, 3 for f32 and 5
//    for bf16 parameters, then max_seq_len, vocab, layers, heads, channels, padded_vocab), then the
//    parameters in llm.c's order, each stacked over the layers, with [out, in] weights: wte [Vp, C],
//    wpe [maxT, C], ln1w [L, C], ln1b [L, C], qkvw [L, 3C, C], qkvb [L, 3C], attprojw [L, C, C], attprojb
//    [L, C], ln2w [L, C], ln2b [L, C], fcw [L, 4C, C], fcb [L, 4C], fcprojw [L, C, 4C], fcprojb [L, C],
//    lnfw [C], lnfb [C]. The padded vocabulary rows [V, Vp) are dropped.
// Sizes must match the model's config (ValueError naming the config field to set), except the
// positions: a model with seq_len below the file's takes the first seq_len rows of wpe (nanoGPT's
// crop_block_size); and a model whose vocabulary is padded (GPTConfig::pad_vocab_multiple, for tensor
// parallelism) gets zero rows of wte after GPT-2's, which a written file leaves out again. The head count is not stored in a safetensors file (GPT-2: 12 for 124M, 16 for
// 350M, 20 for 774M, 25 for 1558M): a wrong one loads and computes another model, as in transformers.
#pragma once

#include <string>

#include "core/tree.h"
#include "engine/gpt.h"

namespace titanax::nn {

/// Reads GPT-2 weights in either format above and returns the whole tensors of a GPT with config `cfg`
/// (every path and global shape of GPT::layout(cfg.without_lora()), in that order; f32 CPU tensors:
/// the files hold no LoRA adapters, and load_global_parameters leaves a model's adapters as they are). Throws IOError
/// when the file cannot be read; CheckpointError when it is neither format, or is malformed (what
/// read_safetensors checks; for llm.c: a short header, an unknown version, a size that is not the
/// header's parameter count); ValueError naming the tensor for a missing or unexpected tensor, a shape
/// that differs from the config's (with the config field to change), a seq_len above the file's
/// positions, or an lm_head.weight that differs from wte.weight.
ParamTree read_gpt2_weights(const std::string& path, const GPTConfig& cfg);

/// read_gpt2_weights(path, model.config()), then model.load_global_parameters of the result: every
/// parameter this rank holds (its tensor-parallel block, its pipeline stage's layers) takes the file's
/// values, cast to the model's dtype, in place. Throws what both throw.
void load_gpt2_weights(GPT& model, const std::string& path);

/// Writes whole GPT parameters `params` (the paths and global shapes of GPT::layout(cfg), any floating
/// dtype, any device; LoRA adapters are merged into their weights first, GPT::merge_lora) as Hugging
/// Face GPT2LMHeadModel files in folder `dir` (created if absent):
/// model.safetensors (the names and [in, out] Conv1D layouts above, F32, metadata format "pt", no
/// lm_head.weight: transformers ties it to wte) and config.json (model_type gpt2, n_positions = seq_len,
/// activation gelu_new, layer_norm_epsilon 1e-5, no dropout, tie_word_embeddings). Loads with
/// GPT2LMHeadModel.from_pretrained(dir). Throws ValueError for a missing path or a wrong shape (naming
/// it), IOError when a file cannot be written.
void write_gpt2_safetensors(const ParamTree& params, const GPTConfig& cfg, const std::string& dir);

/// Writes the LoRA adapters of whole GPT parameters `params` (config `cfg` with lora_rank > 0; global
/// shapes) as a Hugging Face PEFT adapter in folder `dir` (created if absent), for
/// PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), dir):
///   adapter_model.safetensors  F32, "base_model.model.transformer.h.<i>.<module>.lora_A.weight" [r, in]
///                              and ".lora_B.weight" [out, r] (module attn.c_attn for attn/qkv, whose q, k,
///                              v blocks of rows are c_attn's; attn.c_proj, mlp.c_fc, mlp.c_proj)
///   adapter_config.json        peft_type LORA, task_type CAUSAL_LM, base_model_name_or_path `base`, r,
///                              lora_alpha, target_modules, fan_in_fan_out true (GPT-2's Conv1D), bias none
/// The base weights are not written (write_gpt2_safetensors of the same model writes them merged).
/// ValueError for a config without adapters or a missing or wrongly shaped adapter; IOError when a file
/// cannot be written.
void write_peft_adapter(const ParamTree& params, const GPTConfig& cfg, const std::string& dir, const std::string& base = "gpt2");

/// Reads the PEFT LoRA adapter in folder `dir` (adapter_config.json, adapter_model.safetensors: what
/// write_peft_adapter or PeftModel.save_pretrained writes for GPT2LMHeadModel or GPT2Model) as the whole
/// adapters of a GPT with config `cfg`: every "/lora_a" [r, in] and "/lora_b" path of GPT::layout(cfg)
/// with its global shape (the file's dtype). target_modules are matched as PEFT does (a module named a
/// target or ending in "." + target: ["c_attn", "c_proj"] adapts attn.c_attn, attn.c_proj and
/// mlp.c_proj). Its lora_dropout is not read (cfg.lora_dropout sets training's). Throws ValueError naming the config key to set when r,
/// lora_alpha or the adapted layers differ from cfg's (lora_rank, lora_alpha, lora_targets), for a
/// config without adapters, for what Titanax's adapters do not compute (bias other than "none",
/// use_rslora, use_dora, rank_pattern, alpha_pattern, modules_to_save, a regex target_modules), for a
/// missing, misshapen or unused tensor; IOError when a file cannot be read, CheckpointError for a
/// malformed one.
ParamTree read_peft_adapter(const std::string& dir, const GPTConfig& cfg);

/// read_peft_adapter(dir, model.config()), then model.load_global_adapters of the result: each rank's
/// adapters take their tensor-parallel block and pipeline stage of the file's, the base weights stay.
void load_peft_adapter(GPT& model, const std::string& dir);

}  // namespace titanax::nn
