// engine/: modules, optimizers against their published update rules, schedules, clipping, gradient
// accumulation equivalence, bitwise resume.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <titanax/titanax.h>

#include "core/cuda_runtime.h"
#include "engine/engine.h"
#include "parallel/runtime.h"

using namespace titanax;

TEST_CASE("modules name their parameters by path", "[engine][nn]") {
  nn::MLP mlp({4, 8, 3});
  auto p = mlp.parameters();
  CHECK(p.paths() == std::vector<std::string>{"layers/0/weight", "layers/0/bias", "layers/1/weight", "layers/1/bias"});
  CHECK(p.at("layers/0/weight").shape() == Shape{8, 4});
  CHECK(mlp.num_parameters() == 8 * 4 + 8 + 3 * 8 + 3);
  // PyTorch's default init bound 1/sqrt(fan_in), deterministic in the seed, different across layers.
  auto w = p.at("layers/0/weight").to_vector<float>();
  for (float v : w) REQUIRE(std::fabs(v) <= 0.5f);
  nn::MLP again({4, 8, 3});
  CHECK(again.parameters().at("layers/0/weight").to_vector<float>() == w);
  mlp.init_parameters(1);
  CHECK(mlp.parameters().at("layers/0/weight").to_vector<float>() != w);
  nn::CNN cnn;
  CHECK(cnn.parameters().contains("features/0/weight"));
  CHECK(cnn.parameters().at("head/0/weight").shape() == Shape{128, 64 * 7 * 7});
  CHECK_THROWS_AS(nn::MLP({4}), ValueError);
  CHECK_THROWS_AS(mlp.forward(ones(Shape{2, 5})), ShapeError);
}

TEST_CASE("AdamW and Adam follow torch.optim's update rule", "[engine][optim]") {
  const double lr = 0.01, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1;
  for (bool decoupled : {true, false}) {
    ParamTree p{{"w", from_vector(std::vector<double>{0.5, -1.0, 2.0}, Shape{3})}};
    std::vector<double> w = {0.5, -1.0, 2.0}, m(3, 0), v(3, 0);
    auto opt = decoupled ? optim::adamw(optim::constant(lr), {b1, b2, eps, wd}) : optim::adam(optim::constant(lr), {b1, b2, eps, wd});
    for (int t = 1; t <= 3; ++t) {
      std::vector<double> g = {0.1 * t, -0.2, 0.3 / t};
      ParamTree gt{{"w", from_vector(g, Shape{3})}};
      opt->step(p, gt);
      for (int i = 0; i < 3; ++i) {  // the reference formula, written out here
        double gi = g[size_t(i)];
        if (decoupled) w[size_t(i)] *= 1 - lr * wd;
        else gi += wd * w[size_t(i)];
        m[size_t(i)] = b1 * m[size_t(i)] + (1 - b1) * gi;
        v[size_t(i)] = b2 * v[size_t(i)] + (1 - b2) * gi * gi;
        double mh = m[size_t(i)] / (1 - std::pow(b1, t)), vh = v[size_t(i)] / (1 - std::pow(b2, t));
        w[size_t(i)] -= lr * mh / (std::sqrt(vh) + eps);
      }
      auto got = p.at("w").to_vector<double>();
      for (int i = 0; i < 3; ++i) REQUIRE(got[size_t(i)] == Approx(w[size_t(i)]).epsilon(1e-12));
    }
    CHECK(opt->steps() == 3);
  }
}

TEST_CASE("SGD with momentum and Nesterov follows torch.optim.SGD", "[engine][optim]") {
  for (bool nesterov : {false, true}) {
    ParamTree p{{"w", from_vector(std::vector<double>{1.0, -1.0}, Shape{2})}};
    auto opt = optim::sgd(optim::constant(0.1), 0.9, 0.01, nesterov);
    std::vector<double> w = {1.0, -1.0}, buf(2, 0);
    for (int t = 0; t < 4; ++t) {
      std::vector<double> g = {0.5 - t, 0.25 * t};
      ParamTree gt{{"w", from_vector(g, Shape{2})}};
      opt->step(p, gt);
      for (size_t i = 0; i < 2; ++i) {
        double gi = g[i] + 0.01 * w[i];
        buf[i] = t == 0 ? gi : 0.9 * buf[i] + gi;
        w[i] -= 0.1 * (nesterov ? gi + 0.9 * buf[i] : buf[i]);
      }
      auto got = p.at("w").to_vector<double>();
      REQUIRE(got[0] == Approx(w[0]).epsilon(1e-12));
      REQUIRE(got[1] == Approx(w[1]).epsilon(1e-12));
    }
  }
  CHECK_THROWS_AS(optim::sgd(optim::constant(0.1), 0.0, 0.0, true), ValueError);
}

TEST_CASE("learning-rate schedules", "[engine][optim]") {
  auto wc = optim::warmup_cosine(1.0, 10, 110, 0.1);
  CHECK(wc(0) == Approx(0.1));
  CHECK(wc(9) == Approx(1.0));
  CHECK(wc(10) == Approx(1.0));
  CHECK(wc(60) == Approx(0.1 + 0.9 * 0.5));
  CHECK(wc(110) == Approx(0.1));
  CHECK(wc(500) == Approx(0.1));
  auto c = optim::cosine(2.0, 100);
  CHECK(c(50) == Approx(1.0));
  CHECK(c(100) == Approx(0.0).margin(1e-12));
  CHECK(optim::exponential(1.0, 0.5, 10)(20) == Approx(0.25));
  CHECK(optim::constant(3e-4)(12345) == 3e-4);
  CHECK_THROWS_AS(optim::warmup_cosine(1.0, 10, 5), ValueError);
}

TEST_CASE("clip_grad_norm scales to the threshold and reports the norm", "[engine][optim]") {
  Tensor shared = from_vector(std::vector<double>{3, 0}, Shape{2});
  ParamTree g{{"a", shared}, {"b", from_vector(std::vector<double>{0, 4}, Shape{2})}, {"c", shared}};
  double n = optim::clip_grad_norm(g, 1.0);
  CHECK(n == Approx(std::sqrt(9.0 + 16.0 + 9.0)));
  CHECK(optim::global_norm(g) == Approx(1.0).epsilon(1e-5));
  CHECK(shared.to_vector<double>() == std::vector<double>{3, 0});  // the caller's tensors are not modified
  ParamTree small{{"a", from_vector(std::vector<double>{0.1}, Shape{1})}};
  optim::clip_grad_norm(small, 1.0);
  CHECK(small.at("a").item() == 0.1);
}

namespace {

std::shared_ptr<TensorDataset> synthetic(int64_t n, uint64_t seed) {
  Tensor x = random_normal(RngKey::from_seed(seed), Shape{n, 12});
  std::vector<int64_t> y(static_cast<size_t>(n));
  auto xv = x.to_vector<float>();
  for (int64_t i = 0; i < n; ++i) y[size_t(i)] = (xv[size_t(i * 12)] + xv[size_t(i * 12 + 1)] > 0) + 2 * (xv[size_t(i * 12 + 2)] > 0);
  return std::make_shared<TensorDataset>(std::map<std::string, Tensor>{{"x", x}, {"y", from_vector(y, Shape{n})}});
}

std::vector<float> flat_params(nn::Module& m) {
  std::vector<float> out;
  for (const auto& [p, t] : m.parameters()) {
    auto v = t.to_vector<float>();
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

Mesh single_mesh() { return MeshSpec{{"data"}, {1}}.build(make_local_communicator()); }

}  // namespace

TEST_CASE("gradient accumulation over 4 microbatches equals one step on the whole batch", "[engine]") {
  auto data = synthetic(256, 3);
  auto run = [&](int acc) {
    nn::MLP model({12, 32, 4});
    Mesh mesh = single_mesh();
    Engine engine(mesh, Plan{.dp = DP{"data", acc}}, optim::adamw(optim::constant(1e-2)));
    DataLoader loader(data, {.batch_size = 64, .shuffle = true, .seed = 5, .prefetch = 0});
    for (int s = 0; s < 5; ++s) engine.step(model, classification_loss, loader.next());
    return flat_params(model);
  };
  auto one = run(1), four = run(4);
  REQUIRE(one.size() == four.size());
  double max_diff = 0;
  for (size_t i = 0; i < one.size(); ++i) max_diff = std::max(max_diff, double(std::fabs(one[i] - four[i])));
  INFO("max |difference| " << max_diff);
  CHECK(max_diff <= 1e-5);
  CHECK(max_diff > 0);  // different summation order: equal to rounding, not trivially identical code paths
}

TEST_CASE("100 + resume + 100 steps equals 200 straight steps bitwise", "[engine][checkpoint]") {
  namespace fs = std::filesystem;
  auto data = synthetic(512, 4);
  fs::path dir = fs::temp_directory_path() / ("titanax_resume_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  auto train = [&](int64_t steps, const std::string& ckpt, int64_t every = 0, bool async = false) {
    nn::MLP model({12, 32, 32, 4}, {.dropout = 0.1});  // dropout: the per-step RNG must resume too
    Mesh mesh = single_mesh();
    EngineOptions eo;
    eo.seed = 9;
    eo.grad_clip = 1.0;
    if (!ckpt.empty()) eo.checkpointer = std::make_shared<Checkpointer>(ckpt, 5);
    Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::warmup_cosine(3e-3, 20, 200)), eo);
    DataLoader loader(data, {.batch_size = 32, .shuffle = true, .seed = 1, .prefetch = 2});
    FitOptions fo;
    fo.steps = steps;
    fo.log_every = 0;
    fo.checkpoint_every = every;
    fo.async_checkpoint = async;
    engine.fit(model, classification_loss, loader, fo);
    if (eo.checkpointer) CHECK_FALSE(eo.checkpointer->pending());  // fit's last save commits the async ones
    return flat_params(model);
  };
  auto straight = train(200, "");
  train(100, (dir / "a").string());  // saves step 100
  auto resumed = train(200, (dir / "a").string());
  REQUIRE(straight.size() == resumed.size());
  CHECK(std::memcmp(straight.data(), resumed.data(), straight.size() * sizeof(float)) == 0);

  // Checkpoints written in the background while training goes on hold their step's state: resumed from
  // the asynchronous step-100 checkpoint alone, the run ends bitwise where the straight one does.
  train(200, (dir / "b").string(), 50, true);
  CHECK(Checkpointer((dir / "b").string()).steps() == std::vector<int64_t>{50, 100, 150, 200});
  fs::create_directories(dir / "c");
  fs::copy(dir / "b" / "step_00000100", dir / "c" / "step_00000100");
  auto resumed_async = train(200, (dir / "c").string());
  REQUIRE(straight.size() == resumed_async.size());
  CHECK(std::memcmp(straight.data(), resumed_async.data(), straight.size() * sizeof(float)) == 0);
  fs::remove_all(dir);
}

TEST_CASE("the engine learns a separable problem and evaluates it", "[engine]") {
  auto train = synthetic(1024, 7), test = synthetic(256, 8);
  nn::MLP model({12, 64, 4});
  Mesh mesh = single_mesh();
  Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-2)));
  DataLoader loader(train, {.batch_size = 64, .seed = 2});
  FitOptions fo;
  fo.steps = 150;
  fo.log_every = 0;
  fo.eval = {.data = test, .every = 0, .batch_size = 100};
  auto r = engine.fit(model, classification_loss, loader, fo);
  CHECK(r.steps == 150);
  CHECK(r.final_eval.at("eval/accuracy") > 0.9);
  CHECK(r.final_eval.at("eval/loss") < 0.4);
  Engine two_micro(mesh, Plan{.dp = DP{"data", 2}}, optim::sgd(optim::constant(0.1)));
  CHECK_THROWS_AS(two_micro.step(model, classification_loss, train->get({0, 1, 2})), PlanError);  // 3 examples, 2 microbatches
}

TEST_CASE("bad hyper-parameters and fit options are refused before any step", "[engine][optim]") {
  const double nan = std::nan(""), inf = INFINITY;
  for (double lr : {-1e-3, nan, inf}) {
    INFO("lr " << lr);
    CHECK_THROWS_AS(optim::constant(lr), ValueError);
    CHECK_THROWS_AS(optim::cosine(lr, 10), ValueError);
    CHECK_THROWS_AS(optim::warmup_cosine(lr, 1, 10), ValueError);
    CHECK_THROWS_AS(optim::exponential(lr, 0.5, 10), ValueError);
  }
  CHECK_NOTHROW(optim::constant(0.0));  // a frozen run is allowed, as in torch.optim
  for (double bad : {-0.1, nan, inf}) {
    INFO("value " << bad);
    CHECK_THROWS_AS(optim::cosine(1.0, 10, bad), ValueError);
    CHECK_THROWS_AS(optim::warmup_cosine(1.0, 1, 10, bad), ValueError);
    CHECK_THROWS_AS(optim::adamw(optim::constant(1e-3), {.weight_decay = bad}), ValueError);
    CHECK_THROWS_AS(optim::sgd(optim::constant(0.1), bad), ValueError);        // momentum
    CHECK_THROWS_AS(optim::sgd(optim::constant(0.1), 0.9, bad), ValueError);   // weight decay
  }
  for (double max_norm : {0.0, -1.0, nan}) CHECK_THROWS_AS(optim::clip_coefficient(1.0, max_norm), ValueError);
  CHECK(optim::clip_coefficient(1e30, inf) == 1.0);  // an infinite threshold never clips, as in torch
  for (double rate : {0.0, -0.5, nan, inf}) CHECK_THROWS_AS(optim::exponential(1.0, rate, 10), ValueError);
  for (double beta : {-0.1, 1.0, nan}) {
    CHECK_THROWS_AS(optim::adam(optim::constant(1e-3), {.beta1 = beta}), ValueError);
    CHECK_THROWS_AS(optim::adamw(optim::constant(1e-3), {.beta2 = beta}), ValueError);
  }
  for (double eps : {0.0, nan, inf}) CHECK_THROWS_AS(optim::adamw(optim::constant(1e-3), {.eps = eps}), ValueError);

  Mesh mesh = single_mesh();
  CHECK_THROWS_AS(Engine(mesh, Plan{.dp = DP{"data", 1}}, optim::sgd(optim::constant(0.1)), {.grad_clip = nan}),
                  ValueError);
  // fit() checks its options before the first step: nothing trains, and a bad evaluation batch does not
  // surface only after the whole run (with a batch of 0 the evaluation loop never advanced).
  auto train = synthetic(64, 7), test = synthetic(32, 8);
  nn::MLP model({12, 8, 4});
  const std::vector<float> before = flat_params(model);
  Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::sgd(optim::constant(0.1)));
  DataLoader loader(train, {.batch_size = 16, .seed = 2, .prefetch = 0});
  auto refused = [&](auto&& edit) {
    FitOptions fo;
    fo.steps = 3;
    fo.log_every = 0;
    fo.eval = {.data = test, .every = 0, .batch_size = 8};
    edit(fo);
    CHECK_THROWS_AS(engine.fit(model, classification_loss, loader, fo), ValueError);
    CHECK(flat_params(model) == before);
  };
  refused([](FitOptions& fo) { fo.steps = -1; });
  refused([](FitOptions& fo) { fo.stop_at = -2; });
  refused([](FitOptions& fo) { fo.log_every = -1; });
  refused([](FitOptions& fo) { fo.checkpoint_every = -1; });
  refused([](FitOptions& fo) { fo.eval.every = -5; });
  refused([](FitOptions& fo) { fo.eval.batch_size = 0; });
  refused([](FitOptions& fo) { fo.eval.batch_size = -8; });
  CHECK_THROWS_AS(engine.evaluate(model, {.data = test, .every = 0, .batch_size = 0}), ValueError);
  CHECK(engine.evaluate(model, {.data = test, .every = 0, .batch_size = 5}).at("eval/accuracy") >= 0);
  // A checkpoint directory that cannot be created fails before the first step, not at the first save.
  namespace fs = std::filesystem;
  const fs::path file = fs::temp_directory_path() / ("titanax_not_a_dir_" + std::to_string(::getpid()));
  std::ofstream(file) << "x";
  Engine saving(mesh, Plan{.dp = DP{"data", 1}}, optim::sgd(optim::constant(0.1)),
                {.checkpointer = std::make_shared<Checkpointer>((file / "ck").string(), 2)});
  FitOptions fo;
  fo.steps = 3;
  fo.log_every = 0;
  CHECK_THROWS_WITH(saving.fit(model, classification_loss, loader, fo), Catch::Matchers::Contains("Not a directory"));
  CHECK(flat_params(model) == before);
  fs::remove(file);
}

TEST_CASE("Module::to moves parameters in place; Batch::to shares what is already there", "[engine][device]") {
  nn::MLP model({12, 8, 4});
  ParamTree before = model.parameters();
  const std::vector<float> values = flat_params(model);
  model.to(Device::cpu());  // already there: nothing moves, nothing is copied
  CHECK(model.device() == Device::cpu());
  for (size_t i = 0; i < before.size(); ++i)
    CHECK(model.parameters()[i].second.storage() == before[i].second.storage());

  if (cuda_rt::device_count() == 0) {
    // No GPU (or a CPU build): a clear DeviceError and the model left untouched on the CPU.
    CHECK_THROWS_AS(model.to(Device::cuda(0)), DeviceError);
    CHECK(model.device() == Device::cpu());
    CHECK(flat_params(model) == values);
  } else {
    // The handles taken before the move see the new storage (one identity, as PyTorch's Module.to).
    model.to(Device::cuda(0));
    for (const auto& [p, t] : before) CHECK(t.device() == Device::cuda(0));
    model.to(Device::cpu());
    CHECK(flat_params(model) == values);
  }

  auto data = synthetic(8, 1);
  const Batch b = data->get({0, 1, 2});
  const Batch same = b.to(Device::cpu());
  CHECK(same["x"].storage() == b["x"].storage());
  CHECK(same["y"].storage() == b["y"].storage());
}

TEST_CASE("CsvLogger writes one header, appends on reopen, and refuses paths it cannot write", "[engine]") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("titanax_csv_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  const fs::path csv = dir / "sub" / "metrics.csv";  // its directory is created
  CsvLogger(csv.string()).log(1, {{"train/loss", 2.5}});
  CsvLogger(csv.string()).log(2, {{"train/loss", 1.25}});  // a resumed run continues the file
  std::ifstream in(csv);
  std::stringstream text;
  text << in.rdbuf();
  CHECK(text.str() == "step,metric,value\n1,train/loss,2.5\n2,train/loss,1.25\n");
  // A directory, or a path under a regular file: IOError naming the path (before: std::filesystem's own
  // exception, or fopen's bare failure).
  CHECK_THROWS_WITH(CsvLogger((dir / "sub").string()), Catch::Matchers::Contains("the metrics CSV path is a directory"));
  CHECK_THROWS_AS(CsvLogger((csv / "x.csv").string()), IOError);
  CHECK_THROWS_WITH(CsvLogger((csv / "x.csv").string()), Catch::Matchers::Contains("Not a directory"));
  fs::remove_all(dir);
}

TEST_CASE("a training step refuses a loss without gradient history, eager and under jit", "[engine]") {
  // PyTorch refuses such a backward; here the step would have taken all-zero gradients, silently.
  auto data = synthetic(64, 3);
  DataLoader loader(data, {.batch_size = 16, .shuffle = false, .prefetch = 0});
  const Batch b = loader.next();
  auto detached = [](nn::Module& m, const Batch& batch) { return classification_loss(m, batch).detach(); };
  for (bool jit : {false, true}) {
    INFO("jit " << jit);
    nn::MLP model({12, 8, 4});
    Mesh mesh = single_mesh();
    Engine engine(mesh, Plan{}, optim::sgd(optim::constant(0.1)), {.jit = jit});
    const std::vector<float> before = flat_params(model);
    CHECK_THROWS_WITH(engine.step(model, detached, b), Catch::Matchers::Contains("does not depend on any parameter") &&
                                                          Catch::Matchers::Contains("NoGradGuard"));
    CHECK(flat_params(model) == before);  // nothing was updated
    engine.step(model, classification_loss, b);  // a loss with history trains
    CHECK(flat_params(model) != before);
  }
}

TEST_CASE("under jit, a step with another loss function or other batch keys compiles anew", "[engine][jit]") {
  // The compiled step was made once per model: a later step with another loss, or a batch with other
  // keys, replayed the first one's graph.
  auto data = synthetic(64, 3);
  DataLoader loader(data, {.batch_size = 16, .shuffle = false, .prefetch = 0});
  const Batch b = loader.next();
  Batch weighted = b;
  weighted.items["w"] = full(Shape{16}, 0.5);
  auto doubled = [](nn::Module& m, const Batch& batch) { return classification_loss(m, batch) * 2.0; };
  auto by_keys = [](nn::Module& m, const Batch& batch) {  // scaled by the mean weight when the batch has one
    const Tensor l = classification_loss(m, batch);
    return batch.items.count("w") ? l * mean(batch.items.at("w")) : l;
  };
  std::vector<double> losses[2];
  for (bool jit : {false, true}) {
    nn::MLP model({12, 8, 4});
    Mesh mesh = single_mesh();
    Engine engine(mesh, Plan{}, optim::sgd(optim::constant(0.1)), {.jit = jit});
    losses[jit].push_back(engine.step(model, classification_loss, b).loss);
    losses[jit].push_back(engine.step(model, doubled, b).loss);
    losses[jit].push_back(engine.step(model, by_keys, b).loss);
    losses[jit].push_back(engine.step(model, by_keys, weighted).loss);
  }
  for (size_t i = 0; i < losses[0].size(); ++i) {
    INFO("step " << i);
    CHECK(losses[1][i] == Approx(losses[0][i]).epsilon(1e-6));
  }
  CHECK(losses[0][1] > 1.5 * losses[0][0]);  // the second loss is the doubled one
}
