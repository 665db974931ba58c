// bench/mlp_step: one training step of the MNIST MLP (784-512-512-10, ReLU, softmax cross-entropy,
// AdamW, f32) at B=128 on random inputs: forward, backward, optimizer update. Prints one line:
//   bench=mlp_step device=cpu mode=eager B=128 threads=2 us_per_step=... peer_us_per_step=... speedup=...
// with ../shared/peers/mlp_torch.py --device <same> run in the same invocation when a Python with torch
// is found (bench/peer.h; else peer=unavailable). Options: --device cpu|cuda (cuda: cuda:0, inputs resident on the GPU as
// the peer's), --jit (the Engine's compiled step, EngineOptions::jit, instead of eager value_and_grad +
// Optimizer::step), --steps N (default 500), --B N, --hidden N, --no-peer. The loss is read back once,
// after the timed steps (eager; the Engine reads each step's loss), and the GPU is synchronised before
// the clock stops.
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>

#include <titanax/titanax.h>

#include "core/cuda_runtime.h"
#include "engine/engine.h"
#include "engine/nn.h"
#include "engine/optim.h"
#include "peer.h"

namespace tx = titanax;

int main(int argc, char** argv) {
  int64_t steps = 500, B = 128, hidden = 512;
  bool peer = true, jit = false;
  std::string device = "cpu";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--steps" && i + 1 < argc) steps = std::stoll(argv[++i]);
    else if (a == "--B" && i + 1 < argc) B = std::stoll(argv[++i]);
    else if (a == "--hidden" && i + 1 < argc) hidden = std::stoll(argv[++i]);
    else if (a == "--device" && i + 1 < argc) device = argv[++i];
    else if (a == "--jit") jit = true;
    else if (a == "--no-peer") peer = false;
    else {
      std::fprintf(stderr, "usage: mlp_step [--device cpu|cuda] [--jit] [--steps N] [--B N] [--hidden N] [--no-peer]\n");
      return 2;
    }
  }
  if (device != "cpu" && device != "cuda") {
    std::fprintf(stderr, "mlp_step: --device must be cpu or cuda, not '%s'\n", device.c_str());
    return 2;
  }
  return tx::bench::guarded([&] {
    const tx::Device dev = device == "cuda" ? tx::Device::cuda(0) : tx::Device::cpu();
    tx::nn::MLP model({784, hidden, hidden, 10});
    model.to(dev);
    const int64_t N = 60000;  // the peer's data layout: uniform inputs, random labels, sliding batches
    tx::Tensor X = tx::random_uniform(tx::RngKey::from_seed(1), tx::Shape{N, 784});
    tx::Tensor Y = tx::arange(0, N).astype(tx::DType::i64);
    {
      std::vector<int64_t> y(static_cast<size_t>(N));
      auto u = tx::random_uniform(tx::RngKey::from_seed(2), tx::Shape{N}, tx::DType::f64).to_vector<double>();
      for (int64_t i = 0; i < N; ++i) y[size_t(i)] = int64_t(u[size_t(i)] * 10) % 10;
      Y = tx::from_vector(y, tx::Shape{N});
    }
    X = X.to(dev);
    Y = Y.to(dev);
    // Eager: value_and_grad + the optimizer; jit: the Engine's step (one rank) compiled on its first call.
    auto opt = tx::optim::adamw(tx::optim::constant(1e-3));
    tx::Mesh mesh = tx::MeshSpec{{"data"}, {1}}.build(tx::make_local_communicator());
    tx::EngineOptions eo;
    eo.jit = true;
    std::unique_ptr<tx::Engine> engine;
    if (jit) engine = std::make_unique<tx::Engine>(mesh, tx::Plan{.dp = tx::DP{"data", 1}}, tx::optim::adamw(tx::optim::constant(1e-3)), eo);
    tx::Tensor last;
    double loss = 0;
    auto step = [&](int64_t i) {
      int64_t j = (i * B) % (N - B);
      tx::Tensor xb = X.slice(0, j, j + B), yb = Y.slice(0, j, j + B);
      if (engine) {
        tx::Batch b;
        b.items = {{"x", xb}, {"y", yb}};
        loss = engine->step(model, tx::classification_loss, b).loss;
        return;
      }
      tx::ParamTree params = model.parameters();
      auto [l, g] = tx::value_and_grad([&] { return tx::cross_entropy(model(xb), yb); }, params);
      opt->step(params, g);
      last = l;
    };
    auto sync = [&] {
      if (dev.is_cuda()) tx::cuda_rt::synchronize(dev.index);
    };
    for (int64_t i = 0; i < 50; ++i) step(i);
    sync();
    auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < steps; ++i) step(i);
    sync();
    double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / double(steps);
    if (!engine) loss = last.item();

    std::string line = "bench=mlp_step device=" + dev.str() + " mode=" + (jit ? "jit" : "eager") + " B=" + std::to_string(B) + " hidden=" + std::to_string(hidden) +
                       " threads=" + std::to_string(omp_get_max_threads()) + " steps=" + std::to_string(steps);
    char buf[256];
    std::snprintf(buf, sizeof buf, " us_per_step=%.1f samples_per_s=%.0f loss=%.4f", us, double(B) * 1e6 / us, loss);
    line += buf;
    auto kv = tx::bench::peer_figures(peer, tx::bench::peers_dir() + "/mlp_torch.py",
                                      "--device " + device + " --B " + std::to_string(B) + " --hidden " + std::to_string(hidden) +
                                          " --steps " + std::to_string(std::min<int64_t>(steps, 300)),
                                      {"us_per_step"}, line);
    if (!kv.empty()) {
      double peer_us = std::stod(kv["us_per_step"]);
      std::snprintf(buf, sizeof buf, " peer=%s peer_us_per_step=%.1f speedup=%.2f", kv["peer"].c_str(), peer_us, peer_us / us);
      line += buf;
    }
    std::printf("%s\n", line.c_str());
    return 0;
  });
}
