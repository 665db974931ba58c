// bench/generate: autoregressive decoding of a GPT (GPT-2 124M's shape by default: 12 layers, dim 768,
// 12 heads, vocabulary 50257, seq_len 1024; random weights), batch 1, greedy, a prompt of --prompt ids
// and --new new ones. One line:
//   bench=generate device=cpu threads=2 layers=12 dim=768 vocab=50257 prompt=16 new=64 cached_ms_per_token=...
//   uncached_ms_per_token=... cache_speedup=... same_tokens=1 [peer=... peer_ms_per_token=... cached_of_peer=...]
// cached: nn::generate with its KV cache (GPT::forward_cached: the prompt once, then one position per
// token); uncached: the same call with kv_cache = false (nanoGPT's and llm.c's way: the whole sequence
// again every token); same_tokens: both gave the same ids. The peer (bench/peers/generate_torch.py: the
// same model in PyTorch eager with a past-key-values cache, as Hugging Face's GPT-2 decodes) runs in the
// same invocation; cached_of_peer = peer time / ours. Options: --device cpu|cuda, --layers, --dim,
// --heads, --vocab, --prompt, --new, --no-peer.
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <string>

#include <titanax/titanax.h>

#include "core/cuda_runtime.h"
#include "peer.h"

namespace tx = titanax;

int main(int argc, char** argv) {
  int64_t layers = 12, dim = 768, heads = 12, vocab = 50257, prompt_len = 16, new_tokens = 64;
  bool peer = true;
  std::string device = "cpu";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return std::stoll(argv[++i]); };
    if (i + 1 < argc && a == "--layers") layers = next();
    else if (i + 1 < argc && a == "--dim") dim = next();
    else if (i + 1 < argc && a == "--heads") heads = next();
    else if (i + 1 < argc && a == "--vocab") vocab = next();
    else if (i + 1 < argc && a == "--prompt") prompt_len = next();
    else if (i + 1 < argc && a == "--new") new_tokens = next();
    else if (i + 1 < argc && a == "--device") device = argv[++i];
    else if (a == "--no-peer") peer = false;
    else {
      std::fprintf(stderr, "usage: generate [--device cpu|cuda] [--layers N] [--dim N] [--heads N] [--vocab N] "
                           "[--prompt N] [--new N] [--no-peer]\n");
      return 2;
    }
  }
  if ((device != "cpu" && device != "cuda") || prompt_len < 1 || new_tokens < 1) {
    std::fprintf(stderr, "generate: --device cpu|cuda, --prompt and --new >= 1 (got %s, %lld, %lld)\n", device.c_str(),
                 static_cast<long long>(prompt_len), static_cast<long long>(new_tokens));
    return 2;
  }
  return tx::bench::guarded([&] {
    const tx::Device dev = device == "cuda" ? tx::Device::cuda(0) : tx::Device::cpu();
    tx::nn::GPT model({.vocab = vocab, .layers = layers, .heads = heads, .dim = dim, .seq_len = 1024});
    model.to(dev);
    std::vector<int64_t> prompt(size_t(prompt_len), 0);
    for (int64_t i = 0; i < prompt_len; ++i) prompt[size_t(i)] = (i * 7919) % vocab;
    auto sync = [&] {
      if (dev.is_cuda()) tx::cuda_rt::synchronize(dev.index);
    };
    auto ms_per_token = [&](bool cached, std::vector<int64_t>& out) {
      tx::nn::GenerateOptions o{.max_new_tokens = new_tokens, .temperature = 0, .kv_cache = cached};
      tx::nn::generate(model, prompt, {.max_new_tokens = 2, .temperature = 0, .kv_cache = cached});  // warm-up
      sync();
      const auto t0 = std::chrono::steady_clock::now();
      out = tx::nn::generate(model, prompt, o);
      sync();
      return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / double(new_tokens);
    };
    std::vector<int64_t> with, without;
    const double cached = ms_per_token(true, with), uncached = ms_per_token(false, without);
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "bench=generate device=%s threads=%d layers=%lld dim=%lld vocab=%lld prompt=%lld new=%lld "
                  "cached_ms_per_token=%.2f uncached_ms_per_token=%.2f cache_speedup=%.2f same_tokens=%d",
                  dev.str().c_str(), omp_get_max_threads(), static_cast<long long>(layers), static_cast<long long>(dim),
                  static_cast<long long>(vocab), static_cast<long long>(prompt_len), static_cast<long long>(new_tokens),
                  cached, uncached, uncached / cached, int(with == without));
    std::string line = buf;
    const std::string args = "--device " + device + " --layers " + std::to_string(layers) + " --dim " + std::to_string(dim) +
                             " --heads " + std::to_string(heads) + " --vocab " + std::to_string(vocab) + " --prompt " +
                             std::to_string(prompt_len) + " --new " + std::to_string(new_tokens);
    auto kv = tx::bench::peer_figures(peer, std::string(TITANAX_SOURCE_DIR) + "/bench/peers/generate_torch.py", args,
                                      {"ms_per_token"}, line);
    if (!kv.empty()) {
      const double peer_ms = std::stod(kv["ms_per_token"]);
      std::snprintf(buf, sizeof buf, " peer=%s peer_ms_per_token=%.2f cached_of_peer=%.2f", kv["peer"].c_str(), peer_ms,
                    peer_ms / cached);
      line += buf;
    }
    std::printf("%s\n", line.c_str());
    return 0;
  });
}
