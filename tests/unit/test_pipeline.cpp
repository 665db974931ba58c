// parallel/pipeline.h, Plan{PP}, autodiff checkpoint() and GPT's stage interface on one rank: the 1F1B
// and GPipe orders and timelines against hand-written tables, plan validation, activation
// recomputation against plain backward (values, gradients and memory), and one-stage pipelined steps
// against value_and_grad of the mean microbatch loss. Multi-stage runs are in tests/mpi.
#include <catch2/catch.hpp>

#include "test_util.h"

#include <sstream>

#include "autodiff/autodiff.h"
#include "core/allocator.h"
#include "engine/engine.h"
#include "engine/gpt.h"
#include "jit/graph.h"
#include "fuzz_program.h"
#include "op_cases.h"
#include "parallel/pipeline.h"

using namespace titanax;
using Catch::Matchers::Contains;
using testing::catch_error;

namespace {

Mesh local_mesh(std::vector<std::string> axes, std::vector<int> shape) {
  return MeshSpec{std::move(axes), std::move(shape)}.build(make_local_communicator());
}

std::string joined(const std::vector<PipelineAction>& a) {
  std::string s;
  for (const auto& x : a) s += (s.empty() ? "" : " ") + x.str();
  return s;
}

// The timeline's grid as one line per stage ("F0 . B0 ...").
std::vector<std::string> rows(const PipelineTimeline& tl) {
  std::vector<std::string> out;
  for (const auto& r : tl.grid) {
    std::string s;
    for (const auto& c : r) s += (s.empty() ? "" : " ") + (c ? c->str() : std::string("."));
    out.push_back(s);
  }
  return out;
}

nn::GPTConfig tiny(DType dt = DType::f64) {
  nn::GPTConfig c;
  c.vocab = 16;
  c.layers = 4;
  c.heads = 2;
  c.dim = 8;
  c.seq_len = 6;
  c.dtype = dt;
  return c;
}

Batch lm_batch(uint64_t seed, int64_t B, int64_t T, int64_t vocab) {
  Batch b;
  b.items["x"] = testing::randint(RngKey::from_seed(seed), Shape{B, T}, vocab);
  b.items["y"] = testing::randint(RngKey::from_seed(seed + 1), Shape{B, T}, vocab);
  return b;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  auto x = a.astype(DType::f64).contiguous().to_vector<double>(), y = b.astype(DType::f64).contiguous().to_vector<double>();
  REQUIRE(x.size() == y.size());
  double m = 0;
  for (size_t i = 0; i < x.size(); ++i) m = std::max(m, std::abs(x[i] - y[i]));
  return m;
}

}  // namespace

TEST_CASE("pipeline: 1F1B order and timeline for S=4, M=8 match the hand-written table") {
  using S = PipelineSchedule;
  // Warm-up of S - s - 1 forwards, then one forward / one backward, then the cool-down backwards.
  CHECK(joined(pipeline_actions(S::one_f_one_b, 4, 0, 8)) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7");
  CHECK(joined(pipeline_actions(S::one_f_one_b, 4, 1, 8)) == "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7");
  CHECK(joined(pipeline_actions(S::one_f_one_b, 4, 2, 8)) == "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7");
  CHECK(joined(pipeline_actions(S::one_f_one_b, 4, 3, 8)) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7");

  // Unit-time ticks: 2 (M + S - 1) = 22 of them, 6 idle per stage (the bubble: 24 / 88 = 3 / 11).
  const PipelineTimeline tl = pipeline_timeline(S::one_f_one_b, 4, 8);
  const std::vector<std::string> want{
      "F0 F1 F2 F3 . . . B0 F4 B1 F5 B2 F6 B3 F7 B4 . B5 . B6 . B7",
      ". F0 F1 F2 . . B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 . B6 . B7 .",
      ". . F0 F1 . B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 . B7 . .",
      ". . . F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 . . .",
  };
  CHECK(rows(tl) == want);
  CHECK(tl.ticks() == 22);
  CHECK(tl.bubble_fraction() == Approx(3.0 / 11.0));
  CHECK(ideal_bubble_fraction(4, 8) == Approx(3.0 / 11.0));

  // Stage s holds at most S - s microbatches' activations.
  for (int s = 0; s < 4; ++s) CHECK(peak_in_flight(pipeline_actions(S::one_f_one_b, 4, s, 8)) == 4 - s);
  // The printed table: a header of ticks, then one row per stage.
  std::istringstream lines(tl.str());
  std::string header, row0;
  std::getline(lines, header);
  std::getline(lines, row0);
  CHECK_THAT(header, Contains("tick") && Contains("21"));
  CHECK_THAT(row0, Contains("stage 0") && Contains("F3 .  .  .  B0"));
}

TEST_CASE("pipeline: GPipe runs every forward, then every backward") {
  using S = PipelineSchedule;
  CHECK(joined(pipeline_actions(S::gpipe, 2, 0, 3)) == "F0 F1 F2 B0 B1 B2");
  CHECK(joined(pipeline_actions(S::gpipe, 2, 1, 3)) == "F0 F1 F2 B0 B1 B2");
  const PipelineTimeline tl = pipeline_timeline(S::gpipe, 2, 3);
  CHECK(rows(tl) == std::vector<std::string>{"F0 F1 F2 . . B0 B1 B2", ". F0 F1 F2 B0 B1 B2 ."});
  CHECK(tl.bubble_fraction() == Approx(0.25));
  CHECK(peak_in_flight(pipeline_actions(S::gpipe, 4, 0, 8)) == 8);
  // One stage: no bubble.
  CHECK(pipeline_timeline(S::one_f_one_b, 1, 4).bubble_fraction() == 0.0);

  CHECK_THROWS_AS(pipeline_actions(S::gpipe, 2, 2, 4), PlanError);
  CHECK_THROWS_AS(pipeline_actions(S::gpipe, 0, 0, 4), PlanError);
  CHECK_THROWS_AS(pipeline_timeline(S::one_f_one_b, 2, 0), PlanError);
}

TEST_CASE("plan: PP validation names the problem") {
  const std::vector<std::string> axes{"data", "pipe", "model"};
  const std::vector<int> shape{1, 4, 1};
  CHECK_NOTHROW(Plan{.dp = DP{"data"}, .tp = TP{"model"}, .pp = PP{"pipe", 4}}.validate(axes, shape));
  auto e = catch_error<PlanError>([&] { Plan{.pp = PP{"pipe", 2}}.validate(axes, shape); });
  CHECK_THAT(e.message(), Contains("1F1B needs at least as many microbatches as stages"));
  CHECK_THAT(e.expected(), Contains(">= 4"));
  CHECK_NOTHROW(Plan{.pp = PP{"pipe", 2, PipelineSchedule::gpipe}}.validate(axes, shape));  // GPipe: any M
  CHECK_NOTHROW(Plan{.pp = PP{"pipe", 2}}.validate(axes));                                    // sizes unknown
  e = catch_error<PlanError>([&] { Plan{.pp = PP{"pipes", 4}}.validate(axes, shape); });
  CHECK_THAT(e.message(), Contains("did you mean 'pipe'"));
  e = catch_error<PlanError>([&] { Plan{.tp = TP{"pipe"}, .pp = PP{"pipe", 4}}.validate(axes, shape); });
  CHECK_THAT(e.message(), Contains("TP uses"));
  e = catch_error<PlanError>([&] { Plan{.dp = DP{"data", 2}, .pp = PP{"pipe", 4}}.validate(axes, shape); });
  CHECK_THAT(e.message(), Contains("accumulate_steps"));
  e = catch_error<PlanError>([&] { Plan{.pp = PP{"pipe", 0}}.validate(axes, shape); });
  CHECK_THAT(e.expected(), Contains("1 <= microbatches"));
  e = catch_error<PlanError>([&] {
    Plan{.pp = PP{.axis = "pipe", .microbatches = 4, .recompute = Recompute::layers, .recompute_layers = 0}}.validate(axes, shape);
  });
  CHECK_THAT(e.message(), Contains("recompute_layers"));
  CHECK(parse_schedule("gpipe") == PipelineSchedule::gpipe);
  CHECK_THAT(catch_error<PlanError>([] { parse_schedule("1fb1"); }).message(), Contains("unknown pipeline schedule"));
  CHECK_THAT(catch_error<PlanError>([] { parse_recompute("ful"); }).suggestion(), Contains("full"));
  const Plan p{.pp = PP{"pipe", 8, PipelineSchedule::gpipe, Recompute::full}};
  CHECK_THAT(p.describe(), Contains("pipeline parallel: axis 'pipe', 8 microbatches, schedule gpipe, recompute full"));
  CHECK_THAT(p.to_json(), Contains("\"schedule\":\"gpipe\""));
}

TEST_CASE("checkpoint(): same value and gradients as recording (to second order), less memory held") {
  const RngKey k = RngKey::from_seed(3);
  Tensor w = testing::randn64(fold_in(k, 1), Shape{64, 64}, 0.2), x = testing::randn64(fold_in(k, 2), Shape{32, 64});
  auto f = [&](const Tensor& in) {
    Tensor h = in;
    for (int i = 0; i < 4; ++i) h = tanh(matmul(h, w));
    return h;
  };
  auto run = [&](bool ckpt) {
    Tensor wl = w, xl = x.clone();
    wl.set_requires_grad(true);
    xl.set_requires_grad(true);
    Allocator& a = allocator_for(Device::cpu());
    const int64_t before = a.stats().current_bytes;
    Tensor y = ckpt ? checkpoint(f, xl, {wl}) : f(xl);
    const int64_t held = a.stats().current_bytes - before;  // y plus what the tape keeps for backward
    Tensor loss = sum(y * y);
    TensorList g = grad(loss, {xl, wl});
    wl.set_requires_grad(false);
    return std::make_tuple(loss.item(), g[0], g[1], held);
  };
  auto [l0, gx0, gw0, held0] = run(false);
  auto [l1, gx1, gw1, held1] = run(true);
  CHECK(l1 == l0);
  CHECK(max_abs_diff(gx1, gx0) == 0.0);
  CHECK(max_abs_diff(gw1, gw0) <= 1e-12);
  // Recording keeps the four intermediates (32 x 64 f64 = 16 KiB each) and more; checkpoint only y.
  CHECK(held1 <= 32 * 64 * 8 + 4096);
  CHECK(held0 >= 4 * 32 * 64 * 8);

  // Gradients through checkpoint() against finite differences.
  auto gc = gradcheck([&](const TensorList& in) {
    return checkpoint([&](const Tensor& t) { return tanh(matmul(t, in[1])); }, in[0], {in[1]});
  }, {testing::randn64(fold_in(k, 3), Shape{3, 4}), testing::randn64(fold_in(k, 4), Shape{4, 5})});
  CHECK(gc.ok);

  // Second derivatives through a checkpoint whose parameter is also used before it (w shared: the
  // recomputation must hold the checkpoint's input fixed when it differentiates with respect to w, or
  // w's path through the input counts twice): finite differences of the gradient, and the same values
  // as recording.
  auto shared = [&](const TensorList& in, bool ckpt) {
    const Tensor h = tanh(matmul(in[0], in[1]));
    auto block = [&](const Tensor& t) { return tanh(matmul(t, in[1])) * t; };
    return ckpt ? checkpoint(block, h, {in[1]}) : block(h);
  };
  const TensorList in{testing::randn64(fold_in(k, 5), Shape{3, 4}), testing::randn64(fold_in(k, 6), Shape{4, 4}, 0.5)};
  for (bool ckpt : {true, false}) {
    INFO("checkpoint " << ckpt);
    const Tensor cot = testing::randn64(fold_in(k, 7), Shape{3, 4});
    const TensorList w{testing::randn64(fold_in(k, 8), Shape{3, 4}), testing::randn64(fold_in(k, 9), Shape{4, 4})};
    // <d/da sum(shared(a) * cot), w>: its gradient is a Hessian-vector product
    const auto g = testing::fuzz::gradient_functional([&](const TensorList& a) { return shared(a, ckpt); }, cot, w);
    const GradcheckResult r = gradcheck(g, in);
    INFO(r.report);
    CHECK(r.ok);
  }
  const TensorList hv_ckpt = hvp([&](const TensorList& a) { return sum(square(shared(a, true))); }, in, in).second;
  const TensorList hv_rec = hvp([&](const TensorList& a) { return sum(square(shared(a, false))); }, in, in).second;
  CHECK(max_abs_diff(hv_ckpt[0], hv_rec[0]) <= 1e-12);
  CHECK(max_abs_diff(hv_ckpt[1], hv_rec[1]) <= 1e-12);
}

TEST_CASE("checkpoint() under jit: replays read the replay's parameters, not the trace's", "[jit]") {
  // Found by the control-flow fuzz: the checkpoint node read its params through the function's closure,
  // so a replay computed with the tensors of the trace. Under a trace the function is now inline.
  const RngKey k = RngKey::from_seed(8);
  auto value_and_grads = [](const TensorList& in) {
    const Tensor x = in[0].detach().set_requires_grad(), w = in[1].detach().set_requires_grad();
    const Tensor y = sum(checkpoint([&](const Tensor& t) { return tanh(matmul(t, w)); }, x, {w}));
    TensorList g = grad(y, {x, w});
    g.insert(g.begin(), y.detach());
    return g;
  };
  auto compiled = jit::jit(value_and_grads);
  for (uint64_t s = 0; s < 3; ++s) {  // the trace, then replays on other values
    const TensorList in{testing::randn64(fold_in(k, 2 * s), Shape{3, 4}), testing::randn64(fold_in(k, 2 * s + 1), Shape{4, 5})};
    const TensorList got = compiled(in), want = value_and_grads(in);
    REQUIRE(got.size() == want.size());
    for (size_t i = 0; i < got.size(); ++i) CHECK(max_abs_diff(got[i], want[i]) <= 1e-12);
  }
}

TEST_CASE("pipeline: a one-stage pipelined step equals value_and_grad of the mean microbatch loss") {
  Mesh mesh = local_mesh({"pipe"}, {1});
  nn::GPTConfig cfg = tiny();
  cfg.pp_axis = "pipe";
  cfg.tp_axis = "";
  nn::GPT model(cfg, mesh);
  const Batch batch = lm_batch(7, 4, 6, cfg.vocab);
  ParamTree params = model.parameters();
  // Reference: mean of the 4 microbatch losses, one tape.
  auto [ref_loss, ref_grads] = value_and_grad([&] {
    Tensor l = scalar(0.0, DType::f64);
    for (int i = 0; i < 4; ++i) l = add(l, model.loss(batch.slice(i, i + 1)["x"], batch.slice(i, i + 1)["y"]));
    return l * 0.25;
  }, params);
  TensorList tensors;
  for (const auto& [p, t] : params) tensors.push_back(t);
  for (auto sched : {PipelineSchedule::one_f_one_b, PipelineSchedule::gpipe})
    for (auto [rc, k] : {std::pair{Recompute::none, 0}, {Recompute::full, 0}, {Recompute::layers, 1}, {Recompute::layers, 3}}) {
      INFO("schedule " << schedule_name(sched) << ", recompute " << recompute_name(rc) << " " << k);
      const PP pp{.axis = "pipe", .microbatches = 4, .schedule = sched, .recompute = rc, .recompute_layers = k};
      model.set_recompute_layers(rc == Recompute::layers ? k : 0);
      std::vector<Batch> mbs;
      for (int i = 0; i < 4; ++i) mbs.push_back(batch.slice(i, i + 1));
      TensorList reported(params.size());
      int reports = 0;
      PipelineResult r = run_pipeline(mesh.comm("pipe"), pp, tensors, {
          .forward = [&](int i, const Tensor& in) { return model.stage_forward(in, mbs[size_t(i)], Reduction::mean); },
          .input_spec = [&](int i) { return model.stage_input_spec(mbs[size_t(i)]); },
          .on_grad_ready = [&](size_t p, const Tensor& g) {
            ++reports;
            reported.at(p) = g.clone();
          }});
      CHECK(r.loss == Approx(ref_loss.item()).epsilon(1e-14));
      CHECK(reports == int(params.size()));  // once each, in the last backward
      for (size_t p = 0; p < params.size(); ++p) {
        INFO(params[p].first);
        CHECK(max_abs_diff(r.grads[p], ref_grads[p].second) <= 1e-12);
        CHECK(max_abs_diff(reported[p], r.grads[p]) == 0.0);  // the whole sum over the microbatches
      }
      CHECK(r.stats.peak_in_flight == (sched == PipelineSchedule::gpipe ? 4 : 1));
      for (const auto& [p, t] : params) CHECK_FALSE(t.requires_grad());  // flags restored
    }
  model.set_recompute_layers(0);
}

TEST_CASE("pipeline: the Engine's clipped step equals clip_grad_norm and AdamW on the mean microbatch loss") {
  Mesh mesh = local_mesh({"pipe"}, {1});
  nn::GPTConfig cfg = tiny();
  cfg.pp_axis = "pipe";
  cfg.tp_axis = "";
  nn::GPT model(cfg, mesh), twin(cfg, mesh);
  ParamTree params = model.parameters(), tp = twin.parameters();
  const double clip = 0.05;  // below every step's norm
  Engine eng(mesh, Plan{.pp = PP{"pipe", 4}}, optim::adamw(optim::constant(1e-2)), {.grad_clip = clip});
  auto ref = optim::adamw(optim::constant(1e-2));
  for (int s = 0; s < 3; ++s) {
    INFO("step " << s);
    const Batch batch = lm_batch(20 + uint64_t(s), 4, 6, cfg.vocab);
    const StepResult r = eng.step(model, nn::lm_loss, batch);
    auto [l, g] = value_and_grad([&] {
      Tensor t = scalar(0.0, DType::f64);
      for (int i = 0; i < 4; ++i) t = add(t, twin.loss(batch.slice(i, i + 1)["x"], batch.slice(i, i + 1)["y"]));
      return t * 0.25;
    }, tp);
    const double norm = optim::clip_grad_norm(g, clip);
    ref->step(tp, g);
    CHECK(r.grad_norm == Approx(norm).epsilon(1e-12));
    CHECK(norm > clip);
    for (size_t p = 0; p < params.size(); ++p) {
      INFO(params[p].first);
      CHECK(max_abs_diff(params[p].second, tp[p].second) <= 1e-12);
    }
  }
}

TEST_CASE("GPT stages: layout, errors, and the whole-model calls refused on a stage") {
  nn::GPTConfig cfg = tiny(DType::f32);
  cfg.layers = 3;
  auto e = catch_error<PlanError>([&] { nn::GPT::check_pipeline(cfg, 2, "pipe"); });
  CHECK_THAT(e.message(), Contains("layers (3) do not divide into the 2 pipeline stages"));
  cfg.pp_boundaries = {2};  // an uneven split is fine: blocks 0-1 and 2
  CHECK(nn::GPT::check_pipeline(cfg, 2, "pipe") == std::vector<int>{0, 0, 1});
  cfg.pp_boundaries = {3};
  CHECK_THROWS_AS(nn::GPT::check_pipeline(cfg, 2, "pipe"), PlanError);  // stage 1 would be empty
  cfg.pp_boundaries = {};
  cfg.layers = 4;
  CHECK(nn::GPT::check_pipeline(cfg, 2, "pipe") == std::vector<int>{0, 0, 1, 1});
  cfg.pp_axis = "pipes";
  e = catch_error<PlanError>([&] { nn::GPT(cfg, local_mesh({"data", "pipe", "model"}, {1, 1, 1})); });
  CHECK_THAT(e.message(), Contains("pipeline axis 'pipes' is not in the mesh; did you mean 'pipe'"));
  cfg.pp_axis = "pipe";
  nn::GPT one(cfg, local_mesh({"data", "pipe", "model"}, {1, 1, 1}));
  CHECK(one.pipeline_stages() == 1);
  CHECK(one.tied_parameters().empty());
  CHECK(one.parameters().size() == nn::GPT(tiny(DType::f32)).parameters().size());
  // One stage = the whole model: stage_forward on the last (only) stage is the loss.
  const Batch b = lm_batch(1, 2, 6, cfg.vocab);
  CHECK(one.stage_forward({}, b, Reduction::mean).item() == one.loss(b["x"], b["y"]).item());
  CHECK(one.stage_input_spec(b).shape == Shape{2, 6, 8});

  // An engine with a PP plan needs a model that splits into stages.
  Mesh mesh = local_mesh({"pipe"}, {1});
  Engine eng(mesh, Plan{.pp = PP{"pipe", 1}}, optim::sgd(optim::constant(0.1)));
  nn::MLP mlp({4, 3});
  Batch mb;
  mb.items["x"] = zeros(Shape{2, 4});
  mb.items["y"] = zeros(Shape{2}, DType::i64);
  e = catch_error<PlanError>([&] { eng.step(mlp, classification_loss, mb); });
  CHECK_THAT(e.message(), Contains("cannot run as pipeline stages"));
}

TEST_CASE("stages by layer index or by parameter-path filters") {
  using nn::StageSplit;
  // Six layers: Linear, ReLU (no parameters), Linear, ReLU, Linear, Linear.
  const std::vector<std::vector<std::string>> L{{"layers/0/weight", "layers/0/bias"}, {}, {"layers/2/weight"}, {},
                                                {"layers/4/weight"}, {"layers/5/weight"}};
  CHECK(nn::assign_stages(L, 2, {}) == std::vector<int>{0, 0, 0, 1, 1, 1});                 // even
  CHECK(nn::assign_stages(L, 3, {}) == std::vector<int>{0, 0, 1, 1, 2, 2});
  CHECK(nn::assign_stages(L, 2, StageSplit{.boundaries = {4}}) == std::vector<int>{0, 0, 0, 0, 1, 1});
  CHECK(nn::assign_stages(L, 3, StageSplit{.boundaries = {1, 5}}) == std::vector<int>{0, 1, 1, 1, 1, 2});
  const StageSplit by_path{.path_filters = {{"layers/0/**", "layers/2/**"}, {"layers/4/*", "layers/5/*"}}};
  CHECK(nn::assign_stages(L, 2, by_path) == std::vector<int>{0, 0, 0, 0, 1, 1});  // ReLUs follow the layer before

  auto e = catch_error<PlanError>([&] { nn::assign_stages(L, 2, StageSplit{.boundaries = {0}}); });
  CHECK_THAT(e.expected(), Contains("strictly ascending layer indices in (0, 6)"));
  e = catch_error<PlanError>([&] { nn::assign_stages(L, 2, StageSplit{.path_filters = {{"layers/0/**"}, {"layers/4/*"}}}); });
  CHECK_THAT(e.message(), Contains("no stage's path filter matches layer 2"));
  e = catch_error<PlanError>([&] { nn::assign_stages(L, 2, StageSplit{.path_filters = {{"**/weight"}, {"layers/5/*"}}}); });
  CHECK_THAT(e.message(), Contains("both match layer 5"));
  e = catch_error<PlanError>([&] {
    nn::assign_stages(L, 2, StageSplit{.path_filters = {{"layers/0/**", "layers/5/*"}, {"layers/2/*", "layers/4/*"}}});
  });
  CHECK_THAT(e.message(), Contains("layer 5 is on stage 0, before the stage 1"));
  e = catch_error<PlanError>([&] { nn::assign_stages(L, 7, {}); });
  CHECK_THAT(e.message(), Contains("fewer layers than pipeline stages"));
  e = catch_error<PlanError>([&] {
    nn::assign_stages(L, 2, StageSplit{.path_filters = {{"layers/*/**"}, {"nothing"}}});
  });
  CHECK_THAT(e.message(), Contains("stage 1 gets no layer"));
}

TEST_CASE("PipelineSequential on one stage: the layers then the loss, recompute refused with dropout") {
  Mesh mesh = local_mesh({"pipe"}, {1});
  auto linear = [](int64_t i, int64_t o) { return [=] { return std::make_shared<nn::Linear>(i, o, true, DType::f64); }; };
  auto stack = [&](std::vector<nn::PipelineSequential::Factory> f) {
    return nn::PipelineSequential(
        std::move(f), mesh, "pipe", {},
        [](const Tensor& out, const Batch& mb, Reduction r) { return cross_entropy(out, mb["y"], r); },
        [](int, const Batch& mb) { return TensorSpec{Shape{mb.size(), 8}, DType::f64, Device::cpu()}; });
  };
  nn::PipelineSequential net = stack({linear(4, 8), [] { return std::make_shared<nn::ReLU>(); }, linear(8, 3)});
  CHECK(net.parameters().paths() == std::vector<std::string>{"layers/0/weight", "layers/0/bias", "layers/2/weight", "layers/2/bias"});
  Batch b;
  b.items["x"] = testing::randn64(RngKey::from_seed(1), Shape{5, 4});
  b.items["y"] = testing::randint(RngKey::from_seed(2), Shape{5}, 3);
  CHECK(net.stage_forward({}, b, Reduction::mean).item() == cross_entropy(net(b["x"]), b["y"]).item());

  nn::PipelineSequential noisy = stack({linear(4, 8), [] { return std::make_shared<nn::Dropout>(0.5); }, linear(8, 3)});
  Engine eng(mesh, Plan{.pp = PP{.axis = "pipe", .microbatches = 1, .recompute = Recompute::full}}, optim::sgd(optim::constant(0.1)));
  auto e = catch_error<PlanError>([&] { eng.step(noisy, nn::lm_loss, b); });
  CHECK_THAT(e.message(), Contains("activation recomputation of a model that draws randomness"));
}

TEST_CASE("isend / irecv on one rank: the mailbox") {
  auto c = make_local_communicator();
  Tensor a = from_vector(std::vector<double>{1, 2, 3}, Shape{3}), b = zeros(Shape{3}, DType::f64);
  auto rq = c->irecv(b, 0, 4);
  c->isend(a, 0, 4)->wait();
  rq->wait();  // receives in wait(): the message is there
  CHECK(b.to_vector<double>() == std::vector<double>{1, 2, 3});
  Tensor none = zeros(Shape{3}, DType::f64);
  CHECK_THROWS_AS(c->irecv(none, 0, 9)->wait(), CollectiveError);  // nothing sent: would block forever
  CHECK_THROWS_AS(c->isend(a, 1, 0), CollectiveError);                // no rank 1
}
