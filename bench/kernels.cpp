// bench/kernels: achieved memory bandwidth of the memory-bound kernels (elementwise add and GELU in f32
// and bf16, layer-norm, softmax, cross-entropy forward + backward, column and full sums) against the
// device's own copy bandwidth
// measured in the same run (cudaMemcpy device to device on a GPU, memcpy on the CPU). Issue #3's target
// on the GPU: each kernel at least 80% of the copy. Prints one line:
//   bench=kernels device=cuda:0 copy_GBps=... add_GBps=... add_of_copy=... gelu_GBps=... ...
//   attention_fwd_TFLOPs=... attention_bwd_TFLOPs=... peer_attention_fwd_TFLOPs=... attention_fwd_of_peer=...
// GB/s counts the bytes a kernel must move at least (inputs read once, outputs written once: add 12 B
// per element, GELU 8, their bf16 versions add_bf16 6 and gelu_bf16 4, layer-norm 8, softmax 8,
// cross-entropy 12 per logit: the forward reads the logits, the backward reads them again and writes the
// gradient; sum_rows (a bias gradient: the column sums of [16384, 3072]) and sum_all (all of the 64M
// elements) 4) over the mean time of one call (each output freshly allocated, as in training; the GPU
// synchronised before the clock stops).
// Causal attention (scaled_dot_product_attention) in TFLOP/s as FlashAttention counts them (forward
// 2 * 2 * B * H * T^2 * D / 2, backward 2.5x that; backward time = forward + backward - forward), beside
// PyTorch's F.scaled_dot_product_attention on the same shapes in the same run (bench/peers/sdpa_torch.py,
// when a Python with torch is found: bench/peer.h): on the GPU issue #3's shapes B=16, heads 12, T=1024, D=64 in bf16
// (target: at least 0.8x of PyTorch), on the CPU B=2, heads 4, T=512, D=64 in f32. On the GPU the line
// adds attention_fp32_kernels_*: the same shapes with the tensor-core kernels turned off, and
// attention_fused_bwd_*: the backward with dq added by atomics in the dk / dv kernel (FlashAttention-2's,
// and PyTorch's default; not deterministic: kernels::cuda::set_attention_deterministic) instead of the
// default deterministic kernels, and attention_16rows_per_warp_*: the forward and the deterministic
// backward with 64-row blocks instead of the default 128 (kernels::cuda::set_attention_rows_per_warp).
// attention_qkvpacked_*: the same attention on GPT's layout (scaled_dot_product_attention_qkvpacked: q, k,
// v rows strided in one [B, T, 3, H, D] tensor, o and the packed gradient written in place; on the CPU
// through copies).
// Options: --device cpu|cuda (default cuda when a GPU is visible, else cpu), --iters N (default 20),
// --no-peer.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <titanax/titanax.h>

#include "core/cuda_runtime.h"
#include "kernels/cuda/kernels.h"
#include "peer.h"

namespace tx = titanax;

namespace {

struct Timer {
  tx::Device dev;
  int iters;
  void sync() const {
    if (dev.is_cuda()) tx::cuda_rt::synchronize(dev.index);
  }
  // Mean seconds of one fn() over `iters` calls, after 3 warm-up calls.
  double operator()(const std::function<void()>& fn) const {
    for (int i = 0; i < 3; ++i) fn();
    sync();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) fn();
    sync();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::string device = tx::cuda_rt::device_count() > 0 ? "cuda" : "cpu";
  int iters = 20;
  bool peer = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--device" && i + 1 < argc) device = argv[++i];
    else if (a == "--iters" && i + 1 < argc) iters = std::stoi(argv[++i]);
    else if (a == "--no-peer") peer = false;
    else {
      std::fprintf(stderr, "usage: kernels [--device cpu|cuda] [--iters N] [--no-peer]\n");
      return 2;
    }
  }
  if ((device != "cpu" && device != "cuda") || iters < 1) {
    std::fprintf(stderr, "kernels: --device must be cpu or cuda and --iters >= 1 (got '%s', %d)\n", device.c_str(), iters);
    return 2;
  }
  return tx::bench::guarded([&] {
    const tx::Device dev = device == "cuda" ? tx::Device::cuda(0) : tx::Device::cpu();
    const bool gpu = dev.is_cuda();
    const Timer time{dev, iters};
    auto uniform = [&](uint64_t seed, const tx::Shape& s) { return tx::random_uniform(tx::RngKey::from_seed(seed), s, tx::DType::f32, dev); };
    // GPU: 256 MiB per f32 operand (far beyond the caches); CPU: 64 MiB.
    const int64_t n = gpu ? (int64_t(64) << 20) : (int64_t(16) << 20);
    const int64_t rows = gpu ? 32768 : 8192, dim = 768;  // layer-norm: GPT-2 small's width, B*T rows
    const int64_t crow = gpu ? 4096 : 512, vocab = 50304;  // softmax / cross-entropy: GPT-2's padded vocabulary
    const tx::Tensor a = uniform(1, tx::Shape{n}), b = uniform(2, tx::Shape{n});
    const tx::Tensor x = uniform(3, tx::Shape{rows, dim}), w = uniform(4, tx::Shape{dim}), bias = uniform(5, tx::Shape{dim});
    const tx::Tensor logits = uniform(6, tx::Shape{crow, vocab}) * 4.0;
    std::vector<int64_t> lab(static_cast<size_t>(crow));
    for (int64_t i = 0; i < crow; ++i) lab[size_t(i)] = (i * 7919) % vocab;
    const tx::Tensor labels = tx::from_vector(lab, tx::Shape{crow}).to(dev);

    const double bytes_n = 4.0 * double(n);
    tx::Tensor out = tx::empty(tx::Shape{n}, tx::DType::f32, dev);
    const double t_copy = time([&] {
      if (gpu) tx::cuda_rt::memcpy_d2d(out.raw_data(), a.raw_data(), size_t(bytes_n), dev.index);
      else std::memcpy(out.raw_data(), a.raw_data(), size_t(bytes_n));
    });
    const double copy = 2 * bytes_n / t_copy / 1e9;
    struct Row {
      const char* name;
      double gbps;
    };
    std::vector<Row> rows_out;
    rows_out.push_back({"add", 3 * bytes_n / time([&] { out = a + b; }) / 1e9});
    rows_out.push_back({"gelu", 2 * bytes_n / time([&] { out = tx::gelu(a); }) / 1e9});
    {  // The same in bf16 (half the bytes per element; the native 16-bit kernels on the GPU).
      const tx::Tensor a16 = a.astype(tx::DType::bf16), b16 = b.astype(tx::DType::bf16);
      tx::Tensor o16;
      rows_out.push_back({"add_bf16", 1.5 * bytes_n / time([&] { o16 = a16 + b16; }) / 1e9});
      rows_out.push_back({"gelu_bf16", 1.0 * bytes_n / time([&] { o16 = tx::gelu(a16); }) / 1e9});
    }
    {  // Reductions: a bias gradient (the sum over the rows of [B*T, 4 * 768]: column tiles) and a full sum.
      const int64_t brows = gpu ? 16384 : 2048, bcols = 3072;
      const tx::Tensor g = uniform(7, tx::Shape{brows, bcols});
      rows_out.push_back({"sum_rows", 4.0 * double(brows * bcols) / time([&] { out = tx::sum(g, {0}); }) / 1e9});
      rows_out.push_back({"sum_all", bytes_n / time([&] { out = tx::sum(a); }) / 1e9});
    }
    rows_out.push_back({"layer_norm", 8.0 * double(rows * dim) / time([&] { out = tx::layer_norm(x, w, bias); }) / 1e9});
    rows_out.push_back({"softmax", 8.0 * double(crow * vocab) / time([&] { out = tx::softmax(logits, -1); }) / 1e9});
    // Cross-entropy forward + backward: the gradient of the mean loss in the logits.
    const tx::ParamTree p{{"logits", logits}};
    rows_out.push_back({"cross_entropy", 12.0 * double(crow * vocab) / time([&] {
                          auto [l, g] = tx::value_and_grad([&] { return tx::cross_entropy(p.at("logits"), labels); }, p);
                          out = g.at("logits");
                        }) / 1e9});
    char buf[512];
    std::string line = "bench=kernels device=" + dev.str() + " iters=" + std::to_string(iters);
    std::snprintf(buf, sizeof buf, " copy_GBps=%.1f", copy);
    line += buf;
    for (const Row& r : rows_out) {
      std::snprintf(buf, sizeof buf, " %s_GBps=%.1f %s_of_copy=%.2f", r.name, r.gbps, r.name, r.gbps / copy);
      line += buf;
    }

    // Causal attention forward and forward + backward.
    const int64_t aB = gpu ? 16 : 2, aH = gpu ? 12 : 4, aT = gpu ? 1024 : 512, aD = 64;
    const tx::DType adt = gpu ? tx::DType::bf16 : tx::DType::f32;
    const tx::Shape as{aB, aH, aT, aD};
    auto normal = [&](uint64_t seed) { return tx::random_normal(tx::RngKey::from_seed(seed), as, tx::DType::f32, dev).astype(adt); };
    tx::Tensor q = normal(7), k = normal(8), v = normal(9);
    const tx::Tensor ct = normal(10);
    for (tx::Tensor* t : {&q, &k, &v}) t->set_requires_grad();
    const double flops = 4.0 * double(aB * aH) * double(aT) * double(aT) * double(aD) * 0.5;
    // Forward and backward TFLOP/s of an attention given as forward(x) and its inputs x (whose gradients
    // for the cotangent `seed` are the backward).
    auto tflops = [&](const std::function<tx::Tensor()>& forward, const tx::TensorList& x, const tx::Tensor& seed, double& fwd,
                      double& bwd) {
      const double t_fwd = time([&] {
        tx::NoGradGuard ng;
        out = forward();
      });
      const double t_both = time([&] { out = tx::grad(forward(), x, tx::BackwardOptions{.seed = seed})[0]; });
      fwd = flops / t_fwd / 1e12;
      bwd = 2.5 * flops / std::max(t_both - t_fwd, 1e-12) / 1e12;
    };
    // The kernels in use on q, k, v [B, H, T, D].
    auto attention_tflops = [&](double& fwd, double& bwd) {
      tflops([&] { return tx::scaled_dot_product_attention(q, k, v, true); }, {q, k, v}, ct, fwd, bwd);
    };
    double fwd_tf = 0, bwd_tf = 0, fused_bwd_tf = 0;
    attention_tflops(fwd_tf, bwd_tf);
    std::snprintf(buf, sizeof buf, " attention_shape=%lldx%lldx%lldx%lld_%s_causal attention_fwd_TFLOPs=%.3f attention_bwd_TFLOPs=%.3f",
                  (long long)aB, (long long)aH, (long long)aT, (long long)aD, std::string(tx::dtype_name(adt)).c_str(), fwd_tf, bwd_tf);
    line += buf;
    {  // GPT's layout: scaled_dot_product_attention_qkvpacked on one [B, T, 3, H, D] qkv, o [B, T, H, D]
      tx::Tensor qkv = tx::random_normal(tx::RngKey::from_seed(11), tx::Shape{aB, aT, 3, aH, aD}, tx::DType::f32, dev).astype(adt);
      qkv.set_requires_grad();
      const tx::Tensor ct_packed =
          tx::random_normal(tx::RngKey::from_seed(12), tx::Shape{aB, aT, aH, aD}, tx::DType::f32, dev).astype(adt);
      double f = 0, b = 0;
      tflops([&] { return tx::scaled_dot_product_attention_qkvpacked(qkv, true); }, {qkv}, ct_packed, f, b);
      std::snprintf(buf, sizeof buf, " attention_qkvpacked_fwd_TFLOPs=%.3f attention_qkvpacked_bwd_TFLOPs=%.3f", f, b);
      line += buf;
    }
    if (gpu) {  // the same shapes on the FP32 (CUDA-core) kernels, for comparison with the tensor-core ones
      double f = 0, b = 0;
      tx::kernels::cuda::set_attention_tensor_cores(false);
      attention_tflops(f, b);
      tx::kernels::cuda::set_attention_tensor_cores(true);
      std::snprintf(buf, sizeof buf, " attention_fp32_kernels_fwd_TFLOPs=%.3f attention_fp32_kernels_bwd_TFLOPs=%.3f", f, b);
      line += buf;
      // FA2's fused backward (dq by atomics: not deterministic, PyTorch's default semantics).
      tx::kernels::cuda::set_attention_deterministic(false);
      attention_tflops(f, fused_bwd_tf);
      tx::kernels::cuda::set_attention_deterministic(true);
      // 16 rows per warp instead of 32 (queries in the forward and dq, keys in dk / dv), deterministic.
      double f16 = 0, b16 = 0;
      tx::kernels::cuda::set_attention_rows_per_warp(16);
      attention_tflops(f16, b16);
      tx::kernels::cuda::set_attention_rows_per_warp(32);
      std::snprintf(buf, sizeof buf,
                    " attention_fused_bwd_TFLOPs=%.3f attention_16rows_per_warp_fwd_TFLOPs=%.3f"
                    " attention_16rows_per_warp_bwd_TFLOPs=%.3f",
                    fused_bwd_tf, f16, b16);
      line += buf;
    }
    auto kv = tx::bench::peer_figures(peer, std::string(TITANAX_SOURCE_DIR) + "/bench/peers/sdpa_torch.py",
                                      "--device " + device + " --B " + std::to_string(aB) + " --H " + std::to_string(aH) +
                                          " --T " + std::to_string(aT) + " --D " + std::to_string(aD) + " --dtype " +
                                          (gpu ? "bf16" : "f32") + " --causal 1 --iters " + std::to_string(iters),
                                      {"fwd_TFLOPs", "bwd_TFLOPs"}, line);
    if (!kv.empty()) {
      const double pf = std::stod(kv["fwd_TFLOPs"]), pb = std::stod(kv["bwd_TFLOPs"]);
      std::snprintf(buf, sizeof buf, " peer=%s peer_attention_fwd_TFLOPs=%.3f peer_attention_bwd_TFLOPs=%.3f"
                    " attention_fwd_of_peer=%.2f attention_bwd_of_peer=%.2f", kv["peer"].c_str(), pf, pb, fwd_tf / pf, bwd_tf / pb);
      line += buf;
      if (fused_bwd_tf > 0) {
        std::snprintf(buf, sizeof buf, " attention_fused_bwd_of_peer=%.2f", fused_bwd_tf / pb);
        line += buf;
      }
    }
    std::printf("%s\n", line.c_str());
    return 0;
  });
}
