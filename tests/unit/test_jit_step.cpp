// jit/graph.h on whole training steps: the tape's backward and the optimizer update traced into one
// graph with in-place updates of live state, against eager steps from the same initial weights; static
// inputs; what tracing refuses (host reads of traced values, writes into computed tensors).
#include <catch2/catch.hpp>

#include <cmath>

#include <titanax/titanax.h>

#include "engine/engine.h"
#include "engine/gpt.h"
#include "jit/fusion.h"
#include "jit/graph.h"
#include "jit/memory_plan.h"
#include "jit_test_util.h"
#include "parallel/runtime.h"
#include "op_cases.h"
#include "test_util.h"

using namespace titanax;
using Catch::Matchers::Contains;

namespace {
Mesh single_mesh() { return MeshSpec{{"data"}, {1}}.build(make_local_communicator()); }

std::vector<double> values(const Tensor& t) { return t.to_vector<double>(); }

using testing::count_op;

// |a - b| <= 1e-5 * max(1, |b|) at every step, and reports the largest difference.
void check_trajectories(const std::vector<double>& jit, const std::vector<double>& eager) {
  REQUIRE(jit.size() == eager.size());
  double worst = 0;
  for (size_t i = 0; i < jit.size(); ++i) {
    INFO("step " << i << ": jit " << jit[i] << " eager " << eager[i]);
    REQUIRE(std::isfinite(jit[i]));
    CHECK(std::fabs(jit[i] - eager[i]) <= 1e-5 * std::max(1.0, std::fabs(eager[i])));
    worst = std::max(worst, std::fabs(jit[i] - eager[i]));
  }
  UNSCOPED_INFO("largest loss difference " << worst);
}

// Random classification batches: x [B, in] (or images), labels in [0, classes).
Batch batch_of(uint64_t seed, const Shape& x_shape, int64_t classes) {
  const RngKey k = RngKey::from_seed(seed);
  Tensor x = random_normal(k, x_shape);
  Tensor y = (random_uniform(fold_in(k, 1), Shape{x_shape[0]}, DType::f64) * double(classes)).astype(DType::i64);
  return Batch{{{"x", x}, {"y", y}}};
}

// Runs `steps` Engine steps on the same batches eagerly and under jit, from the same initial weights.
template <class MakeModel>
void engine_parity(MakeModel make, const std::function<Batch(int)>& data, const LossFn& loss, int steps,
                   std::function<std::unique_ptr<optim::Optimizer>()> opt, double clip) {
  std::vector<double> losses[2], norms[2];
  ParamTree finals[2];
  int64_t hits = 0, misses = 0;
  for (int use_jit = 0; use_jit < 2; ++use_jit) {
    auto model = make();
    Mesh mesh = single_mesh();
    Engine engine(mesh, Plan{.dp = DP{"data", 1}}, opt(), EngineOptions{.grad_clip = clip, .jit = use_jit == 1});
    for (int s = 0; s < steps; ++s) {
      StepResult r = engine.step(*model, loss, data(s));
      losses[use_jit].push_back(r.loss);
      norms[use_jit].push_back(r.grad_norm);
    }
    finals[use_jit] = model->parameters();
    if (use_jit) {
      REQUIRE(engine.jit_stats() != nullptr);
      hits = engine.jit_stats()->hits;
      misses = engine.jit_stats()->misses;
    }
  }
  check_trajectories(losses[1], losses[0]);
  check_trajectories(norms[1], norms[0]);
  CHECK(misses == 1);  // one signature: traced once, replayed after
  CHECK(hits == steps - 1);
  for (const auto& [path, w] : finals[0]) {
    INFO(path);
    const std::vector<double> a = values(w), b = values(finals[1].at(path));
    double worst = 0;
    for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(a[i] - b[i]));
    CHECK(worst <= 1e-5);
  }
}
}  // namespace

TEST_CASE("jit traces a whole training step: forward, backward, clipping and AdamW in one graph", "[jit][step]") {
  nn::MLP model({6, 16, 3}), twin({6, 16, 3});
  ParamTree params = model.parameters(), tp = twin.parameters();
  twin.init_parameters(7);  // different weights, then the same as model's: the copy is what makes them equal
  for (size_t i = 0; i < params.size(); ++i) copy_(tp[i].second, params[i].second);
  auto opt = optim::adamw(optim::warmup_cosine(1e-2, 3, 20));  // the lr changes every step: it must not be baked
  auto step = [&](const TensorList& in) {
    auto [loss, grads] = value_and_grad([&] { return cross_entropy(model.forward(in[0]), in[1]); }, params);
    Tensor norm = optim::clip_grad_norm_tensor(grads, 0.5);
    opt->step(params, grads);
    return TensorList{loss, norm};
  };
  jit::Graph g = jit::trace(step, {batch_of(1, Shape{8, 6}, 3)["x"], batch_of(1, Shape{8, 6}, 3)["y"]});
  // Each parameter and its two moments written back, plus the step count; the parameters are live state.
  CHECK(g.updates.size() == 3 * params.size() + 1);
  CHECK(count_op(g, "adamw_update") == 1);  // one multi-tensor update node for the whole group
  CHECK_THAT(g.str(), Contains("params=" + std::to_string(params.size())));
  CHECK(count_op(g, "update_scalars") == 1);
  CHECK(count_op(g, "lr_schedule") == 1);
  int state = 0;
  for (const auto& v : g.values) state += v.kind == jit::Value::Kind::state;
  CHECK(state == 3 * int(params.size()) + 1);
  CHECK_THAT(g.str(), Contains("= state f32[16, 6]") && Contains(" <- %"));
  CHECK_THAT(g.dot(), Contains("state %") && Contains("shape=house"));

  // The same steps eagerly on the twin: the trace took the first step on `model`, replays the rest.
  auto topt = optim::adamw(optim::warmup_cosine(1e-2, 3, 20));
  for (int s = 1; s < 12; ++s) {
    Batch b = batch_of(uint64_t(s), Shape{8, 6}, 3);
    const TensorList got = s == 1 ? TensorList{} : g.run({b["x"], b["y"]});
    auto [l, gr] = value_and_grad([&] { return cross_entropy(twin.forward(b["x"]), b["y"]); }, tp);
    const Tensor n = optim::clip_grad_norm_tensor(gr, 0.5);
    topt->step(tp, gr);
    if (s == 1) continue;
    CHECK(got[0].item() == l.item());  // the same kernels in the same order: bitwise
    CHECK(got[1].item() == n.item());
  }
  CHECK(opt->steps() == topt->steps());
  for (size_t i = 0; i < params.size(); ++i) CHECK(params[i].second.to_vector<float>() == tp[i].second.to_vector<float>());
}

TEST_CASE("jit: parameters with different update settings get one update node per group, as the eager step", "[jit][step]") {
  // AdamW without weight decay on the biases (a decay filter): two groups of settings.
  nn::MLP model({6, 16, 16, 3}), twin({6, 16, 16, 3});
  ParamTree params = model.parameters(), tp = twin.parameters();
  for (size_t i = 0; i < params.size(); ++i) copy_(tp[i].second, params[i].second);
  auto make_opt = [] {
    return optim::adamw(optim::warmup_cosine(1e-2, 3, 20),
                        optim::AdamOptions{.weight_decay = 0.1, .decay_filter = [](const std::string&, const Tensor& t) { return t.dim() > 1; }});
  };
  auto opt = make_opt(), topt = make_opt();
  auto step = [&](const TensorList& in) {
    auto [loss, grads] = value_and_grad([&] { return cross_entropy(model.forward(in[0]), in[1]); }, params);
    opt->step(params, grads);
    return TensorList{loss};
  };
  jit::Graph g = jit::trace(step, {batch_of(1, Shape{8, 6}, 3)["x"], batch_of(1, Shape{8, 6}, 3)["y"]});
  CHECK(count_op(g, "adamw_update") == 2);
  CHECK(count_op(g, "update_scalars") == 2);
  CHECK_THAT(g.str(), Contains("wd=0.1 params=3") && Contains("wd=0 params=3"));
  for (int s = 1; s < 8; ++s) {
    Batch b = batch_of(uint64_t(s), Shape{8, 6}, 3);
    const TensorList got = s == 1 ? TensorList{} : g.run({b["x"], b["y"]});
    auto [l, gr] = value_and_grad([&] { return cross_entropy(twin.forward(b["x"]), b["y"]); }, tp);
    topt->step(tp, gr);
    if (s > 1) CHECK(got[0].item() == l.item());
  }
  for (size_t i = 0; i < params.size(); ++i) {
    INFO(params[i].first);
    CHECK(params[i].second.to_vector<float>() == tp[i].second.to_vector<float>());
  }
}

TEST_CASE("an optimizer's grad_factor equals scaling the gradients first, bitwise, eagerly and traced", "[jit][step][optim]") {
  struct Setting {
    const char* name;
    std::function<std::unique_ptr<optim::Optimizer>()> make;
  };
  const std::vector<Setting> settings = {
      {"AdamW", [] { return optim::adamw(optim::warmup_cosine(1e-2, 2, 10), {.weight_decay = 0.1}); }},
      {"Adam (L2)", [] { return optim::adam(optim::constant(1e-2), {.weight_decay = 0.1}); }},
      {"SGD Nesterov", [] { return optim::sgd(optim::constant(0.05), 0.9, 1e-3, true); }},
      {"SGD plain", [] { return optim::sgd(optim::constant(0.05)); }}};
  const RngKey key = RngKey::from_seed(41);
  auto params_of = [&] {
    return ParamTree{{"w", random_normal(key, Shape{5, 7})}, {"b", random_normal(fold_in(key, 1), Shape{7})}};
  };
  auto grads_at = [&](int s) {
    return ParamTree{{"w", random_normal(fold_in(key, 10 + s), Shape{5, 7})},
                     {"b", random_normal(fold_in(key, 20 + s), Shape{7})}};
  };
  const std::vector<double> factors = {0.37, 1.0, 0.0123, 0.5};  // a new one at every step (the graph's input)
  for (const Setting& st : settings) {
    INFO(st.name);
    // Reference: the gradients scaled first, as clip_to_norm_tensor does (the factor rounded to f32).
    ParamTree want = params_of(), eager = params_of(), traced = params_of();
    auto ref = st.make(), opt = st.make(), topt = st.make();
    for (size_t s = 0; s < factors.size(); ++s) {
      const Tensor f = scalar(factors[s], DType::f64);
      ref->step(want, grads_at(int(s)).map([&](const std::string&, const Tensor& g) { return g * f.astype(g.dtype()); }));
      opt->step(eager, grads_at(int(s)), {}, f);
    }
    auto step = [&](const TensorList& in) {
      topt->step(traced, ParamTree{{"w", in[0]}, {"b", in[1]}}, {}, in[2]);
      return TensorList{};
    };
    auto args = [&](size_t s) {
      const ParamTree g = grads_at(int(s));
      return TensorList{g.at("w"), g.at("b"), scalar(factors[s], DType::f64)};
    };
    jit::Graph g = jit::trace(step, args(0));  // the trace takes the first step
    for (size_t s = 1; s < factors.size(); ++s) g.run(args(s));
    CHECK(topt->steps() == int64_t(factors.size()));
    for (const auto& [path, w] : want) {
      INFO(path);
      CHECK(eager.at(path).to_vector<float>() == w.to_vector<float>());
      CHECK(traced.at(path).to_vector<float>() == w.to_vector<float>());
    }
    for (const auto& [path, m] : ref->state()) {
      INFO("state " << path);
      CHECK(opt->state().at(path).to_vector<double>() == m.to_vector<double>());
      CHECK(topt->state().at(path).to_vector<double>() == m.to_vector<double>());
    }
  }
  auto opt = optim::sgd(optim::constant(0.1));
  ParamTree p = params_of();
  CHECK_THROWS_AS(opt->step(p, grads_at(0), {}, ones(Shape{1}, DType::f64)), ValueError);  // not 0-d
  CHECK_THROWS_AS(opt->step(p, grads_at(0), {}, scalar(2.0, DType::i64)), ValueError);     // not floating
}

TEST_CASE("the Engine's clipping inside the update equals clip_grad_norm then the step, eagerly and under jit", "[jit][step][optim]") {
  const double clip = 0.05;  // below every step's norm: the clipping is active throughout
  for (int use_jit = 0; use_jit < 2; ++use_jit) {
    INFO("jit " << use_jit);
    nn::MLP model({12, 16, 4}), twin({12, 16, 4});
    ParamTree params = model.parameters(), tp = twin.parameters();
    Mesh mesh = single_mesh();
    Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-2)),
                  EngineOptions{.grad_clip = clip, .jit = use_jit == 1});
    auto ref = optim::adamw(optim::constant(1e-2));
    for (int s = 0; s < 4; ++s) {
      const Batch b = batch_of(500 + uint64_t(s), Shape{16, 12}, 4);
      const StepResult r = engine.step(model, classification_loss, b);
      auto [l, g] = value_and_grad([&] { return classification_loss(twin, b); }, tp);
      const double norm = optim::clip_grad_norm(g, clip);
      ref->step(tp, g);
      INFO("step " << s);
      CHECK(r.grad_norm == norm);
      CHECK(r.grad_norm > clip);
      for (size_t i = 0; i < params.size(); ++i) {
        INFO(params[i].first);
        CHECK(params[i].second.to_vector<float>() == tp[i].second.to_vector<float>());
      }
    }
  }
  // The traced step clips and unscales without a pass per gradient: clipping adds the coefficient's few
  // scalar ops and one slice-and-concat of the update's scalars, loss scaling a few more scalar ops,
  // however many parameters there are (12 here).
  int launches[3];
  for (int v = 0; v < 3; ++v) {  // plain, clipped, clipped with a loss scale
    nn::MLP model({12, 16, 16, 16, 16, 16, 4});
    Mesh mesh = single_mesh();
    Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-2)),
                  EngineOptions{.grad_clip = v > 0 ? clip : 0, .loss_scale = v == 2 ? LossScaleOptions::fixed(1024) : LossScaleOptions::none()});
    launches[v] = jit::kernel_launches(engine.trace_step(model, classification_loss, batch_of(600, Shape{16, 12}, 4)));
  }
  INFO("kernel launches: plain " << launches[0] << ", clipped " << launches[1] << ", clipped and loss-scaled " << launches[2]);
  CHECK(launches[1] > launches[0]);
  CHECK(launches[1] - launches[0] <= 6);
  CHECK(launches[2] - launches[1] <= 6);
}

TEST_CASE("jit(step) follows the eager loss trajectory: MNIST-shaped MLP and CNN, GPT-small", "[jit][step]") {
  SECTION("MLP 784-64-10, AdamW with warm-up and clipping") {
    engine_parity([] { return std::make_unique<nn::MLP>(std::vector<int64_t>{784, 64, 10}); },
                  [](int s) { return batch_of(100 + uint64_t(s), Shape{32, 784}, 10); }, classification_loss, 8,
                  [] { return optim::adamw(optim::warmup_cosine(3e-3, 3, 8)); }, 1.0);
  }
  SECTION("MLP with SGD + Nesterov momentum") {
    engine_parity([] { return std::make_unique<nn::MLP>(std::vector<int64_t>{784, 32, 10}); },
                  [](int s) { return batch_of(200 + uint64_t(s), Shape{16, 784}, 10); }, classification_loss, 6,
                  [] { return optim::sgd(optim::cosine(0.05, 6), 0.9, 1e-4, true); }, 0.0);
  }
  SECTION("CNN on 28x28 images") {
    engine_parity([] { return std::make_unique<nn::CNN>(nn::CNNOptions{.hidden = 32, .channels = {4, 8}}); },
                  [](int s) { return batch_of(300 + uint64_t(s), Shape{8, 1, 28, 28}, 10); }, classification_loss, 5,
                  [] { return optim::adamw(optim::constant(1e-3)); }, 1.0);
  }
  SECTION("GPT (2 layers, dim 32) on random tokens") {
    const nn::GPTConfig cfg{.vocab = 64, .layers = 2, .heads = 2, .dim = 32, .seq_len = 16};
    auto tokens = [&](int s) {
      const RngKey k = RngKey::from_seed(400 + uint64_t(s));
      Tensor t = (random_uniform(k, Shape{4, cfg.seq_len + 1}, DType::f64) * double(cfg.vocab)).astype(DType::i64);
      return Batch{{{"x", t.slice(1, 0, cfg.seq_len).contiguous()}, {"y", t.slice(1, 1, cfg.seq_len + 1).contiguous()}}};
    };
    engine_parity([&] { return std::make_unique<nn::GPT>(cfg); }, tokens, nn::lm_loss, 6,
                  [] { return optim::adamw(optim::warmup_cosine(1e-3, 2, 6)); }, 1.0);
  }
}

TEST_CASE("dropout under jit: a new mask at every replay, the same masks as eager", "[jit][step]") {
  nn::MLP probe({6, 8, 3}, {.dropout = 0.1});
  CHECK(probe.stochastic());
  CHECK_FALSE(nn::MLP({6, 8, 3}).stochastic());
  // engine_parity: the same losses, norms and parameters as the eager steps, whose masks move with the
  // step (a mask fixed at trace time would leave the compiled run behind after the first step).
  engine_parity([] { return std::make_unique<nn::MLP>(std::vector<int64_t>{784, 64, 10}, nn::MLPOptions{.dropout = 0.3}); },
                [](int s) { return batch_of(300 + uint64_t(s), Shape{32, 784}, 10); }, classification_loss, 8,
                [] { return optim::adamw(optim::warmup_cosine(3e-3, 3, 8)); }, 1.0);
  // The masks do move: two replays on the same batch and weights (lr 0) give different losses.
  nn::MLP model({784, 64, 10}, {.dropout = 0.3});
  Mesh mesh = single_mesh();
  Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::sgd(optim::constant(0.0)), EngineOptions{.jit = true});
  const Batch b = batch_of(1, Shape{32, 784}, 10);
  const double l0 = engine.step(model, classification_loss, b).loss, l1 = engine.step(model, classification_loss, b).loss,
               l2 = engine.step(model, classification_loss, b).loss;
  CHECK(engine.jit_stats()->hits == 2);
  CHECK(l1 != l0);
  CHECK(l2 != l1);
}

TEST_CASE("jit refuses what a graph cannot replay, with TraceErrors that say why", "[jit][step]") {
  const Tensor x = testing::randn64(RngKey::from_seed(1), Shape{4});
  // A C++ branch on a traced value.
  auto branchy = [](const TensorList& in) {
    Tensor s = sum(in[0]);
    return TensorList{s.item() > 0 ? in[0] * 2.0 : in[0] * 3.0};
  };
  try {
    jit::trace(branchy, {x});
    FAIL("expected a TraceError");
  } catch (const TraceError& e) {
    CHECK_THAT(std::string(e.what()), Contains("reads a traced value on the host") && Contains("'sum'") && Contains("where()"));
  }
  // Writing into an input or a computed tensor.
  CHECK_THROWS_AS(jit::trace([](const TensorList& in) { Tensor a = in[0]; copy_(a, in[0] * 2.0); return TensorList{a}; }, {x}), TraceError);
  CHECK_THROWS_AS(jit::trace([](const TensorList& in) { Tensor y = exp(in[0]); fill_(y, 1.0); return TensorList{y}; }, {x}), TraceError);
  // Reading a constant on the host is fine: it is fixed.
  const Tensor c = scalar(2.0, DType::f64);
  jit::Graph g = jit::trace([&](const TensorList& in) { return TensorList{in[0] * c.item()}; }, {x});
  CHECK(g.run({x})[0].to_vector<double>() == (x * 2.0).to_vector<double>());
}

TEST_CASE("jit in-place writes: live state is updated at every replay, temporaries are not state", "[jit][step]") {
  Tensor counter = zeros(Shape{3}, DType::f64);  // made before the trace: every write to it is replayed
  auto f = [&](const TensorList& in) {
    Tensor tmp = zeros(Shape{3}, DType::f64);  // a temporary: filled, written, read
    copy_(tmp, in[0] * 2.0);
    copy_(counter, counter + tmp);
    return TensorList{counter * 1.0};
  };
  const Tensor x = from_vector(std::vector<double>{1, 2, 3}, Shape{3});
  jit::Graph g = jit::trace(f, {x});  // the trace ran once: counter = 2x
  CHECK(counter.to_vector<double>() == std::vector<double>{2, 4, 6});
  REQUIRE(g.updates.size() == 1);  // the temporary's writes are dropped
  CHECK(g.updates[0].target.same(counter));
  g.run({x});
  CHECK(counter.to_vector<double>() == std::vector<double>{4, 8, 12});
  const TensorList out = g.run({x});
  CHECK(out[0].to_vector<double>() == std::vector<double>{6, 12, 18});
  CHECK(counter.to_vector<double>() == std::vector<double>{6, 12, 18});
  // Folding never touches state: after the passes the value read is still the live one.
  jit::fold_constants(g);
  jit::eliminate_dead_code(g);
  g.run({x});
  CHECK(counter.to_vector<double>() == std::vector<double>{8, 16, 24});
}

namespace {
// x + 1 (f64), allowed to write its output into its input (Op::in_place_input): for update_in_place.
struct AddOneOp final : Op {
  const char* name() const override { return "add_one"; }
  std::vector<TensorSpec> infer(const TensorList& in) const override { return {{in[0].shape(), in[0].dtype(), in[0].device()}}; }
  void cpu(const TensorList& in, TensorList& out) const override {
    const Tensor x = in[0].contiguous();
    const double* a = x.data<double>();
    double* o = out[0].data<double>();
    for (int64_t i = 0; i < x.numel(); ++i) o[i] = a[i] + 1;
  }
  int in_place_input(size_t) const override { return 0; }
  bool differentiable() const override { return false; }
};

// Runs g from the state `start` (one tensor per update target) and returns its outputs followed by the
// targets' contents after the run.
std::vector<std::vector<double>> run_from(const jit::Graph& g, const std::vector<Tensor>& start, const TensorList& args) {
  for (size_t k = 0; k < g.updates.size(); ++k) {
    Tensor t = g.updates[k].target;
    copy_(t, start[k]);
  }
  std::vector<std::vector<double>> r;
  for (const auto& o : g.run(args)) r.push_back(o.to_vector<double>());
  for (const auto& u : g.updates) r.push_back(u.target.to_vector<double>());
  return r;
}
}  // namespace

TEST_CASE("jit update_in_place: an AdamW step updates weights and moments where they are, bitwise as with copies", "[jit][step]") {
  nn::MLP model({12, 16, 3});
  ParamTree params = model.parameters();
  auto opt = optim::adamw(optim::warmup_cosine(1e-2, 3, 20));
  auto step = [&](const TensorList& in) {
    auto [loss, grads] = value_and_grad([&] { return cross_entropy(model.forward(in[0]), in[1]); }, params);
    opt->step(params, grads);
    return TensorList{loss};
  };
  auto args = [](uint64_t s) {
    Batch b = batch_of(s, Shape{8, 12}, 3);
    return TensorList{b["x"], b["y"]};
  };
  jit::Graph copies = jit::trace(step, args(1));
  jit::optimize(copies);
  jit::Graph in_place = copies;
  // Every parameter, its two moments and the step count.
  CHECK(jit::update_in_place(in_place) == 3 * int(params.size()) + 1);
  CHECK(jit::update_in_place(copies) == 3 * int(params.size()) + 1);  // idempotent on a copy...
  for (auto& n : copies.nodes) n.in_place.clear();                  // ...then undone: the reference
  CHECK_THAT(in_place.str(), Contains("(in place: %"));
  for (uint64_t s = 2; s < 6; ++s) {
    std::vector<Tensor> start;
    for (const auto& u : copies.updates) start.push_back(u.target.detach().clone());
    const auto want = run_from(copies, start, args(s));
    const auto got = run_from(in_place, start, args(s));
    INFO("step " << s);
    CHECK(got == want);
  }
  // With the memory plan too (in-place outputs are not planned).
  jit::plan_memory_pass(in_place);
  std::vector<Tensor> start;
  for (const auto& u : copies.updates) start.push_back(u.target.detach().clone());
  CHECK(run_from(in_place, start, args(9)) == run_from(copies, start, args(9)));
}

TEST_CASE("jit update_in_place leaves a write alone where a later read, a view or an output would see it", "[jit][step]") {
  const OpPtr add_one = std::make_shared<AddOneOp>();
  const Tensor x = from_vector(std::vector<double>{1, 2, 3, 4}, Shape{2, 2});
  Tensor w = from_vector(std::vector<double>{10, 20, 30, 40}, Shape{2, 2});
  const std::vector<Tensor> start{w.detach().clone()};
  auto made = [&](const std::function<TensorList(const TensorList&)>& f) {
    copy_(w, start[0]);
    jit::Graph g = jit::trace(f, {x});
    jit::Graph ref = g;
    const int n = jit::update_in_place(g);
    CHECK(run_from(g, start, {x}) == run_from(ref, start, {x}));  // whatever the pass did, the same values
    return n;
  };
  // The plain case is made in place.
  CHECK(made([&](const TensorList& in) {
          copy_(w, apply1(add_one, {w}));
          return TensorList{in[0] * 1.0};
        }) == 1);
  // w read after the update's node (before the write-back): must see the old values.
  CHECK(made([&](const TensorList& in) {
          Tensor y = apply1(add_one, {w});
          Tensor z = w * in[0];
          copy_(w, y);
          return TensorList{z};
        }) == 0);
  // A view of w taken before the node and read after it.
  CHECK(made([&](const TensorList& in) {
          Tensor t = w.T();
          Tensor y = apply1(add_one, {w});
          Tensor z = t * in[0];
          copy_(w, y);
          return TensorList{z};
        }) == 0);
  // The updated value is also a graph output (it would alias the live state).
  CHECK(made([&](const TensorList&) {
          Tensor y = apply1(add_one, {w});
          copy_(w, y);
          return TensorList{y};
        }) == 0);
  // Another tensor over w's storage is read by the graph: left alone.
  const Tensor flat = w.reshape(Shape{4});
  CHECK(made([&](const TensorList& in) {
          Tensor z = flat * in[0].reshape(Shape{4});
          copy_(w, apply1(add_one, {w}));
          return TensorList{z};
        }) == 0);
}

TEST_CASE("jit static inputs: baked in as constants, a new value compiles a new graph", "[jit][step]") {
  int traced = 0;
  auto f = jit::jit(
      [&](const TensorList& in) {
        ++traced;
        const int64_t k = int64_t(in[1].item());  // allowed: a static input is a constant
        Tensor y = in[0];
        for (int64_t i = 0; i < k; ++i) y = y * 2.0;
        return TensorList{y};
      },
      {.static_inputs = {1}});
  const Tensor x = testing::randn64(RngKey::from_seed(3), Shape{5});
  const Tensor two = scalar(2, DType::i64), three = scalar(3, DType::i64);
  CHECK(f({x, two})[0].to_vector<double>() == (x * 4.0).to_vector<double>());
  CHECK(f({x, two})[0].to_vector<double>() == (x * 4.0).to_vector<double>());
  CHECK(traced == 1);
  CHECK(f({x, three})[0].to_vector<double>() == (x * 8.0).to_vector<double>());
  CHECK(traced == 2);
  CHECK(f.stats().misses == 2);
  CHECK(f.stats().hits == 1);
  REQUIRE(f.graph_for({x, two}) != nullptr);
  CHECK(f.graph_for({x, two})->inputs.size() == 1);  // the static input is not a graph input
  CHECK_THROWS_AS(jit::trace([](const TensorList& in) { return in; }, {x}, {4}), ValueError);
}
