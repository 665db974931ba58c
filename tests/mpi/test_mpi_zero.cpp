// Optimizer-state sharding over the data axis (DP::shard_optimizer, ZeRO-1; parallel/zero.h) under
// mpirun -np 2 / 4: the sharded step follows the all-reduce step from the same weights on the same
// per-rank batches (eager and jit, with accumulation, AdamW with a matrices-only weight decay and SGD with
// momentum, clipping active), keeps every replica's weights bitwise equal, holds 1 / n of the optimizer
// state per rank (a 1-element parameter leaves some ranks an empty part), and its compiled graph
// reduce-scatters and all-gathers instead of all-reducing; its checkpoints hold each rank's part of the
// state as written by that rank (nothing gathered). Checkpoints across sharding and layouts are covered
// by test_mpi_fuzz_layouts.cpp's resume test, which draws sharding too.
#include <catch2/catch.hpp>

#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/allocator.h"
#include "engine/engine.h"
#include "engine/nn.h"
#include "engine/optim.h"
#include "jit/graph.h"
#include "mpi_util.h"
#include "parallel/zero.h"

using namespace titanax;
using namespace mpitest;
using Catch::Matchers::Contains;

namespace {

// This rank's batch of step s: different on every rank.
Batch rank_batch(int s, int64_t B) {
  const RngKey k = fold_in(fold_in(RngKey::from_seed(91), uint64_t(world_rank())), uint64_t(s));
  return Batch{{{"x", random_normal(k, Shape{B, 20})}, {"y", random_normal(fold_in(k, 1), Shape{B, 1})}}};
}

Tensor mse(nn::Module& m, const Batch& b) {
  const Tensor d = m(b["x"]) - b["y"];
  return mean(d * d);
}

std::unique_ptr<optim::Optimizer> make_opt(bool adam) {
  if (!adam) return optim::sgd(optim::constant(0.05), 0.9, 1e-2);
  return optim::adamw(optim::warmup_cosine(1e-2, 2, 8),
                      {.weight_decay = 0.5, .decay_filter = [](const std::string&, const Tensor& t) { return t.dim() >= 2; }});
}

struct Run {
  std::vector<double> loss, norm;
  ParamTree params;
  int64_t state_numel = 0;  // of the optimizer's per-parameter state on this rank
};

Run train(bool shard, bool jit, bool adam, int acc, int steps = 6) {
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  nn::MLP model({20, 32, 16, 1});  // the same initial weights on every rank; the last bias has 1 element
  Engine engine(mesh, Plan{.dp = DP{"data", acc, shard}}, make_opt(adam),
                EngineOptions{.grad_clip = 0.3, .bucket_bytes = 512, .jit = jit});
  Run r;
  for (int s = 0; s < steps; ++s) {
    StepResult sr = engine.step(model, mse, rank_batch(s, 8));
    r.loss.push_back(sr.loss);
    r.norm.push_back(sr.grad_norm);
  }
  r.params = model.parameters();
  for (const auto& [name, t] : engine.optimizer().state())
    if (name != "step") r.state_numel += t.numel();
  return r;
}

void check_close(const std::vector<double>& a, const std::vector<double>& b, const char* what) {
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    INFO(what << " step " << i << ": sharded " << a[i] << " all-reduce " << b[i]);
    CHECK(std::fabs(a[i] - b[i]) <= 1e-6 * std::max(1.0, std::fabs(b[i])));
  }
}

}  // namespace

TEST_CASE("the sharded-optimizer step follows the all-reduce step and keeps 1/n of the state per rank", "[mpi][zero]") {
  const int n = world_size();
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  for (bool adam : {true, false})
    for (bool jit : {false, true})
      for (int acc : {1, 2}) {
        INFO((adam ? "AdamW" : "SGD momentum") << (jit ? ", jit" : ", eager") << ", accumulate_steps " << acc << ", " << n << " ranks");
        const Run plain = train(false, jit, adam, acc), sharded = train(true, jit, adam, acc);
        check_close(sharded.loss, plain.loss, "loss");
        check_close(sharded.norm, plain.norm, "grad norm");
        CHECK(plain.norm.front() > 0.3);  // clipping was active
        const ReplicaDiff d = replica_diff(sharded.params, plain.params, mesh);
        CHECK(d.worst <= 1e-6);
        CHECK(d.spread == 0.0);  // every rank gathered the same parts
        // The state: each parameter's ceil(N / n)-element chunks, the last ranks' shorter or empty; together
        // exactly the unsharded state.
        CHECK(world_sum(double(sharded.state_numel)) == double(plain.state_numel));
        int64_t most = 0;
        for (const auto& [p, t] : plain.params) most += (t.numel() + n - 1) / n;
        CHECK(sharded.state_numel <= most * (adam ? 2 : 1));
        if (n > 1) CHECK(sharded.state_numel < plain.state_numel);
      }
}

TEST_CASE("ZeroShards: each rank's part of every parameter, reduce-scattered means and all-gathered wholes", "[mpi][zero]") {
  const int n = world_size(), r = world_rank();
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  ParamTree params;
  params.insert("w", zeros(Shape{3, 5}));
  params.insert("one", zeros(Shape{1}));
  params.insert("d", zeros(Shape{7}, DType::f64));
  for (size_t bucket_bytes : {size_t(8), size_t(1) << 20}) {
    INFO("bucket_bytes " << bucket_bytes);
    ZeroShards z(mesh, "data", params, bucket_bytes);
    // Rank q's gradient: g[i] = (q + 1) * 10 + i, so the mean is (n + 1) * 5 + i.
    ParamTree grads;
    for (const auto& [p, t] : params) {
      std::vector<double> v(size_t(t.numel()));
      for (size_t i = 0; i < v.size(); ++i) v[i] = (r + 1) * 10.0 + double(i);
      grads.insert(p, from_vector(v, t.shape()).astype(t.dtype()));
    }
    const ParamTree mine = z.reduce_scatter_mean(grads);
    for (size_t k = 0; k < params.size(); ++k) {
      const int64_t N = params[k].second.numel(), C = (N + n - 1) / n;
      const auto [lo, hi] = z.range(k);
      CHECK(lo == std::min(N, r * C));
      CHECK(hi == std::min(N, (r + 1) * C));
      const auto got = mine[k].second.to_vector<double>();
      REQUIRE(int64_t(got.size()) == hi - lo);
      for (int64_t i = lo; i < hi; ++i) CHECK(got[size_t(i - lo)] == (n + 1) * 5.0 + double(i));
      CHECK(mine[k].second.dtype() == params[k].second.dtype());
    }
    // All-gather: rank q's part of element i holds 1000 q + i; the whole must be i + 1000 * owner(i).
    ParamTree parts;
    for (size_t k = 0; k < params.size(); ++k) {
      const auto [lo, hi] = z.range(k);
      std::vector<double> v;
      for (int64_t i = lo; i < hi; ++i) v.push_back(1000.0 * r + double(i));
      parts.insert(params[k].first, from_vector(v, Shape{hi - lo}).astype(params[k].second.dtype()));
    }
    const ParamTree whole = z.all_gather(parts);
    for (size_t k = 0; k < params.size(); ++k) {
      const int64_t N = params[k].second.numel(), C = (N + n - 1) / n;
      REQUIRE(whole[k].second.shape() == params[k].second.shape());
      const auto got = whole[k].second.contiguous().to_vector<double>();
      for (int64_t i = 0; i < N; ++i) CHECK(got[size_t(i)] == 1000.0 * double(i / C) + double(i));
    }
    CHECK_THROWS_AS(z.all_gather(grads), ShapeError);  // whole tensors are not parts
    ParamTree fewer;
    fewer.insert("w", grads[0].second);
    CHECK_THROWS_AS(z.reduce_scatter_mean(fewer), ValueError);  // before any collective: every rank alike
    CHECK_THROWS_AS(z.all_gather(fewer), ValueError);
  }
  // Ranks that disagree on the parameters fail together, before any collective.
  if (n > 1) {
    ParamTree odd = params;
    if (r == n - 1) odd.insert("extra", zeros(Shape{2}));
    CHECK_THROWS_WITH(ZeroShards(mesh, "data", odd), Contains("parameter lists differ"));
  }
  CHECK(all_ranks(true));
}

TEST_CASE("ZeroShards' overlapped reduce-scatter gives reduce_scatter_mean's parts, in any report order", "[mpi][zero]") {
  const int r = world_rank();
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  ParamTree params;
  params.insert("w", zeros(Shape{3, 5}));
  params.insert("one", zeros(Shape{1}));
  params.insert("d", zeros(Shape{7}, DType::f64));
  params.insert("h", zeros(Shape{2, 3}, DType::bf16));
  auto bits = [](const ParamTree& t) {
    std::vector<std::vector<double>> out;
    for (const auto& [p, x] : t) out.push_back(x.contiguous().to_vector<double>());
    return out;
  };
  for (size_t bucket_bytes : {size_t(8), size_t(1) << 20}) {
    INFO("bucket_bytes " << bucket_bytes);
    ZeroShards z(mesh, "data", params, bucket_bytes, bucket_bytes);
    // Launch order: descending parameter indices, one dtype per bucket (8 bytes: every parameter alone).
    size_t prev = params.size();
    for (const auto& b : z.buckets())
      for (size_t i : b) {
        CHECK(i < prev);
        prev = i;
        CHECK(params[i].second.dtype() == params[b[0]].second.dtype());
      }
    if (bucket_bytes == 8) CHECK(z.buckets().size() == params.size());
    // Fresh random gradients, different on every rank; f32 ones for the f64 and bf16 parameters too.
    ParamTree grads;
    for (size_t k = 0; k < params.size(); ++k)
      grads.insert(params[k].first, random_normal(fold_in(RngKey::from_seed(17), uint64_t(r * 10 + int(k))),
                                                  params[k].second.shape()));
    const auto expect = bits(z.reduce_scatter_mean(grads));
    for (bool backward_order : {true, false}) {
      INFO((backward_order ? "reported last parameter first" : "reported first parameter first"));
      auto hook = z.hook();
      for (size_t j = 0; j < params.size(); ++j) {
        const size_t k = backward_order ? params.size() - 1 - j : j;
        hook(k, grads[k].second);
      }
      const ParamTree got = z.finish();
      CHECK(got.paths() == params.paths());
      CHECK(bits(got) == expect);
      CHECK(got[3].second.dtype() == DType::bf16);
    }
    // A gradient never reported counts as zeros (a parameter unused on this step).
    ParamTree without = grads;
    without[1].second = zeros(Shape{1});
    for (size_t k : {size_t(0), size_t(2), size_t(3)}) z.on_grad_ready(k, grads[k].second);
    CHECK(bits(z.finish()) == bits(z.reduce_scatter_mean(without)));
    // Misuse is refused on the spot; reset() abandons the step and the next one starts afresh.
    z.on_grad_ready(0, grads[0].second);
    CHECK_THROWS_WITH(z.on_grad_ready(0, grads[0].second), Contains("reported twice"));
    CHECK_THROWS_AS(z.on_grad_ready(1, zeros(Shape{2})), ShapeError);
    CHECK_THROWS_AS(z.on_grad_ready(9, zeros(Shape{1})), ValueError);
    CHECK_THROWS_AS(z.on_grad_ready(1, Tensor()), ValueError);
    z.reset();
    for (size_t k = 0; k < params.size(); ++k) z.on_grad_ready(k, grads[k].second);
    CHECK(bits(z.finish()) == expect);
  }
  CHECK(all_ranks(true));
}

TEST_CASE("an exception in backward abandons the data-parallel step: the next step trains as if it never ran", "[mpi][zero]") {
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  for (bool shard : {false, true}) {
    INFO((shard ? "sharded optimizer state" : "all-reduce"));
    auto run = [&](bool fail) {
      nn::MLP model({20, 32, 16, 1});
      Engine engine(mesh, Plan{.dp = DP{"data", 1, shard}}, make_opt(true), EngineOptions{.bucket_bytes = 512});
      engine.step(model, mse, rank_batch(0, 8));
      if (fail) {
        // The first layer's gradient comes last in backward: the later layers' buckets have started.
        HookHandle h = model.parameters()[0].second.register_hook([](const Tensor&) -> Tensor {
          throw ValueError("a failing gradient hook", "", "");
        });
        CHECK_THROWS_WITH(engine.step(model, mse, rank_batch(1, 8)), Contains("a failing gradient hook"));
        h.remove();
      }
      engine.step(model, mse, rank_batch(2, 8));
      return model.parameters();
    };
    const ParamTree clean = run(false), recovered = run(true);
    CHECK(replica_diff(recovered, clean, mesh).worst == 0.0);
  }
  CHECK(all_ranks(true));
}

TEST_CASE("an eager data-parallel step holds one copy of the gradients, not two", "[mpi][zero][memory]") {
  // Parameters dominate (4 layers of 512 x 512, 2 rows per rank): what the step adds to memory is the
  // gradients in flight. Backward hands each gradient to its bucket and lets go of it (release_reported),
  // a bucket's packed copy is freed once its collective completes (ZeRO) or as its mean is made
  // (all-reduce), and the updated parts are gathered into the parameters a bucket at a time, so the
  // step's peak stays near one copy G of the gradients; keeping the gradients until backward returns
  // as well as packing them would need two.
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  if (world_size() == 1) return;
  Allocator& alloc = allocator_for(Device::cpu());
  const RngKey k = fold_in(RngKey::from_seed(5), uint64_t(world_rank()));
  const Batch b{{{"x", random_normal(k, Shape{2, 512})}, {"y", random_normal(fold_in(k, 1), Shape{2, 1})}}};
  for (bool shard : {false, true}) {
    INFO((shard ? "sharded optimizer state" : "all-reduce"));
    nn::MLP model({512, 512, 512, 512, 512, 1});
    int64_t G = 0, L = 0;  // all gradients; the largest
    for (const auto& [p, t] : model.parameters()) {
      G += int64_t(t.nbytes());
      L = std::max(L, int64_t(t.nbytes()));
    }
    Engine engine(mesh, Plan{.dp = DP{"data", 1, shard}}, optim::sgd(optim::constant(0.01)), EngineOptions{.bucket_bytes = 64 << 10});
    engine.step(model, mse, b);  // the first step makes the buckets (and the sharded parts)
    const int64_t before = alloc.stats().current_bytes;
    alloc.reset_peak();
    engine.step(model, mse, b);
    const int64_t peak = alloc.stats().peak_bytes - before;
    // One copy of the gradients, the largest parameter's update (or, sharded, its bucket's gathered copy),
    // two 64 KiB buckets in flight. Measured on 2 / 4 ranks: 1.26 G (all-reduce), 1.26 / 1.01 G
    // (sharded); without the releases 2.0 G, and 1.5 / 1.25 G sharded when all_gather_into gathered
    // every bucket before writing any.
    const int64_t bound = G + L + 2 * (64 << 10);
    INFO("gradients G = " << G << " B, the step's peak " << peak << " B (" << double(peak) / double(G) << " G), bound " << bound);
    CHECK(peak <= bound);
  }
  CHECK(all_ranks(true));
}

TEST_CASE("a sharded Engine saves each rank's part of the optimizer state, gathering nothing, and resumes from it",
          "[mpi][zero][checkpoint]") {
  // AdamW's moments are 2 P for parameters of P bytes; each rank holds 2 P / n of them. Saving writes
  // every rank's parts into its own shard file as flat parts (io/checkpoint.h), so the save adds no copy
  // of the state to memory; gathering the whole moments, as a save of whole tensors would, adds 2 P.
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  const int n = world_size();
  if (n == 1) return;
  SharedDir d;
  nn::MLP model({20, 512, 512, 1});
  int64_t P = 0;
  for (const auto& [p, t] : model.parameters()) P += int64_t(t.nbytes());
  auto make = [&](bool shard) {
    return std::make_unique<Engine>(mesh, Plan{.dp = DP{"data", 1, shard}}, make_opt(true),
                                    EngineOptions{.checkpointer = std::make_shared<Checkpointer>(d.path.string(), 3, rt().world())});
  };
  auto engine = make(true);
  engine->step(model, mse, rank_batch(0, 8));
  Allocator& alloc = allocator_for(Device::cpu());
  const int64_t before = alloc.stats().current_bytes;
  alloc.reset_peak();
  engine->save(model);
  const int64_t peak = alloc.stats().peak_bytes - before;
  INFO("parameters P = " << P << " B; the save's peak " << peak << " B");
  CHECK(peak < P / 8);

  // Every rank's shard holds its own part of each moment, and the parts of all ranks hold each element once.
  std::ifstream in(d.path / "step_00000001" / "metadata.json");
  const nlohmann::json meta = nlohmann::json::parse(in);
  const auto& mine = meta["shards"][size_t(world_rank())]["tensors"];
  const ZeroShards z(mesh, "data", model.trainable_parameters());
  const auto paths = z.paths();
  for (size_t i = 0; i < paths.size(); ++i) {
    const auto [b, e] = z.range(i);
    INFO(paths[i] << ": this rank's range [" << b << ", " << e << ")");
    for (const char* kind : {"m", "v"}) {
      const std::string name = std::string("opt/") + kind + "/" + paths[i];
      CHECK(mine.contains(name) == (e > b));
      if (e > b) CHECK(mine[name]["flat"] == nlohmann::json::array({b, e}));
    }
  }
  int64_t saved = 0;
  for (const auto& sh : meta["shards"])
    for (auto it = sh["tensors"].begin(); it != sh["tensors"].end(); ++it)
      if (it.key().rfind("opt/m/", 0) == 0) saved += it.value()["data_offsets"][1].get<int64_t>() - it.value()["data_offsets"][0].get<int64_t>();
  CHECK(saved == P);

  // Resumed sharded (bitwise the same steps) or not (the same up to f32 summation order, as above): the
  // second step's loss depends on the moments the first update used.
  std::vector<double> want;
  for (int s = 1; s < 3; ++s) want.push_back(engine->step(model, mse, rank_batch(s, 8)).loss);
  for (bool shard : {true, false}) {
    INFO((shard ? "resumed sharded" : "resumed with whole state"));
    nn::MLP fresh({20, 512, 512, 1});
    fresh.init_parameters(77);
    auto resumed = make(shard);
    REQUIRE(resumed->restore(fresh) == std::optional<int64_t>(1));
    std::vector<double> got;
    for (int s = 1; s < 3; ++s) got.push_back(resumed->step(fresh, mse, rank_batch(s, 8)).loss);
    if (shard) CHECK(got == want);
    else check_close(got, want, "loss");
  }
  CHECK(all_ranks(true));
}

TEST_CASE("a sharded Engine's asynchronous save holds its step's state while the steps go on", "[mpi][zero][checkpoint]") {
  // save_async copies each rank's parts of the moments and writes them in the background; the next steps
  // update those moments in place before the write is committed. A resume from it repeats those steps bitwise.
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  SharedDir d;
  auto ck = std::make_shared<Checkpointer>(d.path.string(), 3, rt().world());
  auto make = [&] {
    return std::make_unique<Engine>(mesh, Plan{.dp = DP{"data", 1, true}}, make_opt(true), EngineOptions{.checkpointer = ck});
  };
  nn::MLP model({20, 256, 256, 1});
  auto engine = make();
  engine->step(model, mse, rank_batch(0, 8));
  engine->save_async(model);
  CHECK(ck->pending());
  std::vector<double> want;
  for (int s = 1; s < 4; ++s) {
    want.push_back(engine->step(model, mse, rank_batch(s, 8)).loss);
    ck->poll();
  }
  ck->wait();
  CHECK(ck->steps() == std::vector<int64_t>{1});
  nn::MLP fresh({20, 256, 256, 1});
  fresh.init_parameters(78);
  auto resumed = make();
  REQUIRE(resumed->restore(fresh) == std::optional<int64_t>(1));
  std::vector<double> got;
  for (int s = 1; s < 4; ++s) got.push_back(resumed->step(fresh, mse, rank_batch(s, 8)).loss);
  CHECK(got == want);
  CHECK(all_ranks(true));
}

TEST_CASE("the compiled sharded step reduce-scatters and all-gathers each bucket and all-reduces only the loss", "[mpi][zero][jit]") {
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  nn::MLP model({20, 32, 16, 1});
  Engine engine(mesh, Plan{.dp = DP{"data", 1, true}}, make_opt(true), EngineOptions{.bucket_bytes = 1 << 20, .jit = true});
  const jit::Graph g = engine.trace_step(model, mse, rank_batch(0, 8));
  std::map<std::string, int> count;
  for (const auto& node : g.nodes) ++count[node.op->name()];
  CHECK(count["reduce_scatter"] == 1);  // the 6 gradients fit one bucket
  CHECK(count["all_gather"] == 1);
  CHECK(count["pmean"] == 1);  // the loss
}

TEST_CASE("a sharded Engine refuses a changed trainable set", "[mpi][zero]") {
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  nn::MLP model({20, 32, 16, 1});
  Engine engine(mesh, Plan{.dp = DP{"data", 1, true}}, make_opt(true));
  engine.step(model, mse, rank_batch(0, 8));
  model.set_trainable("layers/0/**", false);
  if (world_size() > 1) CHECK_THROWS_WITH(engine.step(model, mse, rank_batch(1, 8)), Contains("trainable parameters changed"));
  CHECK(all_ranks(true));
}
