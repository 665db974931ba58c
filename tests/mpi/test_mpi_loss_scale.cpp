// Loss scaling under data parallelism (mpirun -np 2 / 4): an overflow on ONE rank must skip the step and
// back the scale off on EVERY rank (the averaged gradients carry the inf everywhere), so the replicas
// never diverge.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

#include "engine/engine.h"
#include "engine/nn.h"
#include "engine/optim.h"
#include "mpi_util.h"

using namespace titanax;
using namespace mpitest;

TEST_CASE("loss scaling: an overflow on one rank skips the step on every rank (eager and jit)", "[mpi][loss_scale]") {
  // With the optimizer state sharded (ZeRO-1) too: the inf then reaches only some ranks' parts of the
  // reduce-scattered gradients, and the norm summed over the parts must still skip everywhere.
  for (auto [jit, shard] : {std::pair{false, false}, std::pair{true, false}, std::pair{false, true}, std::pair{true, true}}) {
    INFO("jit " << jit << ", optimizer state sharded " << shard);
    Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
    nn::MLP model({10, 16, 3});
    Engine engine(mesh, Plan{.dp = DP{"data", 1, shard}}, optim::adamw(optim::constant(1e-2)),
                  EngineOptions{.grad_clip = 1.0, .loss_scale = LossScaleOptions::dynamic(1024, 2), .jit = jit});
    std::vector<bool> skipped;
    for (int step = 0; step < 4; ++step) {
      const RngKey k = fold_in(fold_in(RngKey::from_seed(5), uint64_t(world_rank())), uint64_t(step));
      Tensor x = random_normal(k, Shape{4, 10});
      // Only the last rank overflows, on step 1 (an inf in its inputs: the compiled step replays no C++ branch).
      if (step == 1 && world_rank() == world_size() - 1) x.data<float>()[3] = std::numeric_limits<float>::infinity();
      Batch b{{{"x", x}, {"y", (random_uniform(fold_in(k, 1), Shape{4}, DType::f64) * 3.0).astype(DType::i64)}}};
      skipped.push_back(engine.step(model, classification_loss, b).skipped);
    }
    CHECK(skipped == std::vector<bool>{false, true, false, false});
    CHECK(engine.loss_scaler()->scale() == 1024);  // 1024 -> 512 (overflow) -> 1024 after 2 good steps
    CHECK(engine.optimizer().steps() == 3);
    // The replicas are bitwise equal to rank 0's.
    CHECK(replica_diff(model.parameters(), model.parameters(), mesh).spread == 0.0);
  }
}
