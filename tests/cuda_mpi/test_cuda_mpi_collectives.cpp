// Collectives of CUDA tensors under mpirun (titanax_cuda_mpi_tests, CTest cuda_mpi_np2): every
// collective on CUDA tensors against the same collective on CPU tensors through the MPI backend, on the
// world and on every mesh axis, whichever backend the runtime chose (NCCL where each rank has its own
// GPU, the MPI fallback with host staging where ranks share one); which backend is chosen and that the
// fallback is logged; a data-parallel training run on the GPU against one rank's full-batch run, by
// hand (GradientSync) and through the Engine (the MLP of the MNIST config moved with Module::to; with the
// optimizer state sharded too, eager and jit-compiled); a GPT
// split over a tensor-parallel axis on the GPU (vocabulary-parallel embedding and cross-entropy included)
// against the whole model on one rank.
// Skipped (exit 77 on every rank alike, after agreeing over MPI) where some rank has no GPU or the build
// has no CUDA.
#include <catch2/catch.hpp>

#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <cstdlib>
#include <functional>

#include "autodiff/autodiff.h"
#include "autodiff/tape.h"
#include "core/cuda_runtime.h"
#include "engine/engine.h"
#include "cuda/cuda_test_util.h"
#include "op_cases.h"
#include "ops/ops.h"
#include "parallel/collectives.h"
#include "parallel/dp.h"
#include "parallel/mesh.h"
#include "parallel/nccl_communicator.h"
#include "parallel/runtime.h"
#include "parallel/sharding.h"
#include "engine/gpt.h"

using namespace titanax;
using Catch::Matchers::Contains;

namespace {

// Every log line of this process (attached before the Runtime exists, so its setup is captured too).
std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> g_log;

Runtime& rt() { return Runtime::instance(); }

/// True on every rank iff `ok` on every rank (a CPU tensor: the host path of whichever backend).
bool all_ranks(bool ok) {
  Tensor t = scalar(ok ? 0.0 : 1.0, DType::f64);
  rt().world()->all_reduce(t, CollectiveOp::max);
  return t.item() == 0.0;
}

// Runs before Catch's main: attach the log sink, start the runtime, and skip on every rank alike when
// any rank lacks a GPU (each rank deciding alone could leave the others waiting in a collective).
const bool kReady = [] {
  g_log = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(512);
  spdlog::default_logger()->sinks().push_back(g_log);
  const bool have_gpu = cuda_rt::built_with_cuda() && cuda_rt::device_count() > 0;
  Runtime& r = rt();
  if (!all_ranks(have_gpu && r.device().is_cuda())) {
    if (r.rank() == 0) {
      std::printf("titanax_cuda_mpi_tests: skipped: %s\n",
                  !cuda_rt::built_with_cuda() ? "this build has no CUDA backend"
                                              : "a rank sees no CUDA device (cudaGetDeviceCount is 0 or failed)");
      std::fflush(stdout);
    }
    std::exit(77);
  }
  return true;
}();

int rank() { return rt().rank(); }
int nranks() { return rt().world_size(); }
Device dev() { return rt().device(); }

/// Whether ranks share a GPU: the runtime gives rank r cuda:(local_rank % gpus); with every rank on
/// one node (checked) they share iff there are more ranks than GPUs.
bool ranks_share_gpu() { return nranks() > cuda_rt::device_count(); }
bool one_node() {
  const char* ls = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  return !ls || std::atoi(ls) == nranks();
}
std::string expected_backend() { return ranks_share_gpu() || !nccl_built() ? "mpi" : "nccl"; }

/// Rank r's input: small integers plus quarters, exact in every dtype and in sums over a few ranks
/// (u8 stays below 256 for up to 4 ranks).
Tensor pattern(int r, const Shape& s, DType dt, int salt = 0) {
  std::vector<double> v(size_t(s.numel()));
  for (size_t i = 0; i < v.size(); ++i) {
    v[i] = double(((r + 1) * 7 + int(i) * 3 + salt) % 50);
    if (is_floating(dt)) v[i] += 0.25 * double(i % 4);
  }
  return from_vector(v, s).astype(dt);
}

/// The GPU result equals the CPU (MPI backend) result exactly, and stayed on the GPU.
void same(const Tensor& gpu, const Tensor& cpu) {
  CHECK(gpu.device() == dev());
  CHECK(gpu.dtype() == cpu.dtype());
  CHECK(gpu.shape() == cpu.shape());
  CHECK(gpu.to(Device::cpu()).astype(DType::f64).to_vector<double>() == cpu.astype(DType::f64).to_vector<double>());
}

/// Runs body(comm) on the world and on every axis of {data: n} and, for an even n > 2, {data: 2, model: n/2}.
void for_each_comm(const std::function<void(Communicator&)>& body) {
  {
    INFO("world (" << rt().world()->backend() << ")");
    body(*rt().world());
  }
  std::vector<MeshSpec> specs{{{"data"}, {-1}}};
  if (nranks() % 2 == 0 && nranks() > 2) specs.push_back({{"data", "model"}, {2, -1}});
  for (const auto& spec : specs) {
    Mesh m = spec.build(rt());
    for (const auto& axis : m.axes()) {
      INFO("mesh " << spec.describe() << ", axis '" << axis << "' (" << m.comm(axis).backend() << ")");
      body(m.comm(axis));
    }
  }
}

const DType kDtypes[] = {DType::f32, DType::f64, DType::i32, DType::i64, DType::u8};

}  // namespace

TEST_CASE("cuda collectives: the runtime picks the backend the GPU layout allows") {
  REQUIRE(kReady);
  if (!one_node()) {
    WARN("ranks on several nodes: the expected backend is not derived here");
    return;
  }
  INFO(nranks() << " ranks, " << cuda_rt::device_count() << " GPU(s), NCCL built: " << nccl_built());
  CHECK(rt().world()->backend() == expected_backend());
  Mesh m = MeshSpec{{"data"}, {-1}}.build(rt());
  CHECK(m.comm("data").backend() == expected_backend());
}

TEST_CASE("cuda collectives: ranks sharing a GPU fall back to MPI, log it on group rank 0, refuse TITANAX_COMM=nccl") {
  if (!one_node() || !ranks_share_gpu()) {
    SUCCEED("every rank has its own GPU here");
    return;
  }
  CHECK(rt().world()->backend() == "mpi");
  auto logged = [] {
    for (const auto& line : g_log->last_formatted())
      if (line.find("go through host memory") != std::string::npos && line.find("share GPU") != std::string::npos)
        return true;
    return false;
  };
  // The world's choice was logged during the Runtime's setup, on rank 0 only.
  CHECK(logged() == (rank() == 0));
  Mesh m = MeshSpec{{"data"}, {-1}}.build(rt());
  CHECK(m.comm("data").backend() == "mpi");
  if (rank() == 0) {
    bool names_ranks = false;
    for (const auto& line : g_log->last_formatted())
      names_ranks |= line.find(nranks() == 2 ? "ranks 0, 1 share GPU GPU-" : "share GPU GPU-") != std::string::npos;
    CHECK(names_ranks);
  }

  setenv("TITANAX_COMM", "nccl", 1);
  std::string msg, found;
  try {
    rt().world()->split(0, rank());
  } catch (const CollectiveError& e) {
    msg = e.message();
    found = e.found();
  }
  unsetenv("TITANAX_COMM");
  CHECK_THAT(msg, Contains("TITANAX_COMM=nccl"));
  CHECK_THAT(found, Contains("share GPU"));

  setenv("TITANAX_COMM", "mpi", 1);
  CHECK(rt().world()->split(0, rank())->backend() == "mpi");
  unsetenv("TITANAX_COMM");
}

TEST_CASE("cuda collectives: one GPU per rank gets NCCL on every axis, TITANAX_COMM=mpi overrides") {
  if (!one_node() || ranks_share_gpu() || !nccl_built()) {
    SUCCEED("ranks share a GPU, or no NCCL in this build");
    return;
  }
  CHECK(rt().world()->backend() == "nccl");
  for (const auto& line : g_log->last_formatted()) CHECK(line.find("go through host memory") == std::string::npos);
  setenv("TITANAX_COMM", "mpi", 1);
  CHECK(rt().world()->split(0, rank())->backend() == "mpi");
  unsetenv("TITANAX_COMM");
}

TEST_CASE("cuda collectives: all_reduce, iall_reduce, broadcast on CUDA tensors equal the CPU's through MPI") {
  for_each_comm([](Communicator& c) {
    const int r = c.rank(), n = c.size();
    for (DType dt : kDtypes) {
      INFO("dtype " << dtype_name(dt));
      for (CollectiveOp op : {CollectiveOp::sum, CollectiveOp::max, CollectiveOp::min}) {
        INFO("op " << int(op));
        Tensor cpu = pattern(r, Shape{2, 3}, dt), gpu = cpu.to(dev());
        c.all_reduce(cpu, op);
        c.all_reduce(gpu, op);
        same(gpu, cpu);
        Tensor cpu2 = pattern(r, Shape{5}, dt, 1), gpu2 = cpu2.to(dev());
        c.iall_reduce(cpu2, op)->wait();
        auto req = c.iall_reduce(gpu2, op);
        req->test();
        req->wait();
        req->wait();  // idempotent
        same(gpu2, cpu2);
      }
      Tensor cpu = pattern(r, Shape{3, 2}, dt, 2), gpu = cpu.to(dev());
      c.broadcast(cpu, n - 1);
      c.broadcast(gpu, n - 1);
      same(gpu, cpu);
    }
    // bool moves as bytes
    Tensor b = pattern(r, Shape{4}, DType::i32).astype(DType::bool_), bg = b.to(dev());
    c.broadcast(b, 0);
    c.broadcast(bg, 0);
    same(bg, b);
    // Non-contiguous: a transposed view is reduced through a contiguous device copy and written back.
    Tensor base = pattern(r, Shape{3, 4}, DType::f32, 3);
    Tensor cpu_t = base.T(), gpu_t = base.to(dev()).T();
    REQUIRE(!gpu_t.is_contiguous());
    c.all_reduce(cpu_t);
    c.all_reduce(gpu_t);
    same(gpu_t, cpu_t);
    // A strided slice broadcast in place leaves the rest of its storage alone.
    Tensor whole_c = pattern(r, Shape{4, 4}, DType::f64, 4), whole_g = whole_c.to(dev());
    Tensor vc = whole_c.slice(1, 0, 4, 2), vg = whole_g.slice(1, 0, 4, 2);
    c.broadcast(vc, 0);
    c.broadcast(vg, 0);
    same(whole_g, whole_c);
    // Empty tensors.
    Tensor ec = zeros(Shape{0, 3}), eg = ec.to(dev());
    c.all_reduce(ec);
    c.all_reduce(eg);
    same(eg, ec);
  });
}

TEST_CASE("cuda collectives: all_gather, reduce_scatter, all_to_all on CUDA tensors equal the CPU's through MPI") {
  for_each_comm([](Communicator& c) {
    const int r = c.rank(), n = c.size();
    for (DType dt : kDtypes) {
      INFO("dtype " << dtype_name(dt));
      Tensor x = pattern(r, Shape{2, 3}, dt);
      same(c.all_gather(x.to(dev())), c.all_gather(x));
      Tensor s = scalar(double(r + 1)).astype(dt);  // 0-d: [size]
      same(c.all_gather(s.to(dev())), c.all_gather(s));
      Tensor big = pattern(r, Shape{int64_t(2 * n), 3}, dt, 5);
      for (CollectiveOp op : {CollectiveOp::sum, CollectiveOp::max})
        same(c.reduce_scatter(big.to(dev()), op), c.reduce_scatter(big, op));
      same(c.all_to_all(big.to(dev())), c.all_to_all(big));
      // Strided inputs.
      Tensor wide = pattern(r, Shape{3, int64_t(2 * n)}, dt, 6).T();
      same(c.all_to_all(wide.to(dev())), c.all_to_all(wide));
      same(c.reduce_scatter(wide.to(dev())), c.reduce_scatter(wide));
      for (const Tensor& in : {big, wide}) {  // non-blocking: into a poisoned output on the GPU
        Tensor out = full(Shape{2, 3}, -1.0, dt).to(dev());
        auto req = c.ireduce_scatter(in.to(dev()), out);
        req->wait();
        same(out, c.reduce_scatter(in));
      }
    }
    Tensor e = zeros(Shape{0, 2});
    same(c.all_gather(e.to(dev())), c.all_gather(e));
  });
}

TEST_CASE("cuda collectives: sendrecv, send / recv, isend / irecv on CUDA tensors equal the CPU's through MPI") {
  for_each_comm([](Communicator& c) {
    const int r = c.rank(), n = c.size();
    const int next = (r + 1) % n, prev = (r + n - 1) % n;
    for (DType dt : kDtypes) {
      INFO("dtype " << dtype_name(dt));
      Tensor x = pattern(r, Shape{3, 2}, dt, 7);
      same(c.sendrecv(x.to(dev()), next, prev), c.sendrecv(x, next, prev));
      // Open chain: rank 0 receives nothing (zeros), the last rank sends nothing.
      const int dst = r + 1 < n ? r + 1 : -1, src = r > 0 ? r - 1 : -1;
      same(c.sendrecv(x.to(dev()), dst, src), c.sendrecv(x, dst, src));
      if (n >= 2) {
        // Blocking pair: rank 0 -> the last rank.
        Tensor got_c = zeros(Shape{3, 2}, dt), got_g = got_c.to(dev());
        if (r == 0) {
          c.send(x, n - 1, 5);
          c.send(x.to(dev()), n - 1, 5);
        } else if (r == n - 1) {
          c.recv(got_c, 0, 5);
          c.recv(got_g, 0, 5);
          same(got_g, got_c);
        }
      }
      if (n % 2 == 0) {
        // Ring of non-blocking transfers; even ranks send first, odd ranks receive first, so the order
        // of posting matches between neighbours on NCCL, which matches by issue order.
        Tensor in_c = zeros(Shape{3, 2}, dt), in_g = in_c.to(dev());
        std::unique_ptr<CollectiveRequest> s1, r1, s2, r2;
        if (r % 2 == 0) {
          s1 = c.isend(x, next, 3), r1 = c.irecv(in_c, prev, 3);
          s2 = c.isend(x.to(dev()), next, 4), r2 = c.irecv(in_g, prev, 4);
        } else {
          r1 = c.irecv(in_c, prev, 3), s1 = c.isend(x, next, 3);
          r2 = c.irecv(in_g, prev, 4), s2 = c.isend(x.to(dev()), next, 4);
        }
        for (auto* q : {&s1, &r1, &s2, &r2}) (*q)->wait();
        same(in_g, in_c);
        CHECK(in_c.to_vector<double>() == pattern(prev, Shape{3, 2}, dt, 7).to_vector<double>());
      }
    }
  });
}

TEST_CASE("cuda collectives: a rank with a CPU tensor meeting GPU tensors on NCCL is an error on every rank") {
  auto w = rt().world();
  if (w->backend() != "nccl" || w->size() < 2) {
    SUCCEED("the world is not on NCCL (the MPI backend stages both alike)");
    return;
  }
  Tensor t = pattern(rank(), Shape{4}, DType::f32);
  if (rank() != 0) t = t.to(dev());
  std::string msg;
  try {
    w->all_reduce(t);
  } catch (const CollectiveError& e) {
    msg = e.message();
  }
  CHECK_THAT(msg, Contains("different collectives"));
  CHECK(all_ranks(!msg.empty()));
}

TEST_CASE("cuda collectives: data-parallel training on the GPU gives the loss of one rank") {
  const int r = rank(), n = nranks();
  if (8 % n != 0) {
    SUCCEED("the batch of 8 does not split over " << n << " ranks");
    return;
  }
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  INFO("data axis backend " << mesh.comm("data").backend());
  const Tensor X = testing::randn64(RngKey::from_seed(11), Shape{8, 4}).to(dev());
  const Tensor Y = testing::randn64(RngKey::from_seed(12), Shape{8, 3}).to(dev());
  const Tensor w0 = testing::randn64(RngKey::from_seed(13), Shape{4, 3}, 0.5);
  const int64_t rows = 8 / n;
  const double lr = 0.1;

  // dp: this rank's rows, gradients averaged over the data axis (GradientSync's buckets: iall_reduce on
  // the GPU), loss averaged with pmean; one rank: every row, no communication.
  auto train = [&](bool dp) {
    ParamTree p{{"w", w0.to(dev())}, {"b", zeros(Shape{3}, DType::f64, dev())}};
    std::unique_ptr<GradientSync> gs;
    if (dp) gs = std::make_unique<GradientSync>(mesh, "data", p, 64, 32);  // small buckets: several iall_reduces
    const Tensor xs = dp ? X.slice(0, r * rows, (r + 1) * rows) : X, ys = dp ? Y.slice(0, r * rows, (r + 1) * rows) : Y;
    std::vector<double> losses;
    for (int step = 0; step < 5; ++step) {
      auto [loss, g] = value_and_grad([&] {
        Tensor d = matmul(xs, p.at("w")) + p.at("b") - ys;
        return mean(d * d);
      }, p);
      ParamTree avg = dp ? gs->sync(g) : g;
      NoGradGuard ng;
      losses.push_back(dp ? pmean(mesh, loss, "data").item() : loss.item());
      for (const char* k : {"w", "b"}) {
        CHECK(avg.at(k).device() == dev());
        p.at(k) = (p.at(k) - avg.at(k) * lr).detach();
      }
    }
    return losses;
  };
  const std::vector<double> one = train(false), many = train(true);
  REQUIRE(many.size() == one.size());
  for (size_t s = 0; s < one.size(); ++s) {
    INFO("step " << s);
    CHECK(many[s] == Approx(one[s]).epsilon(1e-12));
  }
  CHECK(one.back() < one.front());  // it trains
}

TEST_CASE("cuda collectives: the Engine's data-parallel MLP training on the GPU gives the losses of one rank") {
  const int n = nranks();
  if (32 % n != 0) {
    SUCCEED("the batch of 32 does not split over " << n << " ranks");
    return;
  }
  const int64_t N = 256;
  Tensor x = testing::randn64(RngKey::from_seed(21), Shape{N, 20}).astype(DType::f32);
  const std::vector<float> xv = x.to_vector<float>();
  std::vector<int64_t> y(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) y[size_t(i)] = int64_t(xv[size_t(i * 20)] > 0) + 2 * int64_t(xv[size_t(i * 20 + 1)] > 0);
  auto data = std::make_shared<TensorDataset>(std::map<std::string, Tensor>{{"x", x}, {"y", from_vector(y, Shape{N})}});

  // dp: the world as the data axis, each rank its slice of every global batch of 32; one: this rank
  // alone (a local mesh) on the whole batches.
  // shard: the optimizer state sharded over the data axis (ZeRO-1), eager or jit-compiled.
  auto train = [&](bool dp, bool shard = false, bool jit = false) {
    nn::MLP model({20, 32, 4});
    model.to(dev());
    Mesh mesh = dp ? MeshSpec{{"data"}, {-1}}.build(rt()) : MeshSpec{{"data"}, {1}}.build(make_local_communicator());
    Engine engine(mesh, Plan{.dp = DP{"data", 1, shard}}, optim::sgd(optim::constant(0.1), 0.9), {.jit = jit});
    DataLoader loader(data, {.batch_size = 32, .shuffle = true, .seed = 4, .rank = dp ? rank() : 0,
                             .world = dp ? n : 1, .prefetch = 0});
    std::vector<double> losses;
    for (int s = 0; s < 10; ++s) losses.push_back(engine.step(model, classification_loss, loader.next()).loss);
    CHECK(model.device() == dev());
    return losses;
  };
  const std::vector<double> one = train(false);
  for (auto [shard, jit] : {std::pair{false, false}, std::pair{true, false}, std::pair{true, true}}) {
    const std::vector<double> many = train(true, shard, jit);
    for (size_t s = 0; s < one.size(); ++s) {
      INFO("step " << s << (shard ? ", optimizer state sharded" : "") << (jit ? ", jit" : ""));
      CHECK(many[s] == Approx(one[s]).epsilon(1e-5));  // per-rank means averaged vs one mean: rounding apart
    }
  }
  CHECK(one.back() < one.front());
}

TEST_CASE("cuda tensor parallelism: a GPT split over the model axis on the GPU equals the whole model (loss, gradients)") {
  const int n = nranks();
  const nn::GPTConfig cfg{.vocab = 64, .layers = 2, .heads = 4, .dim = 32, .seq_len = 16};
  if (cfg.heads % n != 0 || cfg.vocab % n != 0) {
    SUCCEED("the GPT does not divide over " << n << " ranks");
    return;
  }
  Mesh mesh = MeshSpec{{"model"}, {-1}}.build(rt());
  INFO("model axis backend " << mesh.comm("model").backend());
  nn::GPT whole(cfg), split(cfg, mesh);
  whole.to(dev());
  split.to(dev());
  const auto specs = split.partition_specs();
  auto ids = [&](uint64_t seed) {
    return (random_uniform(RngKey::from_seed(seed), Shape{4, cfg.seq_len}, DType::f64) * double(cfg.vocab)).astype(DType::i64).to(dev());
  };
  const Tensor x = ids(31), y = ids(32);
  auto [ls, gs] = value_and_grad([&] { return split.loss(x, y); }, split.parameters());
  auto [lw, gw] = value_and_grad([&] { return whole.loss(x, y); }, whole.parameters());
  CHECK(ls.device() == dev());
  CHECK(ls.item() == Approx(lw.item()).epsilon(1e-5));
  for (const auto& [p, g] : gs) {
    INFO(p);
    CHECK(g.device() == dev());
    CHECK(testing::rel_error(unshard(g.to(Device::cpu()), specs.at(p), mesh), gw.at(p)) <= 1e-5);
  }
}
