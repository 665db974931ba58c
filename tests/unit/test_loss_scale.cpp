// Loss scaling (engine/loss_scale.h) in the Engine: the policy (backoff on overflow, growth after N good
// steps), skipped steps leaving parameters, moments and the step counter bitwise unchanged, unscaling
// before clipping (a power-of-two scale gives bitwise the unscaled trajectory, clipped or not), the
// scaler's state in checkpoints, and bad options.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <limits>
#include <set>

#include "engine/engine.h"
#include "engine/loss_scale.h"
#include "engine/nn.h"
#include "engine/optim.h"
#include "jit/graph.h"
#include "ops/ops.h"
#include "parallel/runtime.h"
#include "test_util.h"

using namespace titanax;

namespace {
Mesh single_mesh() { return MeshSpec{{"data"}, {1}}.build(make_local_communicator()); }

Batch batch_of(uint64_t seed) {
  const RngKey k = RngKey::from_seed(seed);
  Tensor y = (random_uniform(fold_in(k, 1), Shape{16}, DType::f64) * 4.0).astype(DType::i64);
  return Batch{{{"x", random_normal(k, Shape{16, 12})}, {"y", y}}};
}

std::vector<std::vector<float>> snapshot(const ParamTree& t) {
  std::vector<std::vector<float>> out;
  for (const auto& [p, v] : t) out.push_back(v.astype(DType::f32).to_vector<float>());
  return out;
}

// classification_loss, times inf on the steps in `overflow` (counted per call): every gradient is then
// inf or NaN, as an fp16 overflow makes them.
struct OverflowLoss {
  std::set<int> overflow;
  int calls = 0;
  Tensor operator()(nn::Module& m, const Batch& b) {
    Tensor l = classification_loss(m, b);
    return overflow.count(calls++) ? l * std::numeric_limits<double>::infinity() : l;
  }
};

struct Trajectory {
  std::vector<double> loss, norm;
  std::vector<std::vector<float>> params;
};

Trajectory run(LossScaleOptions ls, double clip, int steps) {
  nn::MLP model({12, 24, 4});
  Mesh mesh = single_mesh();
  Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::warmup_cosine(1e-2, 2, steps)),
                EngineOptions{.grad_clip = clip, .loss_scale = ls});
  Trajectory t;
  for (int s = 0; s < steps; ++s) {
    const StepResult r = engine.step(model, classification_loss, batch_of(uint64_t(s)));
    CHECK_FALSE(r.skipped);
    t.loss.push_back(r.loss);
    t.norm.push_back(r.grad_norm);
  }
  t.params = snapshot(model.parameters());
  return t;
}
}  // namespace

TEST_CASE("loss scaling: an overflowing step is skipped and halves the scale; good steps grow it", "[engine][loss_scale]") {
  nn::MLP model({12, 24, 4});
  Mesh mesh = single_mesh();
  Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-2)),
                EngineOptions{.grad_clip = 1.0, .loss_scale = LossScaleOptions::dynamic(1024, 3)});
  OverflowLoss loss{{1, 2}};
  auto fn = [&](nn::Module& m, const Batch& b) { return loss(m, b); };

  StepResult r = engine.step(model, fn, batch_of(0));  // good step 1 at scale 1024
  CHECK_FALSE(r.skipped);
  CHECK(r.loss_scale == 1024);
  const auto params = snapshot(model.parameters());
  const auto moments = snapshot(engine.optimizer().state());
  const int64_t opt_steps = engine.optimizer().steps();

  r = engine.step(model, fn, batch_of(1));  // overflow: skipped, scale 512
  CHECK(r.skipped);
  CHECK(r.loss_scale == 1024);
  CHECK_FALSE(std::isfinite(r.grad_norm));
  CHECK(engine.loss_scaler()->scale() == 512);
  r = engine.step(model, fn, batch_of(2));  // overflow again: 256
  CHECK(r.skipped);
  CHECK(r.loss_scale == 512);
  CHECK(engine.loss_scaler()->scale() == 256);
  // Nothing moved: parameters, moments, the optimizer's step counter (bitwise).
  CHECK(snapshot(model.parameters()) == params);
  CHECK(snapshot(engine.optimizer().state()) == moments);
  CHECK(engine.optimizer().steps() == opt_steps);
  CHECK(engine.loss_scaler()->skipped_steps() == 2);
  CHECK(engine.global_step() == 3);  // skipped steps consumed their batches

  for (int s = 3; s < 6; ++s) {  // three good steps in a row: the scale doubles once, then counts again
    r = engine.step(model, fn, batch_of(uint64_t(s)));
    CHECK_FALSE(r.skipped);
    CHECK(r.loss_scale == 256);
  }
  CHECK(engine.loss_scaler()->scale() == 512);
  CHECK(engine.loss_scaler()->good_steps() == 0);
  CHECK(snapshot(model.parameters()) != params);
  CHECK(engine.optimizer().steps() == opt_steps + 3);
}

TEST_CASE("loss scaling by a power of two gives bitwise the unscaled trajectory, clipped or not", "[engine][loss_scale]") {
  for (double clip : {0.0, 0.05}) {
    INFO("grad_clip " << clip);
    const Trajectory plain = run(LossScaleOptions::none(), clip, 8);
    const Trajectory fixed = run(LossScaleOptions::fixed(4096), clip, 8);
    const Trajectory dyn = run(LossScaleOptions::dynamic(65536, 2), clip, 8);  // the scale grows 4 times
    CHECK(fixed.loss == plain.loss);
    CHECK(fixed.norm == plain.norm);
    CHECK(fixed.params == plain.params);
    CHECK(dyn.loss == plain.loss);
    CHECK(dyn.norm == plain.norm);
    CHECK(dyn.params == plain.params);
  }
  // A scale that is not a power of two rounds when unscaled: close to the unscaled run, not bitwise.
  const Trajectory odd = run(LossScaleOptions::fixed(3.0), 0.05, 8);
  const Trajectory plain = run(LossScaleOptions::none(), 0.05, 8);
  for (size_t i = 0; i < odd.loss.size(); ++i) {
    CHECK(odd.loss[i] == Approx(plain.loss[i]).epsilon(1e-5));
    CHECK(odd.norm[i] == Approx(plain.norm[i]).epsilon(1e-5));
  }
}

TEST_CASE("loss scaling: the scaler's state is saved in checkpoints and restored", "[engine][loss_scale]") {
  const auto dir = std::filesystem::temp_directory_path() / "titanax-loss-scale-ckpt";
  std::filesystem::remove_all(dir);
  Mesh mesh = single_mesh();
  auto make = [&] {
    return std::make_unique<Engine>(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-2)),
                                    EngineOptions{.checkpointer = std::make_shared<Checkpointer>(dir.string(), 2,
                                                                                                 make_local_communicator()),
                                                  .loss_scale = LossScaleOptions::dynamic(1024, 100)});
  };
  nn::MLP model({12, 24, 4});
  auto engine = make();
  OverflowLoss loss{{1}};
  auto fn = [&](nn::Module& m, const Batch& b) { return loss(m, b); };
  for (int s = 0; s < 4; ++s) engine->step(model, fn, batch_of(uint64_t(s)));
  CHECK(engine->loss_scaler()->scale() == 512);
  CHECK(engine->loss_scaler()->good_steps() == 2);
  engine->save(model);

  nn::MLP fresh({12, 24, 4});
  auto resumed = make();
  REQUIRE(resumed->restore(fresh) == std::optional<int64_t>(4));
  CHECK(resumed->loss_scaler()->scale() == 512);
  CHECK(resumed->loss_scaler()->good_steps() == 2);
  CHECK(resumed->loss_scaler()->skipped_steps() == 1);
  CHECK(resumed->global_step() == 4);
  std::filesystem::remove_all(dir);
}

TEST_CASE("loss scaling under jit: the compiled step skips an overflowing step and moves the scale as eager does", "[engine][loss_scale][jit]") {
  // The overflow comes from the data (an inf in the inputs of step 2), since a replayed graph does not
  // rerun C++ branches of the loss function.
  auto batch = [](int s) {
    Batch b = batch_of(uint64_t(s));
    if (s == 2 || s == 3) {
      Tensor x = b["x"].contiguous();
      x.data<float>()[5] = std::numeric_limits<float>::infinity();
      b.items["x"] = x;
    }
    return b;
  };
  struct Run {
    std::vector<StepResult> steps;
    std::vector<std::vector<std::vector<float>>> params, state;
    std::vector<double> scale;
    std::vector<int64_t> opt_steps;
  };
  auto run = [&](bool jit) {
    nn::MLP model({12, 24, 4});
    Mesh mesh = single_mesh();
    Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::warmup_cosine(1e-2, 2, 8)),
                  EngineOptions{.grad_clip = 1.0, .loss_scale = LossScaleOptions::dynamic(1024, 2), .jit = jit});
    Run r;
    for (int s = 0; s < 8; ++s) {
      r.steps.push_back(engine.step(model, classification_loss, batch(s)));
      r.params.push_back(snapshot(model.parameters()));
      r.state.push_back(snapshot(engine.optimizer().state()));
      r.scale.push_back(engine.loss_scaler()->scale());
      r.opt_steps.push_back(engine.optimizer().steps());
    }
    CHECK(engine.loss_scaler()->skipped_steps() == 2);
    CHECK(engine.global_step() == 8);
    if (jit) CHECK(engine.jit_stats()->misses == 1);  // one graph for every step, skipped or not
    return r;
  };
  const Run eager = run(false), traced = run(true);
  // 1024 -> 2048 after two good steps, halved twice by the overflows, doubled after two more good ones.
  CHECK(eager.scale == std::vector<double>{1024, 2048, 1024, 512, 512, 1024, 1024, 2048});
  for (size_t s = 0; s < eager.steps.size(); ++s) {
    INFO("step " << s);
    CHECK(traced.steps[s].skipped == eager.steps[s].skipped);
    CHECK(traced.steps[s].skipped == (s == 2 || s == 3));
    CHECK(traced.steps[s].loss_scale == eager.steps[s].loss_scale);
    CHECK(traced.scale[s] == eager.scale[s]);
    CHECK(traced.opt_steps[s] == eager.opt_steps[s]);
    if (eager.steps[s].skipped) {  // nothing moved: parameters and moments bitwise as before the step
      CHECK_FALSE(std::isfinite(traced.steps[s].grad_norm));
      CHECK(traced.params[s] == traced.params[s - 1]);
      CHECK(traced.state[s] == traced.state[s - 1]);
    } else {
      CHECK(traced.steps[s].loss == Approx(eager.steps[s].loss).epsilon(1e-5));
      CHECK(traced.steps[s].grad_norm == Approx(eager.steps[s].grad_norm).epsilon(1e-5));
    }
  }
  for (size_t i = 0; i < eager.params.back().size(); ++i)
    for (size_t j = 0; j < eager.params.back()[i].size(); ++j)
      CHECK(traced.params.back()[i][j] == Approx(eager.params.back()[i][j]).margin(1e-5));
}

TEST_CASE("loss scaling: bad options are clear errors", "[engine][loss_scale]") {
  Mesh mesh = single_mesh();
  auto make = [&](LossScaleOptions ls) {
    return Engine(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-2)), EngineOptions{.loss_scale = ls});
  };
  CHECK_THROWS_AS(make(LossScaleOptions::fixed(0)), ValueError);
  CHECK_THROWS_AS(make(LossScaleOptions::dynamic(std::numeric_limits<double>::infinity())), ValueError);
  LossScaleOptions bad = LossScaleOptions::dynamic();
  bad.backoff_factor = 1.5;
  CHECK_THROWS_AS(make(bad), ValueError);
  bad = LossScaleOptions::dynamic(1024, 0);
  CHECK_THROWS_AS(make(bad), ValueError);
  CHECK(LossScaleOptions::dynamic(1024, 10).str() == "dynamic (init 1024, growth x2 every 10 steps, backoff x0.5)");
}
