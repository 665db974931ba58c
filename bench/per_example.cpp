// bench/per_example: per-example gradients, what DP-SGD (Abadi et al. 2016) clips, for the MNIST CNN
// (nn::CNN: conv3x3 32, pool, conv3x3 64, pool, 128, 10; f32) or the MNIST MLP (784-512-512-10), at
// B=64 on random inputs. Per example: the cross-entropy loss, every parameter's gradient and the clipping
// factor min(1, C / |g|) over all of them. One line:
//   bench=per_example model=cnn device=cpu B=64 threads=2 loop_ms=... vmap_ms=... jit_vmap_ms=...
//   batch_grad_ms=... vmap_speedup=... jit_vmap_speedup=... vmap_fallback_nodes=... max_rel_diff=...
//   [peer=... peer_ms=... vmap_of_peer=...]
// loop_ms: the per-example function called B times (what a framework without vmap does); vmap_ms:
// jit::vmap of it (traced once on one example, its graph re-run on the batch by the batching rules);
// jit_vmap_ms: jit::jit(vmap(f)) (the batched ops traced into one graph, optimised, fused and replayed);
// batch_grad_ms: the ordinary gradient of the batch's mean loss, one backward pass (the floor: a
// per-example method cannot do less work). *_speedup: loop_ms over the variant. vmap_fallback_nodes:
// nodes vmap ran once per example for want of a rule (0: every op batched). max_rel_diff: the largest
// |vmap - loop| / max(|loop|) over the outputs, each output measured against its own largest element.
// The peer (bench/peers/per_example_torch.py: torch.func's vmap of grad on the same model and shapes, or
// functorch's on PyTorch 1.13; peer=unavailable without either) runs in the same invocation.
// Options: --model cnn|mlp, --device cpu|cuda, --B N, --iters N (default 10), --no-peer, --profile (after
// the line, where vmap and the loop spend their time, op by op: OpProfiler, core/profiler.h, lines
//   profile variant=vmap|loop op=... calls=... ms=... share=...).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include <titanax/titanax.h>

#include "core/cuda_runtime.h"
#include "peer.h"

namespace tx = titanax;

int main(int argc, char** argv) {
  int64_t B = 64, iters = 10;
  bool peer = true, profile = false;
  std::string model_name = "cnn", device = "cpu";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--B" && i + 1 < argc) B = std::stoll(argv[++i]);
    else if (a == "--iters" && i + 1 < argc) iters = std::stoll(argv[++i]);
    else if (a == "--model" && i + 1 < argc) model_name = argv[++i];
    else if (a == "--device" && i + 1 < argc) device = argv[++i];
    else if (a == "--no-peer") peer = false;
    else if (a == "--profile") profile = true;
    else {
      std::fprintf(stderr, "usage: per_example [--model cnn|mlp] [--device cpu|cuda] [--B N] [--iters N] [--no-peer] [--profile]\n");
      return 2;
    }
  }
  if ((model_name != "cnn" && model_name != "mlp") || (device != "cpu" && device != "cuda") || B < 1 || iters < 1) {
    std::fprintf(stderr, "per_example: --model cnn|mlp, --device cpu|cuda, --B >= 1 and --iters >= 1 (got %s, %s, %lld, %lld)\n",
                 model_name.c_str(), device.c_str(), static_cast<long long>(B), static_cast<long long>(iters));
    return 2;
  }
  return tx::bench::guarded([&] {
    const tx::Device dev = device == "cuda" ? tx::Device::cuda(0) : tx::Device::cpu();
    const bool cnn = model_name == "cnn";
    std::shared_ptr<tx::nn::Module> model;
    if (cnn) model = std::make_shared<tx::nn::CNN>();
    else model = std::make_shared<tx::nn::MLP>(std::vector<int64_t>{784, 512, 512, 10});
    model->to(dev);
    const tx::ParamTree params = model->parameters();
    const tx::Shape example = cnn ? tx::Shape{1, 28, 28} : tx::Shape{784};
    tx::Shape xs{B};
    for (int64_t d : example) xs.push_back(d);
    const tx::Tensor X = tx::random_uniform(tx::RngKey::from_seed(1), xs).to(dev);
    const tx::Tensor Y = (tx::random_uniform(tx::RngKey::from_seed(2), tx::Shape{B}, tx::DType::f64) * 10.0).astype(tx::DType::i64).to(dev);
    const double clip = 1.0;

    // One example: x (example shape), y [] -> loss, each gradient, the clipping factor.
    tx::jit::Fn per_example = [&](const tx::TensorList& in) {
      auto [loss, g] = tx::value_and_grad([&] { return tx::cross_entropy((*model)(in[0].unsqueeze(0)), in[1].unsqueeze(0)); }, params);
      tx::TensorList out{loss};
      for (const auto& [path, t] : g) out.push_back(t);
      const tx::Tensor norm = tx::sqrt(tx::sum_squares(g.tensors()));
      out.push_back(tx::minimum(tx::scalar_like(1.0, norm), clip / norm));
      return out;
    };
    auto loop = [&] {
      std::vector<tx::TensorList> rows;
      for (int64_t b = 0; b < B; ++b) rows.push_back(per_example({X.slice(0, b, b + 1).squeeze(0), Y.slice(0, b, b + 1).squeeze(0)}));
      tx::TensorList out;
      for (size_t k = 0; k < rows[0].size(); ++k) {
        tx::TensorList parts;
        for (const auto& r : rows) parts.push_back(r[k].unsqueeze(0));
        out.push_back(tx::concat(parts, 0));
      }
      return out;
    };
    tx::jit::Fn vmapped = tx::jit::vmap(per_example);
    tx::jit::Compiled compiled = tx::jit::jit(vmapped);
    auto batch_grad = [&] {
      auto [loss, g] = tx::value_and_grad([&] { return tx::cross_entropy((*model)(X), Y); }, params);
      tx::TensorList out{loss};
      for (const auto& [path, t] : g) out.push_back(t);
      return out;
    };
    auto sync = [&] {
      if (dev.is_cuda()) tx::cuda_rt::synchronize(dev.index);
    };
    auto time_ms = [&](const std::function<tx::TensorList()>& f) { return tx::bench::time_ms([&] { f(); }, iters, sync); };

    tx::jit::reset_vmap_stats();
    const tx::TensorList want = loop(), got = vmapped({X, Y});
    int64_t fallback = 0;
    for (const auto& [op, n] : tx::jit::vmap_stats().fallback) fallback += n;
    double diff = 0;
    for (size_t k = 0; k < want.size(); ++k) {
      const auto w = want[k].astype(tx::DType::f64).to(tx::Device::cpu()).to_vector<double>();
      const auto g = got[k].astype(tx::DType::f64).to(tx::Device::cpu()).to_vector<double>();
      double e = 0, m = 0;
      for (size_t i = 0; i < w.size(); ++i) e = std::max(e, std::abs(g[i] - w[i])), m = std::max(m, std::abs(w[i]));
      diff = std::max(diff, e / std::max(m, 1e-30));
    }
    const tx::TensorList args{X, Y};
    const double loop_ms = time_ms(loop);
    const double vmap_ms = time_ms([&] { return vmapped(args); });
    const double jit_ms = time_ms([&] { return compiled(args); });
    const double batch_ms = time_ms(batch_grad);

    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "bench=per_example model=%s device=%s B=%lld threads=%d loop_ms=%.2f vmap_ms=%.2f jit_vmap_ms=%.2f batch_grad_ms=%.2f"
                  " vmap_speedup=%.2f jit_vmap_speedup=%.2f vmap_fallback_nodes=%lld max_rel_diff=%.2e",
                  model_name.c_str(), dev.str().c_str(), static_cast<long long>(B), omp_get_max_threads(), loop_ms, vmap_ms, jit_ms,
                  batch_ms, loop_ms / vmap_ms, loop_ms / jit_ms, static_cast<long long>(fallback), diff);
    std::string line = buf;
    auto kv = tx::bench::peer_figures(peer, std::string(TITANAX_SOURCE_DIR) + "/bench/peers/per_example_torch.py",
                                      "--model " + model_name + " --device " + device + " --B " + std::to_string(B) + " --iters " + std::to_string(iters),
                                      {"ms"}, line);
    if (!kv.empty()) {
      const double peer_ms = std::stod(kv["ms"]);
      std::snprintf(buf, sizeof buf, " peer=%s peer_ms=%.2f vmap_of_peer=%.2f jit_vmap_of_peer=%.2f", kv["peer"].c_str(), peer_ms,
                    peer_ms / vmap_ms, peer_ms / jit_ms);
      line += buf;
    }
    std::printf("%s\n", line.c_str());
    if (profile) {
      auto show = [&](const char* variant, const std::function<tx::TensorList()>& f) {
        tx::OpProfiler prof;
        f();
        sync();
        for (const auto& e : prof.entries())
          std::printf("profile variant=%s op=%s calls=%lld ms=%.3f share=%.3f\n", variant, e.op.c_str(), static_cast<long long>(e.calls),
                      e.seconds * 1e3, e.seconds / prof.total_seconds());
      };
      show("vmap", [&] { return vmapped(args); });
      show("loop", loop);
    }
    return 0;
  });
}
