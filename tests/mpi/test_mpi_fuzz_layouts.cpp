// Random parallel layouts against one rank: every rank draws the same layout from a shared seed (mesh
// axes in a random order with sizes multiplying to the world size, size-1 axes included; a GPT whose
// heads, width, vocabulary and layers fit it, with even or uneven pipeline splits; DP with gradient
// accumulation, TP, PP with either schedule and each recompute policy; AdamW or SGD with momentum,
// clipping on or off, gradient buckets of a few bytes to the default, eager or jit steps where the JIT
// takes the plan), trains a few steps in f64, and compares every step's loss and gradient norm and the
// final evaluation loss with the same model trained on this rank alone. FUZZ_SEED explores other draws.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <random>

#include "engine/engine.h"
#include "engine/gpt.h"
#include "mpi_util.h"

using namespace titanax;
using namespace mpitest;

namespace {

struct Draw {
  std::mt19937_64 g;
  int64_t pick(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g); }
  bool coin() { return pick(0, 1) == 1; }
  template <class T>
  const T& one_of(const std::vector<T>& v) { return v[size_t(pick(0, int64_t(v.size()) - 1))]; }
};

Tensor tokens(uint64_t seed, const Shape& s, int64_t n) {
  Tensor u = random_uniform(RngKey::from_seed(seed), s, DType::f64);
  std::vector<int64_t> v;
  for (double x : u.to_vector<double>()) v.push_back(std::min<int64_t>(n - 1, int64_t(x * double(n))));
  return from_vector(v, s);
}

// Sizes (d, t, p) for the data, model and pipe axes with d * t * p = n.
std::vector<std::array<int, 3>> factorisations(int n) {
  std::vector<std::array<int, 3>> f;
  for (int d = 1; d <= n; ++d)
    for (int t = 1; d * t <= n; ++t)
      if (n % (d * t) == 0) f.push_back({d, t, n / (d * t)});
  return f;
}

}  // namespace

TEST_CASE("random DP x TP x PP layouts train as one rank does: losses, gradient norms, evaluation", "[mpi][fuzz][gpt][engine]") {
  Draw z{std::mt19937_64(std::getenv("FUZZ_SEED") ? std::stoull(std::getenv("FUZZ_SEED")) : 5)};  // the same on every rank
  Mesh solo = MeshSpec{{"data"}, {1}}.build(make_local_communicator());
  const int n = world_size();
  std::map<std::string, int> seen;  // kinds of layout the draws covered
  for (int trial = 0; trial < 24; ++trial) {
    // The mesh: the used axes (size > 1, and sometimes a size-1 one) in a random order.
    const auto [d, t, p] = z.one_of(factorisations(n));
    std::vector<std::pair<std::string, int>> axes;
    for (auto [name, size] : {std::pair{"data", d}, std::pair{"model", t}, std::pair{"pipe", p}})
      if (size > 1 || z.pick(0, 3) == 0) axes.push_back({name, size});
    if (axes.empty()) axes.push_back({"data", 1});
    std::shuffle(axes.begin(), axes.end(), z.g);
    std::vector<std::string> names;
    std::vector<int> shape;
    for (auto& [a, s] : axes) names.push_back(a), shape.push_back(s);
    auto has = [&](const char* a) { return std::find(names.begin(), names.end(), a) != names.end(); };

    // The model: sizes that divide over the layout.
    nn::GPTConfig cfg;
    cfg.dtype = DType::f64;
    cfg.heads = t * z.pick(1, 2);
    cfg.dim = cfg.heads * z.one_of(std::vector<int64_t>{2, 4});
    cfg.vocab = t * z.pick(3, 10);
    cfg.seq_len = z.pick(3, 6);
    cfg.layers = p * z.pick(1, 2) + (p > 1 ? z.pick(0, 1) : 0);
    if (p > 1 && (cfg.layers % p != 0 || z.coin())) {  // uneven stages: S - 1 ascending boundaries in (0, L)
      std::vector<int64_t> cut;
      for (int64_t i = 1; i < cfg.layers; ++i) cut.push_back(i);
      std::shuffle(cut.begin(), cut.end(), z.g);
      cut.resize(size_t(p - 1));
      std::sort(cut.begin(), cut.end());
      cfg.pp_boundaries = cut;
    }
    nn::GPTConfig whole_cfg = cfg;
    cfg.tp_axis = has("model") ? "model" : "";
    cfg.pp_axis = has("pipe") ? "pipe" : "";
    whole_cfg.tp_axis = "";
    whole_cfg.pp_axis = "";
    whole_cfg.pp_boundaries = {};

    // The plan, the batch that splits over it, the optimizer and the engine's options.
    Plan plan;
    int64_t per_rank_split = 1;  // microbatches or accumulation steps of each DP rank's rows
    if (has("data")) plan.dp = DP{"data", has("pipe") ? 1 : int(z.pick(1, 2))};
    if (has("model")) plan.tp = TP{"model"};
    if (has("pipe")) {
      PP pp{.axis = "pipe"};
      pp.schedule = z.coin() ? PipelineSchedule::gpipe : PipelineSchedule::one_f_one_b;
      pp.microbatches = int(pp.schedule == PipelineSchedule::one_f_one_b ? p + z.pick(0, 2) : z.pick(1, 4));
      pp.recompute = z.one_of(std::vector<Recompute>{Recompute::none, Recompute::full, Recompute::layers});
      pp.recompute_layers = int(z.pick(1, 2));
      plan.pp = pp;
      per_rank_split = pp.microbatches;
    } else if (plan.dp) {
      per_rank_split = plan.dp->accumulate_steps;
    }
    const int64_t B = d * per_rank_split * z.pick(1, 2), T = z.pick(2, cfg.seq_len);
    const double clip = z.coin() ? 0.0 : 0.05;
    const bool adam = z.coin();
    auto optimizer = [&] {
      return adam ? optim::adamw(optim::warmup_cosine(1e-2, 2, 6, 0.1), {.weight_decay = 0.1})
                  : optim::sgd(optim::constant(0.05), 0.9);
    };
    EngineOptions opts{.grad_clip = clip};
    opts.bucket_bytes = size_t(z.one_of(std::vector<int64_t>{64, 1000, 25 << 20}));
    opts.jit = !plan.pp && z.coin();
    ++seen[t > 1 ? "tensor parallel" : "no tensor parallel"];
    ++seen[d > 1 ? "data parallel" : "no data parallel"];
    if (plan.pp) {
      ++seen[std::string("pipeline ") + schedule_name(plan.pp->schedule)];
      ++seen[std::string("recompute ") + recompute_name(plan.pp->recompute)];
      if (!cfg.pp_boundaries.empty()) ++seen["uneven stages"];
    }
    if (plan.dp && plan.dp->accumulate_steps > 1) ++seen[opts.jit ? "accumulation under jit" : "accumulation"];
    if (opts.jit) ++seen["jit"];

    const MeshCase mc{names, shape};
    INFO("trial " << trial << ": mesh " << mc.name() << ", GPT vocab " << cfg.vocab << " layers " << cfg.layers << " heads " << cfg.heads
                  << " dim " << cfg.dim << " boundaries " << cfg.pp_boundaries.size() << ", B " << B << " T " << T << "\n"
                  << plan.describe() << (adam ? "AdamW" : "SGD momentum") << ", clip " << clip << ", buckets " << opts.bucket_bytes
                  << " bytes" << (opts.jit ? ", jit" : ""));
    Mesh mesh = MeshSpec{names, shape}.build(rt());
    nn::GPT whole(whole_cfg), split(cfg, mesh);
    Engine ref(solo, Plan{}, optimizer(), {.grad_clip = clip});
    Engine eng(mesh, plan, optimizer(), opts);
    if (p > 1) {  // this stage holds the blocks the boundaries give it (the even split without them)
      std::vector<int64_t> first{0};
      for (int k = 1; k < p; ++k) first.push_back(cfg.pp_boundaries.empty() ? cfg.layers * k / p : cfg.pp_boundaries[size_t(k - 1)]);
      first.push_back(cfg.layers);
      const int stage = split.pipeline_stage();
      CHECK(split.first_layer() == first[size_t(stage)]);
      for (int64_t i = 0; i < cfg.layers; ++i) {
        const bool here = i >= first[size_t(stage)] && i < first[size_t(stage) + 1];
        CHECK(split.parameters().contains("blocks/" + std::to_string(i) + "/mlp/fc/weight") == here);
      }
    }
    const int64_t dp_i = has("data") ? mesh.axis_index("data") : 0;
    for (int s = 0; s < 4; ++s) {
      const Batch g{{{"x", tokens(100 + uint64_t(s), Shape{B, T}, cfg.vocab)}, {"y", tokens(200 + uint64_t(s), Shape{B, T}, cfg.vocab)}}};
      const StepResult a = ref.step(whole, nn::lm_loss, g);
      const StepResult b = eng.step(split, nn::lm_loss, g.slice(B * dp_i / d, B * (dp_i + 1) / d));
      INFO("step " << s << ": loss " << a.loss << " vs " << b.loss << ", gradient norm " << a.grad_norm << " vs " << b.grad_norm);
      CHECK(b.loss == Approx(a.loss).epsilon(1e-9));
      CHECK(b.grad_norm == Approx(a.grad_norm).epsilon(1e-9));
    }
    auto val = std::make_shared<TensorDataset>(std::map<std::string, Tensor>{
        {"x", tokens(7, Shape{2 * d, T}, cfg.vocab)}, {"y", tokens(8, Shape{2 * d, T}, cfg.vocab)}});
    const EvalSpec es{.data = val, .batch_size = 2, .fn = nn::lm_metrics};
    CHECK(eng.evaluate(split, es).at("eval/loss") == Approx(ref.evaluate(whole, es).at("eval/loss")).epsilon(1e-9));
  }
  if (n > 1 && !std::getenv("FUZZ_SEED")) {  // the fixed draws cover every kind of layout
    std::string kinds;
    for (const auto& [k, c] : seen) kinds += k + ": " + std::to_string(c) + "\n";
    INFO(kinds);
    for (const char* k : {"tensor parallel", "no tensor parallel", "data parallel", "no data parallel", "pipeline 1f1b", "pipeline gpipe",
                          "recompute none", "recompute full", "recompute layers", "uneven stages", "accumulation", "accumulation under jit", "jit"})
      CHECK(seen[k] > 0);
  }
}
