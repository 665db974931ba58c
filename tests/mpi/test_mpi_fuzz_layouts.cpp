// Random parallel layouts against one rank. Every rank draws the same layouts from a shared seed: mesh
// axes in a random order with sizes multiplying to the world size (size-1 axes included); DP with
// gradient accumulation, TP, PP with either schedule, each recompute policy and even or uneven stage
// boundaries; gradient buckets of a few bytes to the default; eager or jit steps where the JIT takes
// the plan; the optimizer state sharded over the data axis or not (ZeRO-1). A GPT whose
// heads, width, vocabulary and layers fit the layouts (its loss head chunked or not, against an unchunked
// reference) trains a few steps in f64
// with AdamW or SGD with momentum, clipping on or off, and every step's loss and gradient norm and the
// final evaluation loss are compared with the same model trained on this rank alone. The second test
// saves under one layout and resumes under another. FUZZ_SEED explores other draws.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <numeric>
#include <random>

#include "engine/engine.h"
#include "engine/gpt.h"
#include "io/checkpoint.h"
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

uint64_t seed_or(uint64_t fixed) { return std::getenv("FUZZ_SEED") ? std::stoull(std::getenv("FUZZ_SEED")) : fixed; }

Batch batch(int step, int64_t B, int64_t T, int64_t vocab) {
  return Batch{{{"x", tokens(100 + uint64_t(step), Shape{B, T}, vocab)}, {"y", tokens(200 + uint64_t(step), Shape{B, T}, vocab)}}};
}

// A mesh, plan and engine options over the world's ranks.
struct Layout {
  std::vector<std::string> names;
  std::vector<int> shape;
  int d = 1, t = 1, p = 1;  // data, model and pipe sizes
  Plan plan;
  int64_t split = 1;  // microbatches (PP) or accumulation steps (DP) of each DP rank's rows
  size_t bucket_bytes = 25u << 20;
  bool jit = false;
  std::vector<int64_t> boundaries;  // uneven pipeline stages (empty: the even split)
  int64_t loss_chunk = 0;            // GPTConfig::loss_chunk_tokens of the split model (the reference's is 0)

  bool has(const std::string& a) const { return std::find(names.begin(), names.end(), a) != names.end(); }
  std::string str() const {
    return MeshCase{names, shape}.name() + ", " + std::to_string(boundaries.size()) + " stage boundaries, buckets " +
           std::to_string(bucket_bytes) + " bytes" + (jit ? ", jit" : "") + ", loss chunks of " + std::to_string(loss_chunk) +
           " tokens\n" + plan.describe();
  }
  // The model as this layout splits it.
  nn::GPTConfig split_config(nn::GPTConfig c) const {
    c.tp_axis = has("model") ? "model" : "";
    c.pp_axis = has("pipe") ? "pipe" : "";
    c.pp_boundaries = boundaries;
    c.loss_chunk_tokens = loss_chunk;
    return c;
  }
};

Layout draw_layout(Draw& z, int n) {
  std::vector<std::array<int, 3>> sizes;  // (data, model, pipe) with product n
  for (int d = 1; d <= n; ++d)
    for (int t = 1; d * t <= n; ++t)
      if (n % (d * t) == 0) sizes.push_back({d, t, n / (d * t)});
  Layout l;
  const auto [d, t, p] = z.one_of(sizes);
  l.d = d, l.t = t, l.p = p;
  std::vector<std::pair<std::string, int>> axes;  // the used axes, sometimes a size-1 one, in a random order
  for (auto [name, size] : {std::pair{"data", d}, std::pair{"model", t}, std::pair{"pipe", p}})
    if (size > 1 || z.pick(0, 3) == 0) axes.push_back({name, size});
  if (axes.empty()) axes.push_back({"data", 1});
  std::shuffle(axes.begin(), axes.end(), z.g);
  for (auto& [a, s] : axes) l.names.push_back(a), l.shape.push_back(s);
  if (l.has("data")) l.plan.dp = DP{"data", l.has("pipe") ? 1 : int(z.pick(1, 2))};
  if (l.has("model")) l.plan.tp = TP{"model"};
  if (l.has("pipe")) {
    PP pp{.axis = "pipe"};
    pp.schedule = z.coin() ? PipelineSchedule::gpipe : PipelineSchedule::one_f_one_b;
    pp.microbatches = int(pp.schedule == PipelineSchedule::one_f_one_b ? p + z.pick(0, 2) : z.pick(1, 4));
    pp.recompute = z.one_of(std::vector<Recompute>{Recompute::none, Recompute::full, Recompute::layers});
    pp.recompute_layers = int(z.pick(1, 2));
    l.plan.pp = pp;
    l.split = pp.microbatches;
  } else if (l.plan.dp) {
    l.split = l.plan.dp->accumulate_steps;
  }
  l.bucket_bytes = size_t(z.one_of(std::vector<int64_t>{64, 1000, 25 << 20}));
  l.jit = !l.plan.pp && z.coin();
  // From a stream of its own, so the other draws stay those the coverage check was tuned on.
  static Draw side{std::mt19937_64(seed_or(1) + 1003)};
  if (l.plan.dp) l.plan.dp->shard_optimizer = side.coin();
  l.loss_chunk = side.coin() ? side.pick(1, 7) : 0;
  return l;
}

// Uneven stages for a pipeline of `layers` blocks: always when they do not divide, else sometimes.
void draw_boundaries(Draw& z, Layout& l, int64_t layers) {
  if (l.p == 1 || (layers % l.p == 0 && z.coin())) return;
  std::vector<int64_t> cut;
  for (int64_t i = 1; i < layers; ++i) cut.push_back(i);
  std::shuffle(cut.begin(), cut.end(), z.g);
  cut.resize(size_t(l.p - 1));
  std::sort(cut.begin(), cut.end());
  l.boundaries = cut;
}

// A whole f64 GPT (no axes) whose sizes divide over every layout in `ls`, and their stage boundaries.
nn::GPTConfig draw_model(Draw& z, std::vector<Layout*> ls) {
  int t = 1, p = 1;
  for (const Layout* l : ls) t = std::lcm(t, l->t), p = std::max(p, l->p);
  nn::GPTConfig c;
  c.dtype = DType::f64;
  c.tp_axis = "";
  c.heads = t * z.pick(1, 2);
  c.dim = c.heads * z.one_of(std::vector<int64_t>{2, 4});
  c.vocab = t * z.pick(3, 10);
  c.seq_len = z.pick(3, 6);
  c.layers = p * z.pick(1, 2) + (p > 1 ? z.pick(0, 1) : 0);
  for (Layout* l : ls) draw_boundaries(z, *l, c.layers);
  return c;
}

// The kinds of layout a test's draws covered; with the fixed seed, checked to include every kind.
struct Coverage {
  std::map<std::string, int> seen;
  void add(const Layout& l) {
    ++seen[l.t > 1 ? "tensor parallel" : "no tensor parallel"];
    ++seen[l.d > 1 ? "data parallel" : "no data parallel"];
    if (l.plan.pp) {
      ++seen[std::string("pipeline ") + schedule_name(l.plan.pp->schedule)];
      ++seen[std::string("recompute ") + recompute_name(l.plan.pp->recompute)];
      if (!l.boundaries.empty()) ++seen["uneven stages"];
    }
    if (l.plan.dp && l.plan.dp->accumulate_steps > 1) ++seen[l.jit ? "accumulation under jit" : "accumulation"];
    if (l.jit) ++seen["jit"];
    if (l.loss_chunk > 0) ++seen[l.plan.pp ? "chunked loss head on a pipeline" : l.t > 1 ? "chunked loss head under TP" : "chunked loss head"];
    if (l.d > 1 && l.plan.dp->shard_optimizer)
      ++seen[l.jit ? "sharded optimizer under jit" : l.plan.pp ? "sharded optimizer with pipeline stages" : "sharded optimizer"];
  }
  void check() {
    if (world_size() == 1 || std::getenv("FUZZ_SEED")) return;
    std::string kinds;
    for (const auto& [k, c] : seen) kinds += k + ": " + std::to_string(c) + "\n";
    INFO(kinds);
    for (const char* k : {"tensor parallel", "no tensor parallel", "data parallel", "no data parallel", "pipeline 1f1b", "pipeline gpipe",
                          "recompute none", "recompute full", "recompute layers", "uneven stages", "accumulation", "accumulation under jit", "jit",
                          "sharded optimizer", "sharded optimizer under jit", "chunked loss head", "chunked loss head under TP",
                          "chunked loss head on a pipeline"})
      CHECK(seen[k] > 0);
    if (world_size() >= 4) CHECK(seen["sharded optimizer with pipeline stages"] > 0);  // DP x PP needs 4 ranks
  }
};

std::unique_ptr<optim::Optimizer> optimizer(bool adam) {
  return adam ? optim::adamw(optim::warmup_cosine(1e-2, 2, 8, 0.1), {.weight_decay = 0.1}) : optim::sgd(optim::constant(0.05), 0.9);
}

// This rank's rows of a global batch: its data-parallel shard.
Batch local_rows(const Batch& g, const Layout& l, const Mesh& mesh) {
  const int64_t B = g.size(), i = l.has("data") ? mesh.axis_index("data") : 0;
  return g.slice(B * i / l.d, B * (i + 1) / l.d);
}

// Steps [from, to) of the global batches on both: the layout's loss and gradient norm against the reference's.
void check_steps(int from, int to, Engine& eng, nn::GPT& model, Engine& ref, nn::GPT& whole, const Layout& l, const Mesh& mesh,
                 int64_t B, int64_t T, int64_t vocab) {
  for (int s = from; s < to; ++s) {
    const Batch g = batch(s, B, T, vocab);
    const StepResult a = ref.step(whole, nn::lm_loss, g), b = eng.step(model, nn::lm_loss, local_rows(g, l, mesh));
    INFO("step " << s << ": loss " << a.loss << " vs " << b.loss << ", gradient norm " << a.grad_norm << " vs " << b.grad_norm);
    CHECK(b.loss == Approx(a.loss).epsilon(1e-9));
    CHECK(b.grad_norm == Approx(a.grad_norm).epsilon(1e-9));
  }
}

// The final evaluation loss of `model` against the reference's.
void check_eval(Engine& eng, nn::GPT& model, Engine& ref, nn::GPT& whole, const Layout& l, int64_t T, int64_t vocab) {
  auto val = std::make_shared<TensorDataset>(std::map<std::string, Tensor>{
      {"x", tokens(7, Shape{2 * l.d, T}, vocab)}, {"y", tokens(8, Shape{2 * l.d, T}, vocab)}});
  const EvalSpec es{.data = val, .batch_size = 2, .fn = nn::lm_metrics};
  CHECK(eng.evaluate(model, es).at("eval/loss") == Approx(ref.evaluate(whole, es).at("eval/loss")).epsilon(1e-9));
}

}  // namespace

TEST_CASE("random DP x TP x PP layouts train as one rank does: losses, gradient norms, evaluation", "[mpi][fuzz][gpt][engine]") {
  Draw z{std::mt19937_64(seed_or(1))};  // the same on every rank
  Mesh solo = MeshSpec{{"data"}, {1}}.build(make_local_communicator());
  Coverage cover;
  for (int trial = 0; trial < 24; ++trial) {
    Layout l = draw_layout(z, world_size());
    const nn::GPTConfig whole_cfg = draw_model(z, {&l}), cfg = l.split_config(whole_cfg);
    const int64_t B = l.d * l.split * z.pick(1, 2), T = z.pick(2, cfg.seq_len);
    const double clip = z.coin() ? 0.0 : 0.05;
    const bool adam = z.coin();
    cover.add(l);
    INFO("trial " << trial << ": " << l.str() << "GPT vocab " << cfg.vocab << " layers " << cfg.layers << " heads " << cfg.heads
                  << " dim " << cfg.dim << ", B " << B << " T " << T << ", " << (adam ? "AdamW" : "SGD momentum") << ", clip " << clip);
    Mesh mesh = MeshSpec{l.names, l.shape}.build(rt());
    nn::GPT whole(whole_cfg), split(cfg, mesh);
    Engine ref(solo, Plan{}, optimizer(adam), {.grad_clip = clip});
    Engine eng(mesh, l.plan, optimizer(adam), {.grad_clip = clip, .bucket_bytes = l.bucket_bytes, .jit = l.jit});
    if (l.p > 1) {  // this stage holds the blocks the boundaries give it (the even split without them)
      std::vector<int64_t> first{0};
      for (int k = 1; k < l.p; ++k) first.push_back(l.boundaries.empty() ? cfg.layers * k / l.p : l.boundaries[size_t(k - 1)]);
      first.push_back(cfg.layers);
      const int stage = split.pipeline_stage();
      CHECK(split.first_layer() == first[size_t(stage)]);
      for (int64_t i = 0; i < cfg.layers; ++i) {
        const bool here = i >= first[size_t(stage)] && i < first[size_t(stage) + 1];
        CHECK(split.parameters().contains("blocks/" + std::to_string(i) + "/mlp/fc/weight") == here);
      }
    }
    check_steps(0, 4, eng, split, ref, whole, l, mesh, B, T, cfg.vocab);
    check_eval(eng, split, ref, whole, l, T, cfg.vocab);
  }
  cover.check();
}

TEST_CASE("a run saved under one random layout resumes under another and continues as one rank does", "[mpi][fuzz][gpt][checkpoint]") {
  // Parameters and optimizer state (AdamW moments or SGD momentum, the step count) are resharded from
  // the first layout's shards into the second's; the steps after the resume match the reference's.
  Draw z{std::mt19937_64(seed_or(2))};
  Mesh solo = MeshSpec{{"data"}, {1}}.build(make_local_communicator());
  Coverage cover;
  for (int trial = 0; trial < 12; ++trial) {
    Layout a = draw_layout(z, world_size()), b = draw_layout(z, world_size());
    const nn::GPTConfig whole_cfg = draw_model(z, {&a, &b});
    const int64_t B = std::lcm(a.d * a.split, b.d * b.split) * z.pick(1, 2), T = z.pick(2, whole_cfg.seq_len);
    const double clip = z.coin() ? 0.0 : 0.05;
    const bool adam = z.coin();
    cover.add(a);
    cover.add(b);
    INFO("trial " << trial << ": saved under " << a.str() << "resumed under " << b.str() << "GPT vocab " << whole_cfg.vocab << " layers "
                  << whole_cfg.layers << " heads " << whole_cfg.heads << " dim " << whole_cfg.dim << ", B " << B << " T " << T << ", "
                  << (adam ? "AdamW" : "SGD momentum") << ", clip " << clip);
    const std::string dir = "/tmp/titanax_fuzz_resume_" + std::to_string(world_size());
    if (world_rank() == 0) std::filesystem::remove_all(dir);
    rt().world()->barrier();

    nn::GPT whole(whole_cfg);
    Engine ref(solo, Plan{}, optimizer(adam), {.grad_clip = clip});
    {
      Mesh mesh = MeshSpec{a.names, a.shape}.build(rt());
      nn::GPT model(a.split_config(whole_cfg), mesh);
      Engine eng(mesh, a.plan, optimizer(adam),
                 {.checkpointer = std::make_shared<Checkpointer>(dir, 2, rt().world()), .grad_clip = clip, .bucket_bytes = a.bucket_bytes, .jit = a.jit});
      for (int s = 0; s < 3; ++s) {
        const Batch g = batch(s, B, T, whole_cfg.vocab);
        ref.step(whole, nn::lm_loss, g);
        eng.step(model, nn::lm_loss, local_rows(g, a, mesh));
      }
      eng.save(model);
    }
    Mesh mesh = MeshSpec{b.names, b.shape}.build(rt());
    nn::GPT model(b.split_config(whole_cfg), mesh);
    model.init_parameters(1234);  // other values than the saved ones: the load must replace them
    Engine eng(mesh, b.plan, optimizer(adam),
               {.checkpointer = std::make_shared<Checkpointer>(dir, 2, rt().world()), .grad_clip = clip, .bucket_bytes = b.bucket_bytes, .jit = b.jit});
    REQUIRE(eng.restore(model) == std::optional<int64_t>(3));
    CHECK(eng.global_step() == 3);
    check_steps(3, 6, eng, model, ref, whole, b, mesh, B, T, whole_cfg.vocab);
    check_eval(eng, model, ref, whole, b, T, whole_cfg.vocab);
    rt().world()->barrier();
    if (world_rank() == 0) std::filesystem::remove_all(dir);
  }
  cover.check();
}
