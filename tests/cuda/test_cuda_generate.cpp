// GPT decoding on the GPU (part of titanax_cuda_tests: skipped, exit 77, without a GPU; see test_cuda.cpp):
// GPT::forward_cached (the KV cache: the prompt's causal attention, then one query over the cached keys
// and values, concatenated on the device) and a padded vocabulary's -inf logits match the same model on
// the CPU position by position, on fresh random weights and ids, and greedy generate gives the CPU's
// tokens with and without the cache. LoRA fine-tuning (adapters on every block layer, the rest frozen)
// under the Engine on the GPU follows the CPU's steps, the frozen weights bitwise unchanged.
#include <catch2/catch.hpp>

#include <cmath>

#include "autodiff/autodiff.h"
#include "cuda_test_util.h"
#include "engine/gpt.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;

TEST_CASE("cuda GPT decoding: forward_cached matches the CPU position by position; generate gives the CPU's tokens") {
  const uint64_t seed = testing::fresh_seed();
  INFO("TITANAX_TEST_SEED=" << seed);
  const nn::GPTConfig c{.vocab = 61, .layers = 2, .heads = 4, .dim = 64, .seq_len = 24, .tp_axis = "", .pad_vocab_multiple = 8};
  nn::GPT cpu(c), gpu(c);
  {  // weights of scale 0.3, so that logits are far apart and greedy choices do not hinge on rounding
    NoGradGuard ng;
    uint64_t k = 0;
    for (auto& [path, t] : cpu.parameters()) copy_(t, testing::randn64(RngKey::from_seed(seed + k++), t.shape(), 0.3));
  }
  gpu.load_global_parameters(cpu.parameters());
  gpu.to(Device::cuda(0));
  NoGradGuard ng;
  const Tensor ids = testing::randint(RngKey::from_seed(seed + 100), Shape{2, 20}, c.vocab);
  nn::KVCache kc, kg;
  // f32 without TF32 (the default): each op within 1e-5 of the CPU, two blocks of them within 1e-4.
  auto check = [&](int64_t lo, int64_t hi) {
    INFO("positions " << lo << ".." << hi - 1);
    const Tensor x = ids.slice(1, lo, hi).contiguous();
    const Tensor want = cpu.forward_cached(x, kc), got = gpu.forward_cached(x.to(Device::cuda(0)), kg).to(Device::cpu());
    CHECK(testing::rel_error(got.slice(2, 0, c.vocab), want.slice(2, 0, c.vocab)) < 1e-4);
    for (double v : got.slice(2, c.vocab, c.padded_vocab()).contiguous().to_vector<double>()) CHECK(v == -INFINITY);
  };
  check(0, 8);  // the prompt
  for (int64_t t = 8; t < 20; ++t) check(t, t + 1);
  CHECK(kg.k[0].device() == Device::cuda(0));
  CHECK(kg.length == 20);
  for (bool cached : {true, false}) {
    INFO("kv_cache " << cached);
    const nn::GenerateOptions o{.max_new_tokens = 30, .temperature = 0, .kv_cache = cached};  // past seq_len 24 too
    CHECK(nn::generate(gpu, {1, 2, 3, 4}, o) == nn::generate(cpu, {1, 2, 3, 4}, o));
  }
}

TEST_CASE("cuda LoRA fine-tuning: 3 Engine steps of the adapters on the GPU match the CPU; the frozen weights stay") {
  const uint64_t seed = testing::fresh_seed();
  INFO("TITANAX_TEST_SEED=" << seed);
  const nn::GPTConfig c{.vocab = 61, .layers = 2, .heads = 4, .dim = 64, .seq_len = 24, .tp_axis = "", .lora_rank = 4,
                        .lora_alpha = 8, .lora_targets = {"attn/qkv", "attn/proj", "mlp/fc", "mlp/out"}};
  nn::GPT cpu(c), gpu(c);
  {  // every matrix random (lora_b too, so the adapters' gradients reach lora_a)
    NoGradGuard ng;
    uint64_t k = 0;
    for (auto& [path, t] : cpu.parameters())
      if (t.dim() >= 2) copy_(t, testing::randn64(RngKey::from_seed(seed + k++), t.shape(), 0.3));
  }
  gpu.load_global_parameters(cpu.parameters());
  gpu.to(Device::cuda(0));
  const ParamTree before = gpu.parameters().map([](const std::string&, const Tensor& t) { return t.to(Device::cpu()); });
  Mesh solo = MeshSpec{{"data"}, {1}}.build(make_local_communicator());
  Engine ec(solo, Plan{}, optim::adamw(optim::constant(1e-2)), {.grad_clip = 1.0});
  Engine eg(solo, Plan{}, optim::adamw(optim::constant(1e-2)), {.grad_clip = 1.0});
  for (int s = 0; s < 3; ++s) {
    const Batch b{{{"x", testing::randint(RngKey::from_seed(seed + 200 + uint64_t(s)), Shape{4, 24}, c.vocab)},
                   {"y", testing::randint(RngKey::from_seed(seed + 300 + uint64_t(s)), Shape{4, 24}, c.vocab)}}};
    const StepResult rc = ec.step(cpu, nn::lm_loss, b), rg = eg.step(gpu, nn::lm_loss, b);
    INFO("step " << s << ": loss " << rc.loss << " vs " << rg.loss);
    CHECK(rg.loss == Approx(rc.loss).epsilon(1e-4));
    CHECK(rg.grad_norm == Approx(rc.grad_norm).epsilon(1e-4));
  }
  for (const auto& [p, t] : gpu.parameters()) {
    INFO(p);
    const Tensor g = t.to(Device::cpu());
    if (p.find("/lora_") == std::string::npos) CHECK(testing::bitwise_equal(g, before.at(p)));
    else CHECK(testing::rel_error(g, cpu.parameters().at(p)) < 1e-3);
  }
}
