// vmap on the GPU (part of titanax_cuda_tests: skipped, exit 77, without a GPU; see test_cuda.cpp):
// per-example gradients computed batched on CUDA against the same vmap on the CPU (which
// tests/unit/test_vmap.cpp checks against a loop over the batch), on fresh random f32 inputs, with no
// node falling back to a loop. They exercise the rules whose CUDA side differs from the CPU's: the
// max-pool workspace (int32 winners per output element) folded into N, the scatter-adds with each
// example's ids offset into its own rows (and their check on the device), sum_squares' rows form (the
// multi-tensor kernel once per row) and dropout's shared mask.
#include <catch2/catch.hpp>

#include <functional>
#include <map>
#include <string>

#include "autodiff/autodiff.h"
#include "core/cuda_runtime.h"
#include "engine/gpt.h"
#include "jit/vmap.h"
#include "ops/ops.h"
#include "cuda_test_util.h"
#include "op_cases.h"
#include "test_util.h"

using namespace titanax;
using testing::bitwise_equal;
using testing::rel_error;

namespace {

const Device kGpu = Device::cuda(0);

Tensor rnd32(uint64_t seed, const Shape& s, double scale = 1.0) {
  return testing::randn64(RngKey::from_seed(seed), s, scale).astype(DType::f32);
}

// Runs vmap(make(device)) on both devices (the GPU's inputs copied from the CPU's) and compares every
// output: relative error under `tol` (cuDNN / cuBLAS / our kernels against oneDNN / ours on the CPU);
// no node may fall back to a loop on the GPU.
void check_against_cpu(const std::function<jit::Fn(Device)>& make, const TensorList& cpu_args, double tol) {
  TensorList gpu_args;
  for (const Tensor& t : cpu_args) gpu_args.push_back(t.to(kGpu));
  const TensorList want = jit::vmap(make(Device::cpu()))(cpu_args);
  jit::reset_vmap_stats();
  const TensorList got = jit::vmap(make(kGpu))(gpu_args);
  CHECK(jit::vmap_stats().fallback.empty());
  REQUIRE(got.size() == want.size());
  for (size_t k = 0; k < got.size(); ++k) {
    INFO("output " << k);
    CHECK(got[k].device() == kGpu);
    CHECK(got[k].shape() == want[k].shape());
    CHECK(rel_error(got[k], want[k]) < tol);
  }
}

}  // namespace

TEST_CASE("cuda: per-example gradients of a CNN with max pooling under vmap match the CPU's", "[vmap]") {
  const uint64_t seed = testing::fresh_seed();
  INFO("TITANAX_TEST_SEED=" << seed);
  const std::map<std::string, Tensor> cpu{{"w1", rnd32(seed + 1, Shape{4, 1, 3, 3}, 0.5)}, {"b1", rnd32(seed + 2, Shape{4})},
                                          {"w2", rnd32(seed + 3, Shape{6, 4, 3, 3}, 0.3)}, {"w3", rnd32(seed + 4, Shape{5, 12}, 0.3)}};
  auto make = [&](Device d) -> jit::Fn {
    ParamTree p;
    for (const auto& [name, t] : cpu) p.insert(name, t.to(d));
    return [p](const TensorList& in) {
      auto [value, g] = value_and_grad(
          [&] {
            Tensor h = max_pool2d(relu(conv2d(in[0].unsqueeze(0), p.at("w1"), p.at("b1"), {1, 1}, {1, 1})), {2, 3});
            h = max_pool2d(relu(conv2d(h, p.at("w2"))), {3, 3}, {2, 2}, {1, 1});
            return cross_entropy(linear(h.reshape(Shape{1, 12}), p.at("w3")), in[1].unsqueeze(0));
          },
          p);
      const Tensor norm = sqrt(sum_squares(g.tensors()));  // f64
      const Tensor clip = minimum(scalar_like(1.0, norm), 1.0 / norm);
      return TensorList{value, g.at("w1"), g.at("b1"), g.at("w2"), g.at("w3"), clip};
    };
  };
  const Tensor x = rnd32(seed + 5, Shape{7, 1, 12, 12}), y = testing::randint(RngKey::from_seed(seed + 6), Shape{7}, 5);
  check_against_cpu(make, {x, y}, 1e-4);
}

TEST_CASE("cuda: per-example gradients of a GPT under vmap match the CPU's", "[vmap][gpt]") {
  const uint64_t seed = testing::fresh_seed();
  INFO("TITANAX_TEST_SEED=" << seed);
  nn::GPTConfig c;
  c.vocab = 13;
  c.layers = 2;
  c.heads = 2;
  c.dim = 16;
  c.seq_len = 6;
  nn::GPT on_cpu(c), on_gpu(c);
  for (auto& [path, t] : on_cpu.parameters()) copy_(t, rnd32(seed ^ std::hash<std::string>{}(path), t.shape(), 0.3));
  const ParamTree cpu_params = on_cpu.parameters();
  ParamTree gpu_params = on_gpu.parameters();
  for (size_t i = 0; i < cpu_params.size(); ++i) copy_(gpu_params[i].second, cpu_params[i].second);
  on_gpu.to(kGpu);
  auto make = [&](Device d) -> jit::Fn {
    nn::GPT* m = d.is_cuda() ? &on_gpu : &on_cpu;
    return [m](const TensorList& in) {
      const ParamTree params = m->parameters();
      auto [value, g] = value_and_grad([&] { return m->loss(in[0].unsqueeze(0), in[1].unsqueeze(0)); }, params);
      TensorList out{value};
      for (const auto& [path, t] : params) out.push_back(g.at(path));
      return out;
    };
  };
  const Tensor ids = testing::randint(RngKey::from_seed(seed + 1), Shape{5, 6}, 13), targets = testing::randint(RngKey::from_seed(seed + 2), Shape{5, 6}, 13);
  check_against_cpu(make, {ids, targets}, 1e-4);
  // An id out of range in example 3 (not 0, which fn is traced on) is the embedding's error on the GPU
  // too (thrown at the next wait for the device), not a row of example 4's table.
  Tensor bad = ids.clone(), e = bad.slice(0, 3, 4).slice(1, 2, 3);
  fill_(e, 13);
  auto err = testing::catch_error<ValueError>([&] {
    const TensorList r = jit::vmap(make(kGpu))({bad.to(kGpu), targets.to(kGpu)});
    (void)r[0].to(Device::cpu());
  });
  CHECK(err.message().find("index out of range") != std::string::npos);
  // The backward's gathers and scatters checked the same id: their reports come at later waits.
  for (int i = 0; i < 8; ++i) {
    try {
      cuda_rt::synchronize(0);
      break;
    } catch (const ValueError&) {
    }
  }
  CHECK_NOTHROW(cuda_rt::synchronize(0));
}

TEST_CASE("cuda: sum_squares per example (the rows form) and dropout's shared mask under vmap", "[vmap]") {
  const uint64_t seed = testing::fresh_seed();
  INFO("TITANAX_TEST_SEED=" << seed);
  // Per example: [40000] f32 (several chunks of the kernel) and [3, 5] bf16.
  const Tensor a = rnd32(seed, Shape{4, 40000}).to(kGpu), h = rnd32(seed + 1, Shape{4, 3, 5}).astype(DType::bf16).to(kGpu);
  auto f = [](const TensorList& in) { return TensorList{sum_squares(in)}; };
  const Tensor got = jit::vmap(f)({a, h})[0];
  for (int64_t b = 0; b < 4; ++b) {
    INFO("example " << b);
    const Tensor one = sum_squares({a.slice(0, b, b + 1).squeeze(0), h.slice(0, b, b + 1).squeeze(0)});
    CHECK(bitwise_equal(got.slice(0, b, b + 1).squeeze(0), one));  // the same kernel on the same elements
  }
  // Dropout: every example the mask the CPU draws for the same key (by element index in the example).
  auto d = [](const TensorList& in) { return TensorList{dropout(in[0], 0.3, RngKey::from_seed(11))}; };
  const Tensor x = rnd32(seed + 2, Shape{3, 5, 7});
  jit::reset_vmap_stats();
  CHECK(bitwise_equal(jit::vmap(d)({x.to(kGpu)})[0], jit::vmap(d)({x})[0]));
  CHECK(jit::vmap_stats().fallback.empty());
}
