// Pipeline parallelism under mpirun: 20 AdamW steps with clipping of a GPT split into S = 2 or 4 stages
// (also DP x PP and PP x TP at 4 ranks) against the same model as one stage on this rank alone, for
// M = 4 and 8 and both schedules, with each recompute policy; stage 0's activation memory under 1F1B
// against GPipe (allocator statistics); checkpoints written by the stages loaded into the whole model.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/allocator.h"
#include "engine/engine.h"
#include "engine/gpt.h"
#include "mpi_util.h"
#include "parallel/pipeline.h"

using namespace titanax;
using namespace mpitest;

namespace {

std::vector<MeshCase> pp_cases() {
  const int n = world_size();
  std::vector<MeshCase> c{{{"pipe"}, {n}}};
  if (n == 4) {
    c.push_back({{"data", "pipe"}, {2, 2}});
    c.push_back({{"pipe", "model"}, {2, 2}});
  }
  return c;
}

nn::GPTConfig small(const Mesh& mesh) {
  nn::GPTConfig c;
  c.vocab = 32;
  c.layers = 4;
  c.heads = 4;
  c.dim = 16;
  c.seq_len = 8;
  c.pp_axis = "pipe";
  c.tp_axis = mesh.has_axis("model") ? "model" : "";
  return c;
}

Batch global_batch(int step, int64_t B, int64_t T, int64_t vocab) {
  return Batch{{{"x", tokens(1000 + uint64_t(step), Shape{B, T}, vocab)}, {"y", tokens(2000 + uint64_t(step), Shape{B, T}, vocab)}}};
}

std::unique_ptr<optim::Optimizer> adamw() {
  return optim::adamw(optim::warmup_cosine(3e-3, 5, 20, 0.1),
                      {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1,
                       .decay_filter = [](const std::string&, const Tensor& t) { return t.dim() >= 2; }});
}

Plan plan_for(const Mesh& mesh, const PP& pp) {
  Plan p{.pp = pp};
  if (mesh.has_axis("data")) p.dp = DP{"data"};
  if (mesh.has_axis("model")) p.tp = TP{"model"};
  return p;
}

// This rank's rows of a global batch (its data-parallel shard; everything without a data axis).
Batch local_rows(const Batch& g, const Mesh& mesh) {
  if (!mesh.has_axis("data")) return g;
  const int64_t B = g.size(), n = mesh.axis_size("data"), i = mesh.axis_index("data");
  return g.slice(B * i / n, B * (i + 1) / n);
}

}  // namespace

TEST_CASE("PP = 2, 4 (and DP x PP, PP x TP) match one stage over 20 AdamW steps", "[mpi][pp][gpt][engine]") {
  Mesh solo = MeshSpec{{"pipe"}, {1}}.build(make_local_communicator());
  const double clip = 0.5;
  struct Variant {
    int M;
    PipelineSchedule schedule;
    Recompute recompute;
  };
  std::vector<Variant> variants;
  for (int M : {4, 8})
    for (auto s : {PipelineSchedule::one_f_one_b, PipelineSchedule::gpipe}) variants.push_back({M, s, Recompute::none});
  variants.push_back({4, PipelineSchedule::one_f_one_b, Recompute::full});
  variants.push_back({4, PipelineSchedule::one_f_one_b, Recompute::layers});
  for (const auto& mc : pp_cases()) {
    Mesh mesh = MeshSpec{mc.axes, mc.shape}.build(rt());
    for (const auto& v : variants) {
      INFO(mc.name() << ", M " << v.M << ", " << schedule_name(v.schedule) << ", recompute " << recompute_name(v.recompute));
      nn::GPTConfig solo_cfg = small(solo);
      nn::GPT whole(solo_cfg, solo), staged(small(mesh), mesh);
      Engine ref(solo, Plan{.pp = PP{"pipe", v.M}}, adamw(), {.grad_clip = clip});
      Engine eng(mesh, plan_for(mesh, {.axis = "pipe", .microbatches = v.M, .schedule = v.schedule, .recompute = v.recompute}),
                 adamw(), {.grad_clip = clip});
      int clipped = 0;
      for (int s = 0; s < 20; ++s) {
        const Batch g = global_batch(s, 16, 8, solo_cfg.vocab);
        StepResult a = ref.step(whole, nn::lm_loss, g);
        StepResult b = eng.step(staged, nn::lm_loss, local_rows(g, mesh));
        INFO("step " << s << " loss " << a.loss << " vs " << b.loss << ", norm " << a.grad_norm << " vs " << b.grad_norm);
        CHECK(b.loss == Approx(a.loss).epsilon(1e-4));
        CHECK(b.grad_norm == Approx(a.grad_norm).epsilon(1e-4));
        clipped += a.grad_norm > clip;
      }
      CHECK(clipped > 0);
      // The tied embedding's two copies (first and last stage) stayed bit-identical.
      if (staged.pipeline_stages() > 1 && (staged.pipeline_stage() == 0 || staged.pipeline_stage() == staged.pipeline_stages() - 1)) {
        Tensor w = staged.parameters().at("wte/weight").clone();
        const int peer = staged.pipeline_stage() == 0 ? staged.pipeline_stages() - 1 : 0;
        Tensor other = mesh.comm("pipe").sendrecv(w, peer, peer);
        CHECK(w.to_vector<float>() == other.to_vector<float>());
      }
      // Evaluation runs through the stages too and every rank reports the same figure.
      auto val = std::make_shared<TensorDataset>(std::map<std::string, Tensor>{
          {"x", tokens(7, Shape{12, 8}, solo_cfg.vocab)}, {"y", tokens(8, Shape{12, 8}, solo_cfg.vocab)}});
      EvalSpec es{.data = val, .batch_size = 4, .fn = nn::lm_metrics};
      CHECK(eng.evaluate(staged, es).at("eval/loss") == Approx(ref.evaluate(whole, es).at("eval/loss")).epsilon(1e-4));
    }
  }
}

TEST_CASE("1F1B: stage 0 holds at most S microbatches' activations; GPipe holds all M", "[mpi][pp][memory]") {
  if (world_size() != 4) return;  // S = 4 stages, M = 8
  Mesh mesh = MeshSpec{{"pipe"}, {4}}.build(rt());
  nn::GPTConfig cfg = small(mesh);
  cfg.seq_len = 32;
  nn::GPT model(cfg, mesh);
  const int M = 8;
  const Batch batch = global_batch(0, 8 * M, 32, cfg.vocab);
  std::vector<Batch> mbs;
  for (int i = 0; i < M; ++i) mbs.push_back(batch.slice(8 * i, 8 * (i + 1)));
  ParamTree params = model.parameters();
  TensorList ps;
  for (const auto& [p, t] : params) ps.push_back(t);
  PipelineStageFns fns{.forward = [&](int i, const Tensor& in) { return model.stage_forward(in, mbs[size_t(i)], Reduction::mean); },
                       .input_spec = [&](int i) { return model.stage_input_spec(mbs[size_t(i)]); }};
  Allocator& a = allocator_for(Device::cpu());

  // On stage 0 alone: A, what one microbatch's forward keeps alive (its activations, held by the
  // tape), and P1, the peak of one microbatch's forward and backward (A plus the backward's workspace
  // and the gradients it produces).
  int64_t A = 0, P1 = 0;
  if (mesh.axis_index("pipe") == 0) {
    for (auto& t : ps) t.set_requires_grad(true);
    const int64_t before = a.stats().current_bytes;
    a.reset_peak();
    {
      Tensor y = model.stage_forward({}, mbs[0], Reduction::mean);
      A = a.stats().current_bytes - before;
      BackwardOptions bo;
      bo.seed = ones_like(y);
      TensorList g = grad(y, ps, bo);
    }
    P1 = a.stats().peak_bytes - before;
    for (auto& t : ps) t.set_requires_grad(false);
  }
  auto peak_of = [&](PipelineSchedule s, Recompute rc = Recompute::none) {
    const int64_t base = a.stats().current_bytes;
    a.reset_peak();
    PipelineResult r = run_pipeline(mesh.comm("pipe"), PP{"pipe", M, s, rc}, ps, fns);
    return std::make_pair(a.stats().peak_bytes - base, r.stats.peak_in_flight);
  };
  auto [p1f1b, held1f1b] = peak_of(PipelineSchedule::one_f_one_b);
  auto [pgpipe, heldgpipe] = peak_of(PipelineSchedule::gpipe);
  auto [pfull, heldfull] = peak_of(PipelineSchedule::one_f_one_b, Recompute::full);
  if (mesh.axis_index("pipe") == 0) {
    INFO("one microbatch: activations A = " << A << " B, forward + backward peak P1 = " << P1
         << " B; peak over the step: 1F1B " << p1f1b << " B, GPipe " << pgpipe << " B");
    REQUIRE(A > 0);
    CHECK(held1f1b == 4);
    CHECK(heldgpipe == M);
    // 1F1B: at most S microbatches in flight, so the peak is S - 1 microbatches' activations plus one
    // microbatch's forward + backward, plus the running gradient sum (one copy of stage 0's
    // parameters) and one posted receive buffer (an activation gradient); nothing grows with M.
    const int64_t param_bytes = [&] { int64_t b = 0; for (auto& t : ps) b += int64_t(t.nbytes()); return b; }();
    const int64_t recv_bytes = int64_t(8 * 32 * cfg.dim * 4);
    CHECK(p1f1b <= (4 - 1) * A + P1 + param_bytes + recv_bytes);
    CHECK(pgpipe >= M * A);  // the measurement sees all M held by GPipe
    // Recomputing the whole stage keeps only each in-flight microbatch's output (S of them, each the
    // size of a receive buffer) besides the posted receive: the peak is one microbatch's forward +
    // backward plus those and the gradient sum.
    INFO("1F1B with full recomputation: " << pfull << " B");
    CHECK(pfull <= P1 + param_bytes + (4 + 1) * recv_bytes);
  }
}

TEST_CASE("a checkpoint saved by pipeline stages loads into the whole model and back into stages", "[mpi][pp][checkpoint]") {
  Mesh mesh = MeshSpec{{"pipe"}, {world_size()}}.build(rt());
  Mesh solo = MeshSpec{{"pipe"}, {1}}.build(make_local_communicator());
  const std::string dir = "/tmp/titanax_mpi_pp_ckpt_" + std::to_string(world_size());
  if (world_rank() == 0) std::filesystem::remove_all(dir);
  rt().world()->barrier();
  nn::GPT staged(small(mesh), mesh);
  Engine eng(mesh, Plan{.pp = PP{"pipe", 4}}, adamw(), {.checkpointer = std::make_shared<Checkpointer>(dir, 2, rt().world())});
  for (int s = 0; s < 3; ++s) eng.step(staged, nn::lm_loss, global_batch(s, 8, 8, 32));
  eng.save(staged);
  auto val = std::make_shared<TensorDataset>(std::map<std::string, Tensor>{
      {"x", tokens(7, Shape{8, 8}, 32)}, {"y", tokens(8, Shape{8, 8}, 32)}});
  EvalSpec es{.data = val, .batch_size = 4, .fn = nn::lm_metrics};
  const double trained = eng.evaluate(staged, es).at("eval/loss");

  // Every rank loads all stages' shards into one whole model (resharding load, another world size).
  nn::GPT whole(small(solo), solo);
  Engine one(solo, Plan{}, adamw(), {.checkpointer = std::make_shared<Checkpointer>(dir, 2)});
  REQUIRE(one.restore(whole) == std::optional<int64_t>(3));
  CHECK(one.evaluate(whole, es).at("eval/loss") == Approx(trained).epsilon(1e-6));
  CHECK(one.global_step() == 3);

  // Fresh stages resume from it (each loads only its own tensors).
  nn::GPT again(small(mesh), mesh);
  again.init_parameters(99);
  Engine eng2(mesh, Plan{.pp = PP{"pipe", 4}}, adamw(), {.checkpointer = std::make_shared<Checkpointer>(dir, 2, rt().world())});
  REQUIRE(eng2.restore(again) == std::optional<int64_t>(3));
  CHECK(eng2.evaluate(again, es).at("eval/loss") == Approx(trained).epsilon(1e-6));
  rt().world()->barrier();
  if (world_rank() == 0) std::filesystem::remove_all(dir);
}

TEST_CASE("a PP x TP checkpoint records every tensor's global shape, and loads into the whole model", "[mpi][pp][tp][checkpoint]") {
  // Rank 0 writes the metadata but holds only stage 0: the TP splits of the other stage's tensors must
  // come from their holders (they were taken as unsplit, so the checkpoint could not be loaded).
  if (world_size() != 4) return;
  Mesh mesh = MeshSpec{{"pipe", "model"}, {2, 2}}.build(rt());
  Mesh solo = MeshSpec{{"pipe"}, {1}}.build(make_local_communicator());
  const std::string dir = "/tmp/titanax_mpi_pp_tp_ckpt";
  if (world_rank() == 0) std::filesystem::remove_all(dir);
  rt().world()->barrier();
  nn::GPT staged(small(mesh), mesh);
  Engine eng(mesh, plan_for(mesh, {.axis = "pipe", .microbatches = 2}), adamw(),
             {.checkpointer = std::make_shared<Checkpointer>(dir, 2, rt().world())});
  for (int s = 0; s < 2; ++s) eng.step(staged, nn::lm_loss, global_batch(s, 4, 8, 32));
  eng.save(staged);
  auto val = std::make_shared<TensorDataset>(std::map<std::string, Tensor>{
      {"x", tokens(7, Shape{4, 8}, 32)}, {"y", tokens(8, Shape{4, 8}, 32)}});
  EvalSpec es{.data = val, .batch_size = 4, .fn = nn::lm_metrics};
  const double trained = eng.evaluate(staged, es).at("eval/loss");

  nn::GPT whole(small(solo), solo);
  std::ifstream in(dir + "/step_00000002/metadata.json");
  const auto tensors = nlohmann::json::parse(in)["tensors"];
  for (const auto& [path, p] : whole.parameters()) {
    INFO(path);
    REQUIRE(tensors.contains("params/" + path));
    CHECK(tensors["params/" + path]["global_shape"].get<std::vector<int64_t>>() == p.shape().vec());
  }
  Engine one(solo, Plan{}, adamw(), {.checkpointer = std::make_shared<Checkpointer>(dir, 2)});
  REQUIRE(one.restore(whole) == std::optional<int64_t>(2));
  CHECK(one.evaluate(whole, es).at("eval/loss") == Approx(trained).epsilon(1e-6));
  rt().world()->barrier();
  if (world_rank() == 0) std::filesystem::remove_all(dir);
}

TEST_CASE("PipelineSequential: an MLP split by path filters trains as on one stage", "[mpi][pp][engine]") {
  const int n = world_size();
  Mesh mesh = MeshSpec{{"pipe"}, {n}}.build(rt());
  Mesh solo = MeshSpec{{"pipe"}, {1}}.build(make_local_communicator());
  // 2 n Linear layers with a ReLU after each but the last; stage s holds Linear layers 2s and 2s + 1
  // (indices 4s and 4s + 2 among all layers), named by path filters.
  auto build = [&](const Mesh& m, nn::StageSplit split) {
    std::vector<nn::PipelineSequential::Factory> f;
    for (int i = 0; i < 2 * n; ++i) {
      f.push_back([i, n] { return std::make_shared<nn::Linear>(i == 0 ? 12 : 16, i == 2 * n - 1 ? 5 : 16); });
      if (i < 2 * n - 1) f.push_back([] { return std::make_shared<nn::ReLU>(); });
    }
    return nn::PipelineSequential(
        f, m, "pipe", std::move(split),
        [](const Tensor& out, const Batch& mb, Reduction r) { return cross_entropy(out, mb["y"], r); },
        [](int, const Batch& mb) { return TensorSpec{Shape{mb.size(), 16}, DType::f32, Device::cpu()}; });
  };
  nn::StageSplit filters;
  for (int s = 0; s < n; ++s) filters.path_filters.push_back({"layers/" + std::to_string(4 * s) + "/*", "layers/" + std::to_string(4 * s + 2) + "/*"});
  nn::PipelineSequential staged = build(mesh, filters), whole = build(solo, {});
  CHECK(staged.layer_indices().front() == 4 * mesh.axis_index("pipe"));
  Engine ref(solo, Plan{.pp = PP{"pipe", 4}}, optim::sgd(optim::constant(0.05), 0.9));
  Engine eng(mesh, Plan{.pp = PP{"pipe", 4}}, optim::sgd(optim::constant(0.05), 0.9));
  for (int step = 0; step < 10; ++step) {
    Batch b{{{"x", random_normal(RngKey::from_seed(uint64_t(10 + step)), Shape{8, 12}, DType::f32)},
             {"y", tokens(uint64_t(50 + step), Shape{8}, 5)}}};
    const double a = ref.step(whole, classification_loss, b).loss, c = eng.step(staged, classification_loss, b).loss;
    INFO("step " << step);
    CHECK(c == Approx(a).epsilon(1e-5));
  }
}

TEST_CASE("isend / irecv: data arrives, a message of another size is a CollectiveError", "[mpi][pp][p2p]") {
  auto world = rt().world();
  const int r = world->rank(), n = world->size();
  // A ring: every rank sends its values to the next and receives the previous rank's.
  Tensor mine = value_of(r, Shape{6}), got = zeros(Shape{6}, DType::f64);
  auto rq = world->irecv(got, (r + n - 1) % n, 5);
  auto sq = world->isend(mine, (r + 1) % n, 5);
  rq->wait();
  sq->wait();
  CHECK(vals(got) == vals(value_of((r + n - 1) % n, Shape{6})));
  // Rank 1 expects 7 values where rank 0 sends 6.
  if (r == 0) world->isend(value_of(0, Shape{6}), 1, 6)->wait();
  if (r == 1) {
    Tensor big = zeros(Shape{7}, DType::f64);
    auto q = world->irecv(big, 0, 6);
    CHECK_THROWS_AS(q->wait(), CollectiveError);
  }
  world->barrier();
}
