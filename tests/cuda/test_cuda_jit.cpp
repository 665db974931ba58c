// The JIT on the GPU (part of titanax_cuda_tests: skipped, exit 77, without a GPU; see test_cuda.cpp):
// fused groups run NVRTC-generated kernels (jit/codegen.h); replays go through captured CUDA graphs
// (jit/capture.h), checked bitwise against the op-by-op replay. Generated and eager CUDA kernels share their
// scalar math (kernels/cuda/ew_math.cuh) and both compile without FMA contraction, so the fused graph
// must equal the unfused graph on the GPU bitwise; against the CPU the usual f32 / f64 tolerances hold.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <cstdlib>
#include <random>

#include "autodiff/autodiff.h"
#include "engine/gpt.h"
#include "engine/nn.h"
#include "engine/optim.h"
#include "jit/capture.h"
#include "jit/codegen.h"
#include "jit/fusion.h"
#include "jit/graph.h"
#include "ops/ops.h"
#include "cuda_test_util.h"
#include "op_cases.h"
#include "test_util.h"

using namespace titanax;

namespace {

TensorList to_cuda(const TensorList& in) {
  TensorList out;
  for (const Tensor& t : in) out.push_back(t.to(Device::cuda(0)));
  return out;
}

// Same shape, dtype and bytes (copied to the host).
void check_bitwise(const TensorList& got, const TensorList& want) {
  REQUIRE(got.size() == want.size());
  for (size_t k = 0; k < got.size(); ++k) {
    INFO("output " << k);
    REQUIRE(got[k].shape() == want[k].shape());
    REQUIRE(got[k].dtype() == want[k].dtype());
    const Tensor a = got[k].to(Device::cpu()).contiguous(), b = want[k].to(Device::cpu()).contiguous();
    CHECK(std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0);
  }
}

// testing::rel_error of the worst output.
double rel_error(const TensorList& got, const TensorList& want) {
  double worst = 0;
  for (size_t k = 0; k < got.size(); ++k) worst = std::max(worst, testing::rel_error(got[k], want[k]));
  return worst;
}

// How many nodes of g run `op`, and how many of them lie inside a CUDA-graph segment on cuda:0.
std::pair<int, int> nodes_captured(const jit::Graph& g, const std::string& op) {
  const auto segs = jit::capture_segments(g, [&](size_t j) { return jit::capturable_node(g, g.nodes[j], Device::cuda(0)); });
  int total = 0, inside = 0;
  for (size_t j = 0; j < g.nodes.size(); ++j) {
    if (g.nodes[j].op->name() != op) continue;
    ++total;
    bool in = false;
    for (const auto& [b, e] : segs) in = in || (j >= b && j < e);
    inside += in;
  }
  return {total, inside};
}

int count_fused(const jit::Graph& g) {
  int n = 0;
  for (const auto& node : g.nodes) n += std::string(node.op->name()).rfind("fused", 0) == 0;
  return n;
}

}  // namespace

TEST_CASE("cuda jit: random fused elementwise graphs equal the unfused graph on the GPU bitwise, and the CPU") {
  std::mt19937 rng(2025);
  // f64, f32, bf16, f16 in turn: 16-bit registers computed in f32 and rounded after every op, as the
  // native eager kernels round.
  const DType dts[] = {DType::f64, DType::f32, DType::bf16, DType::f16};
  for (int trial = 0; trial < 32; ++trial) {
    const DType t = dts[trial % 4], other = dts[(trial + 1) % 4];
    const Shape full{int64_t(1 + rng() % 9), int64_t(1 + rng() % 33), int64_t(1 + rng() % 130)};
    std::vector<Shape> shapes{full};
    for (int i = 0; i < 2; ++i) {
      Shape s;
      for (int d = int(rng() % 3); d < 3; ++d) s.push_back(rng() % 3 == 0 ? 1 : full[size_t(d)]);  // broadcasting
      shapes.push_back(s);
    }
    const uint32_t seed = rng();
    auto f = [seed, other](const TensorList& in) {
      std::mt19937 r(seed);
      std::vector<Tensor> pool(in.begin(), in.end());
      auto pick = [&] { return pool[r() % pool.size()]; };
      auto pos = [](const Tensor& x) { return abs(x) + 0.5; };
      for (int k = 0; k < 14; ++k) {
        const Tensor a = pick(), b = pick();
        Tensor y;
        switch (r() % 16) {
          case 0: y = exp(clamp(a, -5, 5)); break;
          case 1: y = log(pos(a)); break;
          case 2: y = sqrt(abs(a)) - rsqrt(pos(b)); break;
          case 3: y = tanh(a) * sigmoid(b); break;
          case 4: y = gelu(a, true); break;
          case 5: y = gelu(a, false); break;
          case 6: y = a + b; break;
          case 7: y = a * b - reciprocal(pos(b)); break;
          case 8: y = a / pos(b); break;
          case 9: y = maximum(a, b); break;
          case 10: y = pow(pos(a), clamp(b, -2, 2)); break;
          case 11: y = where(gt(a, b), a, b * 0.5); break;
          case 12: y = relu_backward(a, relu(b)); break;
          case 13: y = gelu_backward(a, b, r() % 2 == 0); break;
          case 14: y = a.astype(other).astype(a.dtype()) * 3.0; break;
          default: y = square(a) + neg(b); break;
        }
        pool.push_back(y);
      }
      return TensorList{pool.back(), pool[pool.size() - 4]};
    };
    auto args = [&](uint64_t s) {
      TensorList in;
      for (size_t i = 0; i < shapes.size(); ++i) in.push_back(testing::randn64(RngKey::from_seed(s + i), shapes[i]).astype(t));
      return in;
    };
    INFO("trial " << trial << " shape " << full.str() << " dtype " << dtype_name(t));
    const jit::Graph g = jit::trace(f, to_cuda(args(500 + uint64_t(trial) * 10)));
    jit::Graph fg = g;
    jit::fuse(fg);
    CHECK(count_fused(fg) > 0);
    const TensorList fresh = args(505 + uint64_t(trial) * 10);
    const TensorList want = g.run(to_cuda(fresh)), got = fg.run(to_cuda(fresh));
    check_bitwise(got, want);
    // A transposed (strided) input takes the kernel's general path.
    TensorList strided = to_cuda(fresh);
    strided[0] = strided[0].transpose(1, 2).contiguous().transpose(1, 2);
    check_bitwise(fg.run(strided), g.run(strided));
    // Against the CPU: f32 / f64 only. In 16 bits a last-bit difference of the device's libm (exp, tanh,
    // pow) moves a rounding boundary, and the ops after it amplify that one 16-bit step (the GPU's
    // 16-bit kernels are checked against the CPU op by op in test_cuda_mixed_precision.cpp).
    if (!is_half(t)) CHECK(rel_error(got, f(fresh)) <= (t == DType::f32 ? 1e-5 : 1e-12));
  }
}

TEST_CASE("cuda jit: an MLP training step with GEMM epilogues: fused equals unfused on the GPU bitwise") {
  auto step = [](const TensorList& in) {
    ParamTree p{{"w1", in[2]}, {"b1", in[3]}, {"w2", in[4]}, {"b2", in[5]}};
    Tensor loss;
    auto g = value_and_grad(
                 [&] {
                   Tensor h = gelu(linear(in[0], p.at("w1"), p.at("b1")), true);
                   Tensor o = linear(h, p.at("w2"), p.at("b2"));
                   return loss = mean(square(o - in[1]));
                 },
                 p)
                 .second;
    return TensorList{loss, g.at("w1"), g.at("b1"), g.at("w2"), g.at("b2")};
  };
  auto args = [](uint64_t s) {
    TensorList a;
    for (const Shape& sh : {Shape{128, 64}, Shape{128, 16}, Shape{256, 64}, Shape{256}, Shape{16, 256}, Shape{16}})
      a.push_back(testing::randn64(RngKey::from_seed(s++), sh).astype(DType::f32).to(Device::cuda(0)));
    return a;
  };
  jit::Graph g = jit::trace(step, args(20));
  jit::optimize(g);
  jit::Graph fg = g;
  jit::reset_kernel_cache_stats();
  REQUIRE(jit::fuse(fg) > 0);
  int epilogues = 0;
  for (const auto& node : fg.nodes) epilogues += std::string(node.op->name()) == "fused_matmul";
  CHECK(epilogues > 0);
  check_bitwise(fg.run(args(30)), g.run(args(30)));
  check_bitwise(fg.run(args(40)), step(args(40)));  // and eager
  const auto st = jit::kernel_cache_stats();
  CHECK(st.compiles + st.disk_hits + st.memory_hits >= int64_t(jit::fused_kernel_sources(fg).size()));
}

TEST_CASE("cuda jit: the first call compiles every generated kernel (in parallel); replays compile nothing") {
  auto f = [](const TensorList& in) {
    Tensor h = gelu(in[0] * in[1] + 1.0, true);
    return TensorList{tanh(h) * 0.5, sigmoid(h - in[1]).astype(DType::bf16) * 2.0};
  };
  const TensorList a = to_cuda({testing::randn64(RngKey::from_seed(61), Shape{64, 96}).astype(DType::f32),
                                testing::randn64(RngKey::from_seed(62), Shape{96}).astype(DType::f32)});
  jit::clear_kernel_memory_cache();
  jit::reset_kernel_cache_stats();
  jit::Compiled step(f);
  step(a);  // trace, passes, then the kernels' compiles
  const auto first = jit::kernel_cache_stats();
  CHECK(first.compiles + first.disk_hits > 0);
  const TensorList got = step(a), again = step(a);
  const auto later = jit::kernel_cache_stats();
  CHECK(later.compiles == first.compiles);
  CHECK(later.disk_hits == first.disk_hits);
  check_bitwise(got, f(a));
  check_bitwise(again, got);
}

TEST_CASE("cuda jit: a training step replayed through CUDA graphs equals the op-by-op replay bitwise") {
  // Two identical MLPs on cuda:0 with their own AdamW (warm-up schedule: the learning rate changes at
  // every step) and clipping; one compiled with CUDA graphs, one without. The same fresh batches.
  struct Twin {
    nn::MLP model{{64, 128, 128, 10}};
    std::unique_ptr<optim::Optimizer> opt = optim::adamw(optim::warmup_cosine(1e-2, 3, 20));
    ParamTree params;
    jit::Compiled step;
    explicit Twin(bool graphs)
        : step([this](const TensorList& in) {
                 auto [loss, grads] = value_and_grad([&] { return cross_entropy(model.forward(in[0]), in[1]); }, params);
                 Tensor norm = optim::clip_grad_norm_tensor(grads, 0.5);
                 opt->step(params, grads);
                 return TensorList{loss, norm};
               },
               jit::JitOptions{.cuda_graphs = graphs}) {
      model.init_parameters(5);
      model.to(Device::cuda(0));
      params = model.parameters();
    }
  };
  auto batch = [](uint64_t s) {
    const RngKey k = RngKey::from_seed(900 + s);
    Tensor x = random_normal(k, Shape{32, 64});
    Tensor y = (random_uniform(fold_in(k, 1), Shape{32}, DType::f64) * 10.0).astype(DType::i64);
    return TensorList{x.to(Device::cuda(0)), y.to(Device::cuda(0))};
  };
  Twin graphs(true), plain(false);
  std::vector<TensorList> got;
  for (int s = 0; s < 10; ++s) {
    INFO("call " << s);
    if (s == 6) {  // new memory for the weights (same values): the captures must be made again
      graphs.model.to(Device::cpu());
      graphs.model.to(Device::cuda(0));
    }
    got.push_back(graphs.step(batch(uint64_t(s))));
    const TensorList want = plain.step(batch(uint64_t(s)));
    check_bitwise(got.back(), want);
  }
  CHECK(std::isfinite(got.back()[0].to(Device::cpu()).item()));
  for (size_t i = 0; i < graphs.params.size(); ++i) {
    INFO(graphs.params[i].first);
    check_bitwise({graphs.params[i].second}, {plain.params[i].second});
  }
  const jit::CaptureStats* st = graphs.step.capture_stats_for(batch(0));
  REQUIRE(st != nullptr);
  CHECK(st->segments >= 1);
  CHECK(st->captured_nodes > 0);
  CHECK(st->failed_captures == 0);  // a refusal is logged with the node that caused it
  CHECK(st->recaptures == 1);
  CHECK(st->launches == int64_t(st->segments) * 8);  // calls 2..9 (call 0 traced, call 1 warmed up)
  CHECK(plain.step.capture_stats_for(batch(0)) == nullptr);
  // The AdamW updates read their scalars from device memory: inside a segment, not op by op.
  const jit::Graph* g = graphs.step.graph_for(batch(0));
  REQUIRE(g != nullptr);
  const auto [updates, inside] = nodes_captured(*g, "adamw_update");
  CHECK(updates == 1);  // one multi-tensor update for every parameter
  CHECK(inside == updates);

  // TITANAX_CUDA_GRAPHS=0 replays op by op.
  ::setenv("TITANAX_CUDA_GRAPHS", "0", 1);
  Twin off(true);
  for (int s = 0; s < 3; ++s) off.step(batch(uint64_t(s)));
  ::unsetenv("TITANAX_CUDA_GRAPHS");
  CHECK(off.step.capture_stats_for(batch(0)) == nullptr);
}

TEST_CASE("cuda jit: a GPT training step captures its embeddings too, and equals the op-by-op replay bitwise") {
  // The token and position embeddings (gather forward, device-sorted scatter-add backward) check their
  // ids on the device, so nothing in the step waits for the host: every embedding node is captured.
  struct Twin {
    nn::GPT model{nn::GPTConfig{.vocab = 64, .layers = 1, .heads = 2, .dim = 32, .seq_len = 16, .tp_axis = ""}};
    std::unique_ptr<optim::Optimizer> opt = optim::adamw(optim::constant(3e-3));
    ParamTree params;
    jit::Compiled step;
    explicit Twin(bool graphs)
        : step([this](const TensorList& in) {
                 auto [loss, grads] = value_and_grad([&] { return model.loss(in[0], in[1]); }, params);
                 opt->step(params, grads);
                 return TensorList{loss};
               },
               jit::JitOptions{.cuda_graphs = graphs}) {
      model.init_parameters(11);
      model.to(Device::cuda(0));
      params = model.parameters();
    }
  };
  auto batch = [](uint64_t s) {
    const RngKey k = RngKey::from_seed(700 + s);
    Tensor ids = (random_uniform(k, Shape{4, 16}, DType::f64) * 64.0).astype(DType::i64);
    Tensor tgt = (random_uniform(fold_in(k, 1), Shape{4, 16}, DType::f64) * 64.0).astype(DType::i64);
    return TensorList{ids.to(Device::cuda(0)), tgt.to(Device::cuda(0))};
  };
  Twin graphs(true), plain(false);
  for (int s = 0; s < 6; ++s) {
    INFO("call " << s);
    check_bitwise(graphs.step(batch(uint64_t(s))), plain.step(batch(uint64_t(s))));
  }
  for (size_t i = 0; i < graphs.params.size(); ++i) {
    INFO(graphs.params[i].first);
    check_bitwise({graphs.params[i].second}, {plain.params[i].second});
  }
  const jit::CaptureStats* st = graphs.step.capture_stats_for(batch(0));
  REQUIRE(st != nullptr);
  CHECK(st->failed_captures == 0);
  const jit::Graph* g = graphs.step.graph_for(batch(0));
  REQUIRE(g != nullptr);
  for (const char* op : {"embedding", "embedding_backward", "cross_entropy_with_grad", "adamw_update"}) {
    INFO(op);
    const auto [total, inside] = nodes_captured(*g, op);
    CHECK(total > 0);
    CHECK(inside == total);
  }
}
