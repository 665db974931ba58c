// Training with the Engine on the GPU (part of titanax_cuda_tests: skipped, exit 77, without a GPU; see
// test_cuda.cpp). The model moves with nn::Module::to(cuda:0), the Engine moves each batch to it; the MLP
// and the CNN of the MNIST configs (small shapes) take the same steps on cuda:0 as on the CPU from the same
// initialisation and batches: per-step losses, final parameters and evaluation metrics agree; checkpoints
// round-trip between the devices; optimizer state left on another device is refused.
#include <catch2/catch.hpp>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "engine/engine.h"
#include "io/checkpoint.h"
#include "jit/graph.h"
#include "parallel/runtime.h"

using namespace titanax;

namespace {

// 4 classes from the signs of sums of the inputs: learnable by both models. x is [n, 1, 12, 12] for
// the CNN (the MLP flattens it to 144 features).
std::shared_ptr<TensorDataset> images(int64_t n, uint64_t seed) {
  Tensor x = random_normal(RngKey::from_seed(seed), Shape{n, 1, 12, 12});
  const std::vector<float> xv = x.to_vector<float>();
  std::vector<int64_t> y(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    double top = 0, left = 0;
    for (int64_t h = 0; h < 12; ++h)
      for (int64_t w = 0; w < 12; ++w) {
        const double v = xv[size_t(i * 144 + h * 12 + w)];
        top += h < 6 ? v : -v;
        left += w < 6 ? v : -v;
      }
    y[size_t(i)] = int64_t(top > 0) + 2 * int64_t(left > 0);
  }
  return std::make_shared<TensorDataset>(std::map<std::string, Tensor>{{"x", x}, {"y", from_vector(y, Shape{n})}});
}

std::shared_ptr<nn::Module> make_model(bool cnn) {
  if (cnn) return std::make_shared<nn::CNN>(nn::CNNOptions{.image_size = 12, .classes = 4, .hidden = 32, .channels = {8, 16}});
  return std::make_shared<nn::MLP>(std::vector<int64_t>{144, 64, 4});
}

Mesh single_mesh() { return MeshSpec{{"data"}, {1}}.build(make_local_communicator()); }

// Worst |a - b| / max(1, |b|) over every parameter (a may live on the GPU).
double max_rel(const ParamTree& a, const ParamTree& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    REQUIRE(a[i].first == b[i].first);
    const auto x = a[i].second.to(Device::cpu()).to_vector<double>(), y = b[i].second.to_vector<double>();
    for (size_t j = 0; j < y.size(); ++j) worst = std::max(worst, std::fabs(x[j] - y[j]) / std::max(1.0, std::fabs(y[j])));
  }
  return worst;
}

struct Run {
  std::vector<double> losses;
  Metrics eval;
};

// 30 SGD + momentum steps (no Adam: its m / sqrt(v) turns rounding differences of tiny gradients into
// steps of size lr), then an evaluation.
Run train(nn::Module& model, const std::shared_ptr<TensorDataset>& data, const std::shared_ptr<TensorDataset>& test) {
  Mesh mesh = single_mesh();
  Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::sgd(optim::constant(0.05), 0.9));
  DataLoader loader(data, {.batch_size = 32, .shuffle = true, .seed = 3, .prefetch = 0});
  Run r;
  for (int s = 0; s < 30; ++s) r.losses.push_back(engine.step(model, classification_loss, loader.next()).loss);
  r.eval = engine.evaluate(model, EvalSpec{.data = test, .batch_size = 100});
  return r;
}

}  // namespace

TEST_CASE("cuda training: the MNIST MLP and CNN take the CPU's steps on cuda:0 (losses, parameters, eval)") {
  auto data = images(512, 1), test = images(300, 2);
  for (bool cnn : {false, true}) {
    INFO((cnn ? "CNN" : "MLP"));
    auto cpu = make_model(cnn), gpu = make_model(cnn);
    REQUIRE(max_rel(gpu->parameters(), cpu->parameters()) == 0.0);  // the same initialisation
    gpu->to(Device::cuda(0));
    REQUIRE(gpu->device() == Device::cuda(0));
    for (const auto& [p, t] : gpu->parameters()) REQUIRE(t.device() == Device::cuda(0));

    const Run want = train(*cpu, data, test), got = train(*gpu, data, test);
    for (const auto& [p, t] : gpu->parameters()) CHECK(t.device() == Device::cuda(0));  // it stayed there
    REQUIRE(got.losses.size() == want.losses.size());
    for (size_t s = 0; s < want.losses.size(); ++s) {
      INFO("step " << s);
      CHECK(got.losses[s] == Approx(want.losses[s]).epsilon(1e-4));
    }
    CHECK(want.losses.back() < 0.7 * want.losses.front());  // it learns
    CHECK(max_rel(gpu->parameters(), cpu->parameters()) <= 1e-3);
    CHECK(got.eval.at("eval/loss") == Approx(want.eval.at("eval/loss")).epsilon(1e-4));
    // An example whose two best logits are within rounding may flip: at most one of the 300.
    CHECK(std::fabs(got.eval.at("eval/accuracy") - want.eval.at("eval/accuracy")) <= 1.0 / 300 + 1e-12);
  }
}

TEST_CASE("cuda training: a checkpoint saved from cuda:0 restores on the CPU and back, bitwise") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("titanax_cuda_ckpt_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  auto data = images(128, 5);
  Mesh mesh = single_mesh();
  auto engine_at = [&](const std::string& d) {
    EngineOptions eo;
    eo.checkpointer = std::make_shared<Checkpointer>(d, 2);
    return std::make_unique<Engine>(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-2)), eo);
  };
  nn::CNN gpu({.image_size = 12, .classes = 4, .hidden = 16, .channels = {4, 8}});
  gpu.to(Device::cuda(0));
  auto e1 = engine_at((dir / "a").string());
  DataLoader loader(data, {.batch_size = 32, .shuffle = false, .prefetch = 0});
  for (int s = 0; s < 3; ++s) e1->step(gpu, classification_loss, loader.next());
  e1->save(gpu);

  nn::CNN cpu({.image_size = 12, .classes = 4, .hidden = 16, .channels = {4, 8}});
  auto e2 = engine_at((dir / "a").string());
  REQUIRE(e2->restore(cpu) == 3);
  CHECK(cpu.device() == Device::cpu());
  CHECK(max_rel(gpu.parameters(), cpu.parameters()) == 0.0);

  // The CPU model saves; a fresh model on the GPU restores it (host -> device copies into its storage).
  auto e3 = engine_at((dir / "b").string());
  e3->save(cpu);
  nn::CNN back({.image_size = 12, .classes = 4, .hidden = 16, .channels = {4, 8}});
  back.to(Device::cuda(0));
  auto e4 = engine_at((dir / "b").string());
  REQUIRE(e4->restore(back).has_value());
  CHECK(back.device() == Device::cuda(0));
  CHECK(max_rel(back.parameters(), cpu.parameters()) == 0.0);
  // And it trains on from there: the optimizer state restored with it is on the GPU too.
  CHECK(std::isfinite(e4->step(back, classification_loss, loader.next()).loss));
  fs::remove_all(dir);
}

TEST_CASE("cuda training: optimizer state on the CPU for a model moved to the GPU is a DeviceError") {
  auto data = images(64, 7);
  nn::MLP model({144, 16, 4});
  Mesh mesh = single_mesh();
  Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-2)));
  DataLoader loader(data, {.batch_size = 32, .prefetch = 0});
  engine.step(model, classification_loss, loader.next());  // Adam's moments are created on the CPU
  const std::vector<float> before = model.parameters()[0].second.to_vector<float>();
  model.to(Device::cuda(0));
  try {
    engine.step(model, classification_loss, loader.next());
    FAIL("expected a DeviceError");
  } catch (const DeviceError& e) {
    CHECK_THAT(e.message(), Catch::Matchers::Contains("optimizer state"));
    CHECK_THAT(e.message(), Catch::Matchers::Contains("before the optimizer's first step"));
  }
  // Nothing was updated: the parameters still hold the values they moved with.
  CHECK(model.parameters()[0].second.to(Device::cpu()).to_vector<float>() == before);
}

TEST_CASE("cuda training: the Engine's JIT-compiled step follows the eager losses on cuda:0 (MLP, CNN)") {
  // The whole step traced on the GPU: forward, backward, clipping, AdamW (the update ops read the step
  // count and learning rate as host scalars); the trajectories agree as on the CPU (tests/unit/test_jit_step.cpp).
  auto data = images(256, 11);
  for (bool cnn : {false, true}) {
    INFO((cnn ? "CNN" : "MLP"));
    std::vector<double> losses[2];
    ParamTree finals[2];
    for (int use_jit = 0; use_jit < 2; ++use_jit) {
      auto model = make_model(cnn);
      model->to(Device::cuda(0));
      Mesh mesh = single_mesh();
      Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::warmup_cosine(3e-3, 3, 12)),
                    EngineOptions{.grad_clip = 1.0, .jit = use_jit == 1});
      DataLoader loader(data, {.batch_size = 32, .shuffle = true, .seed = 2, .prefetch = 0});
      for (int s = 0; s < 12; ++s) losses[use_jit].push_back(engine.step(*model, classification_loss, loader.next()).loss);
      finals[use_jit] = model->parameters();
      if (use_jit) {
        REQUIRE(engine.jit_stats() != nullptr);
        CHECK(engine.jit_stats()->misses == 1);
        CHECK(engine.jit_stats()->hits == 11);
      }
    }
    for (size_t s = 0; s < losses[0].size(); ++s) {
      INFO("step " << s << ": jit " << losses[1][s] << " eager " << losses[0][s]);
      CHECK(std::fabs(losses[1][s] - losses[0][s]) <= 1e-5 * std::max(1.0, std::fabs(losses[0][s])));
    }
    for (const auto& [p, t] : finals[1]) CHECK(t.device() == Device::cuda(0));
    CHECK(max_rel(finals[1], finals[0]) <= 1e-4);
  }
}
