// bench/kernels: achieved memory bandwidth of the memory-bound kernels (elementwise add and GELU,
// layer-norm, softmax, cross-entropy forward + backward) against the device's own copy bandwidth
// measured in the same run (cudaMemcpy device to device on a GPU, memcpy on the CPU). Issue #3's target
// on the GPU: each kernel at least 80% of the copy. Prints one line:
//   bench=kernels device=cuda:0 copy_GBps=... add_GBps=... add_of_copy=... gelu_GBps=... ...
//   attention=unimplemented
// GB/s counts the bytes a kernel must move at least (inputs read once, outputs written once: add 12 B
// per element, GELU 8, layer-norm 8, softmax 8, cross-entropy 12 per logit: the forward reads the logits,
// the backward reads them again and writes the gradient) over the mean time of one call (each output
// freshly allocated, as in training; the GPU synchronised before the clock stops). The attention
// comparison against PyTorch's scaled_dot_product_attention waits for the flash-attention kernel.
// Options: --device cpu|cuda (default cuda when a GPU is visible, else cpu), --iters N (default 20).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <titanax/titanax.h>

#include "core/cuda_runtime.h"

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
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--device" && i + 1 < argc) device = argv[++i];
    else if (a == "--iters" && i + 1 < argc) iters = std::stoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: kernels [--device cpu|cuda] [--iters N]\n");
      return 2;
    }
  }
  if ((device != "cpu" && device != "cuda") || iters < 1) {
    std::fprintf(stderr, "kernels: --device must be cpu or cuda and --iters >= 1 (got '%s', %d)\n", device.c_str(), iters);
    return 2;
  }
  try {
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
    rows_out.push_back({"layer_norm", 8.0 * double(rows * dim) / time([&] { out = tx::layer_norm(x, w, bias); }) / 1e9});
    rows_out.push_back({"softmax", 8.0 * double(crow * vocab) / time([&] { out = tx::softmax(logits, -1); }) / 1e9});
    // Cross-entropy forward + backward: the gradient of the mean loss in the logits.
    const tx::ParamTree p{{"logits", logits}};
    rows_out.push_back({"cross_entropy", 12.0 * double(crow * vocab) / time([&] {
                          auto [l, g] = tx::value_and_grad([&] { return tx::cross_entropy(p.at("logits"), labels); }, p);
                          out = g.at("logits");
                        }) / 1e9});
    char buf[128];
    std::string line = "bench=kernels device=" + dev.str() + " iters=" + std::to_string(iters);
    std::snprintf(buf, sizeof buf, " copy_GBps=%.1f", copy);
    line += buf;
    for (const Row& r : rows_out) {
      std::snprintf(buf, sizeof buf, " %s_GBps=%.1f %s_of_copy=%.2f", r.name, r.gbps, r.name, r.gbps / copy);
      line += buf;
    }
    line += " attention=unimplemented";
    std::printf("%s\n", line.c_str());
    return 0;
  } catch (const tx::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
}
