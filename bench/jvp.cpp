// bench/jvp: a Jacobian-vector product of a model's logits with respect to its input and every parameter
// (a directional derivative along random tangents: forward gradients, linearisation, jax.jvp's use), for
// the MNIST MLP (784-512-512-10, ReLU, B=128, f32) written with its parameters as arguments. One line:
//   bench=jvp model=mlp device=cpu threads=2 forward_ms=... jvp_ms=... double_vjp_ms=... jvp_of_forward=...
//   double_vjp_of_forward=... jvp_peak_mb=... double_vjp_peak_mb=... jvp_by_vjp_ops=... max_rel_diff=...
//   [peer=... peer_ms=... jvp_of_peer=...]
// forward_ms: the forward pass alone; jvp_ms: jvp() in forward mode (autodiff/functional.h); double_vjp_ms:
// the same product by the double-vjp trick through the tape (the previous algorithm: a recorded backward
// pass, then its backward with respect to the cotangent), written with the public vjp() and grad();
// *_of_forward: their cost in forward passes; *_peak_mb: the most memory one call holds beyond what was
// live before it (the allocator's peak: activations, tape, results); jvp_by_vjp_ops: ops of one jvp whose tangent came from
// their linearised vjp (no rule); max_rel_diff: |jvp - double_vjp| over max |double_vjp|. The peer
// (bench/peers/jvp_torch.py: torch.func.jvp, or functorch.jvp on PyTorch 1.13, on the same function and
// shapes) runs in the same invocation. Options: --device cpu|cuda, --iters N (default 10), --no-peer.
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <string>

#include <titanax/titanax.h>

#include "core/cuda_runtime.h"
#include "peer.h"

namespace tx = titanax;

int main(int argc, char** argv) {
  int64_t iters = 10;
  bool peer = true;
  std::string device = "cpu";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--iters" && i + 1 < argc) iters = std::stoll(argv[++i]);
    else if (a == "--device" && i + 1 < argc) device = argv[++i];
    else if (a == "--no-peer") peer = false;
    else {
      std::fprintf(stderr, "usage: jvp [--device cpu|cuda] [--iters N] [--no-peer]\n");
      return 2;
    }
  }
  if ((device != "cpu" && device != "cuda") || iters < 1) {
    std::fprintf(stderr, "jvp: --device cpu|cuda and --iters >= 1 (got %s, %lld)\n", device.c_str(), static_cast<long long>(iters));
    return 2;
  }
  return tx::bench::guarded([&] {
    const tx::Device dev = device == "cuda" ? tx::Device::cuda(0) : tx::Device::cpu();
    const std::vector<int64_t> sizes{784, 512, 512, 10};
    const int64_t B = 128;
    // fn(x, w1, b1, w2, b2, w3, b3) -> logits: the MLP written with its parameters as arguments.
    const tx::VectorFn fn = [](const tx::TensorList& in) {
      tx::Tensor h = in[0];
      for (size_t l = 0; l + 2 < in.size(); l += 2) {
        h = tx::linear(h, in[1 + l], in[2 + l]);
        if (l + 4 < in.size()) h = tx::relu(h);
      }
      return tx::TensorList{h};
    };
    tx::TensorList primals{tx::random_uniform(tx::RngKey::from_seed(1), tx::Shape{B, sizes[0]}).to(dev)};
    for (size_t l = 0; l + 1 < sizes.size(); ++l) {
      const double bound = 1.0 / std::sqrt(double(sizes[l]));
      primals.push_back(((tx::random_uniform(tx::RngKey::from_seed(10 + l), tx::Shape{sizes[l + 1], sizes[l]}) * 2.0 - 1.0) * bound).to(dev));
      primals.push_back(((tx::random_uniform(tx::RngKey::from_seed(20 + l), tx::Shape{sizes[l + 1]}) * 2.0 - 1.0) * bound).to(dev));
    }
    tx::TensorList tangents;
    for (size_t i = 0; i < primals.size(); ++i) tangents.push_back(tx::random_normal(tx::RngKey::from_seed(30 + i), primals[i].shape()).to(dev));
    auto double_vjp = [&] {  // the previous jvp: J t as the gradient of <J^T u, t> with respect to u
      tx::VjpResult r = tx::vjp(fn, primals, {.create_graph = true});
      const tx::Tensor u = tx::zeros_like(r.outputs[0]).set_requires_grad();
      const tx::TensorList g = r.pullback({u});
      tx::Tensor s;
      for (size_t i = 0; i < g.size(); ++i)
        if (tangents[i].defined()) s = s.defined() ? s + tx::sum(g[i] * tangents[i]) : tx::sum(g[i] * tangents[i]);
      return tx::grad(s, {u})[0].detach();
    };
    auto sync = [&] {
      if (dev.is_cuda()) tx::cuda_rt::synchronize(dev.index);
    };
    auto time_ms = [&](const std::function<void()>& f) { return tx::bench::time_ms(f, iters, sync); };
    tx::detail::reset_jvp_stats();
    const tx::Tensor fwd = tx::jvp(fn, primals, tangents).second[0];
    const int64_t by_vjp = tx::detail::jvp_stats().by_vjp;
    const tx::Tensor rev = double_vjp();
    const double diff = tx::max(tx::abs(fwd - rev)).item() / tx::max(tx::abs(rev)).item();
    const double forward_ms = time_ms([&] {
      tx::NoGradGuard ng;
      fn(primals);
    });
    const double jvp_ms = time_ms([&] { tx::jvp(fn, primals, tangents); });
    const double dvjp_ms = time_ms([&] { double_vjp(); });
    // Peak bytes one call allocates beyond what was live before it (its activations, tape and results).
    tx::Allocator& alloc = tx::allocator_for(dev);
    auto peak_mb = [&](const std::function<void()>& f) {
      sync();
      const int64_t before = alloc.stats().current_bytes;
      alloc.reset_peak();
      f();
      sync();
      return double(alloc.stats().peak_bytes - before) / (1 << 20);
    };
    const double jvp_mb = peak_mb([&] { tx::jvp(fn, primals, tangents); });
    const double dvjp_mb = peak_mb([&] { double_vjp(); });

    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "bench=jvp model=mlp device=%s threads=%d forward_ms=%.2f jvp_ms=%.2f double_vjp_ms=%.2f jvp_of_forward=%.2f"
                  " double_vjp_of_forward=%.2f jvp_peak_mb=%.2f double_vjp_peak_mb=%.2f jvp_by_vjp_ops=%lld max_rel_diff=%.2e",
                  dev.str().c_str(), omp_get_max_threads(), forward_ms, jvp_ms, dvjp_ms, jvp_ms / forward_ms,
                  dvjp_ms / forward_ms, jvp_mb, dvjp_mb, static_cast<long long>(by_vjp), diff);
    std::string line = buf;
    auto kv = tx::bench::peer_figures(peer, std::string(TITANAX_SOURCE_DIR) + "/bench/peers/jvp_torch.py",
                                      "--device " + device + " --iters " + std::to_string(iters), {"ms"}, line);
    if (!kv.empty()) {
      const double peer_ms = std::stod(kv["ms"]);
      std::snprintf(buf, sizeof buf, " peer=%s peer_ms=%.2f jvp_of_peer=%.2f", kv["peer"].c_str(), peer_ms, peer_ms / jvp_ms);
      line += buf;
    }
    std::printf("%s\n", line.c_str());
    return 0;
  });
}
