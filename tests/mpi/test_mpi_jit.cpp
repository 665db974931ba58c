// The JIT-compiled Engine step under data parallelism (mpirun -np 2 / 4): the gradient and loss averages
// are traced collectives (bucketed_pmean, pmean) that the graph replays, so the compiled step must follow
// the eager data-parallel step (GradientSync's overlapped buckets) from the same weights on the same
// per-rank batches, keep every replica's weights identical, and refuse tensor-parallel meshes.
#include <catch2/catch.hpp>

#include <cmath>

#include "engine/engine.h"
#include "engine/nn.h"
#include "engine/optim.h"
#include "jit/graph.h"
#include "mpi_util.h"
#include "parallel/dp.h"

using namespace titanax;
using namespace mpitest;
using Catch::Matchers::Contains;

namespace {

// This rank's batch of step s: different on every rank.
Batch rank_batch(int s, int64_t B, int64_t in, int64_t classes) {
  const RngKey k = fold_in(fold_in(RngKey::from_seed(77), uint64_t(world_rank())), uint64_t(s));
  Tensor y = (random_uniform(fold_in(k, 1), Shape{B}, DType::f64) * double(classes)).astype(DType::i64);
  return Batch{{{"x", random_normal(k, Shape{B, in})}, {"y", y}}};
}

struct Run {
  std::vector<double> loss, norm;
  ParamTree params;
};

Run train(bool jit, int acc, int steps) {
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  nn::MLP model({20, 32, 32, 5});  // the same initial weights on every rank (deterministic init)
  Engine engine(mesh, Plan{.dp = DP{"data", acc}}, optim::adamw(optim::warmup_cosine(3e-3, 2, steps)),
                EngineOptions{.grad_clip = 0.5, .bucket_bytes = 4096, .jit = jit});
  Run r;
  for (int s = 0; s < steps; ++s) {
    StepResult sr = engine.step(model, classification_loss, rank_batch(s, 8, 20, 5));
    r.loss.push_back(sr.loss);
    r.norm.push_back(sr.grad_norm);
  }
  if (jit) {
    CHECK(engine.jit_stats() != nullptr);
    CHECK(engine.jit_stats()->misses == 1);
  }
  r.params = model.parameters();
  return r;
}

void check_close(const std::vector<double>& a, const std::vector<double>& b, const char* what) {
  CHECK(a.size() == b.size());
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    INFO(what << " step " << i << ": jit " << a[i] << " eager " << b[i]);
    CHECK(std::fabs(a[i] - b[i]) <= 1e-5 * std::max(1.0, std::fabs(b[i])));
  }
}

}  // namespace

TEST_CASE("the jit-compiled data-parallel step follows the eager one and keeps the replicas equal", "[mpi][jit]") {
  for (int acc : {1, 2}) {
    INFO("accumulate_steps " << acc << ", " << world_size() << " ranks");
    const Run eager = train(false, acc, 8), jit = train(true, acc, 8);
    check_close(jit.loss, eager.loss, "loss");
    check_close(jit.norm, eager.norm, "grad norm");
    Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
    const ReplicaDiff d = replica_diff(jit.params, eager.params, mesh);
    CHECK(d.worst <= 1e-5);
    CHECK(d.spread == 0.0);  // replicas stay bitwise identical
    // The losses are DP means: equal on every rank.
    CHECK(all_ranks(jit.loss.back() == world_sum(jit.loss.back()) / world_size()));
  }
}

TEST_CASE("the compiled DP step's graph holds one all-reduce per gradient bucket and one for the loss", "[mpi][jit]") {
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  nn::MLP model({20, 32, 5});
  Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-3)),
                EngineOptions{.bucket_bytes = 1 << 20, .jit = true});
  const jit::Graph g = engine.trace_step(model, classification_loss, rank_batch(0, 8, 20, 5));
  int pmeans = 0;
  for (const auto& n : g.nodes) pmeans += std::string(n.op->name()) == "pmean";
  CHECK(pmeans == 2);  // the 4 gradients fit one 1 MiB bucket; the loss
}

TEST_CASE("the jit-compiled step refuses meshes with ranks off the plan's axes, with a PlanError on every rank", "[mpi][jit]") {
  if (world_size() % 2 != 0) return;
  Mesh mesh = MeshSpec{{"data", "model"}, {-1, 2}}.build(rt());
  nn::MLP model({20, 32, 5});
  Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-3)), EngineOptions{.jit = true});
  try {
    engine.step(model, classification_loss, rank_batch(0, 8, 20, 5));
    FAIL("no error");
  } catch (const PlanError& e) {
    CHECK_THAT(std::string(e.what()), Contains("data- and tensor-parallel plans only"));
  }
}
