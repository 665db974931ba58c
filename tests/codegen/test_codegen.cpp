// The JIT's CUDA code generation without a GPU (titanax_codegen_tests, CTest cuda_codegen; CUDA builds
// only): NVRTC needs no device, so every fused program of real training steps is generated and compiled
// for sm_90 here, and the kernel cache's memory and disk layers are checked: hits, misses, files that are
// corrupt or belong to another source. Running the kernels (and comparing them with the CPU) is
// tests/cuda/test_cuda_jit.cpp, on a GPU.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <unistd.h>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>

#include "autodiff/autodiff.h"
#include "engine/gpt.h"
#include "engine/nn.h"
#include "engine/optim.h"
#include "jit/codegen.h"
#include "jit/fusion.h"
#include "jit/graph.h"
#include "ops/ops.h"
#include "op_cases.h"
#include "test_util.h"

using namespace titanax;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

// A fresh, empty disk-cache folder in use for the scope (restores TITANAX_KERNEL_CACHE after).
struct ScratchCache {
  fs::path dir;
  std::string before;
  bool had = false;
  explicit ScratchCache(const std::string& name) {
    dir = fs::temp_directory_path() / ("titanax-kcache-" + name + "-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    if (const char* e = std::getenv("TITANAX_KERNEL_CACHE")) {
      had = true;
      before = e;
    }
    setenv("TITANAX_KERNEL_CACHE", dir.c_str(), 1);
    jit::clear_kernel_memory_cache();
    jit::reset_kernel_cache_stats();
  }
  ~ScratchCache() {
    if (had) setenv("TITANAX_KERNEL_CACHE", before.c_str(), 1);
    else unsetenv("TITANAX_KERNEL_CACHE");
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::vector<fs::path> files() const {
    std::vector<fs::path> out;
    if (fs::exists(dir))
      for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path());
    return out;
  }
};

Batch classes(uint64_t seed, const Shape& x_shape, int64_t n) {
  const RngKey k = RngKey::from_seed(seed);
  Tensor y = (random_uniform(fold_in(k, 1), Shape{x_shape[0]}, DType::f64) * double(n)).astype(DType::i64);
  return Batch{{{"x", random_normal(k, x_shape)}, {"y", y}}};
}

// The fused graph of one traced training step (forward, backward, clipping, AdamW) of `model`.
jit::Graph fused_step(nn::Module& model, const LossFn& loss, const Batch& b) {
  ParamTree params = model.parameters();
  auto opt = optim::adamw(optim::constant(1e-3));
  auto step = [&](const TensorList& in) {
    Batch bb{{{"x", in[0]}, {"y", in[1]}}};
    auto [l, grads] = value_and_grad([&] { return loss(model, bb); }, params);
    optim::clip_grad_norm_tensor(grads, 1.0);
    opt->step(params, grads);
    return TensorList{l};
  };
  jit::Graph g = jit::trace(step, {b["x"], b["y"]});
  jit::optimize(g);
  jit::fuse(g);
  return g;
}

}  // namespace

TEST_CASE("codegen: every fused program of MLP, CNN and GPT training steps compiles with NVRTC", "[codegen]") {
  ScratchCache cache("steps");
  std::vector<std::string> sources;
  auto collect = [&](const jit::Graph& g) {
    for (auto& s : jit::fused_kernel_sources(g)) sources.push_back(std::move(s));
  };
  nn::MLP mlp({784, 128, 10});
  collect(fused_step(mlp, classification_loss, classes(1, Shape{32, 784}, 10)));
  nn::CNN cnn(nn::CNNOptions{.hidden = 32, .channels = {4, 8}});
  collect(fused_step(cnn, classification_loss, classes(2, Shape{4, 1, 28, 28}, 10)));
  const nn::GPTConfig cfg{.vocab = 64, .layers = 2, .heads = 2, .dim = 32, .seq_len = 16};
  nn::GPT gpt(cfg);
  const Tensor t = (random_uniform(RngKey::from_seed(3), Shape{2, cfg.seq_len + 1}, DType::f64) * 64.0).astype(DType::i64);
  collect(fused_step(gpt, nn::lm_loss,
                     Batch{{{"x", t.slice(1, 0, cfg.seq_len).contiguous()}, {"y", t.slice(1, 1, cfg.seq_len + 1).contiguous()}}}));
  REQUIRE(sources.size() >= 10);
  const std::set<std::string> unique(sources.begin(), sources.end());
  for (const std::string& s : sources) {
    INFO(s);
    CHECK_THAT(s, Contains("extern \"C\" __global__ void __launch_bounds__(256) tx_fused("));
    const auto cubin = jit::compile_cuda(s, 90);
    REQUIRE(cubin);
    CHECK(cubin->size() > 0);
    CHECK(cubin->compare(0, 4, "\x7f" "ELF") == 0);  // a CUBIN is an ELF image
  }
  const auto st = jit::kernel_cache_stats();
  CHECK(st.compiles == int64_t(unique.size()));  // equal programs share one compile
  CHECK(st.memory_hits == int64_t(sources.size() - unique.size()));
  CHECK(st.compile_seconds > 0);
  CHECK(cache.files().size() == unique.size());
  UNSCOPED_INFO(unique.size() << " kernels compiled in " << st.compile_seconds << " s");
}

TEST_CASE("codegen: random elementwise programs (every op kind, broadcasting, casts, clamp bounds, 16-bit) compile", "[codegen]") {
  ScratchCache cache("random");
  std::mt19937 rng(7);
  int compiled = 0;
  // f64, f32, bf16 and f16 in turn; casts to another of them (16-bit registers compute in f32 and round
  // through the generated tx_narrow / tx_widen conversions).
  const DType dts[] = {DType::f64, DType::f32, DType::bf16, DType::f16};
  for (int trial = 0; trial < 16; ++trial) {
    const DType t = dts[trial % 4], other = dts[(trial + 1) % 4];
    const Shape full{int64_t(1 + rng() % 5), int64_t(1 + rng() % 7), int64_t(2 + rng() % 9)};
    const Tensor a = testing::randn64(RngKey::from_seed(trial), full).astype(t);
    const Tensor b = testing::randn64(RngKey::from_seed(trial + 100), Shape{full[2]}).astype(t);
    const uint32_t seed = rng();
    auto f = [seed, other](const TensorList& in) {
      std::mt19937 r(seed);
      std::vector<Tensor> pool(in.begin(), in.end());
      auto pick = [&] { return pool[r() % pool.size()]; };
      for (int k = 0; k < 10; ++k) {
        const Tensor x = pick(), y = pick();
        Tensor z;
        switch (r() % 12) {
          case 0: z = exp(clamp(x, -5, 5)); break;
          case 1: z = log(abs(x) + 0.5); break;
          case 2: z = tanh(x) * sigmoid(y); break;
          case 3: z = gelu(x, r() % 2 == 0); break;
          case 4: z = where(gt(x, y), x, y * 0.5); break;
          case 5: z = pow(abs(x) + 0.5, clamp(y, -2, 2)); break;
          case 6: z = relu_backward(x, y); break;
          case 7: z = gelu_backward(x, y, r() % 2 == 0); break;
          case 8: z = x.astype(other).astype(x.dtype()) - y; break;
          case 9: z = maximum(x, y) / (square(y) + 1.0); break;
          case 10: z = clamp(x, -1.5, std::numeric_limits<double>::infinity()); break;
          default: z = rsqrt(abs(x) + 1.0) + neg(y); break;
        }
        pool.push_back(z);
      }
      return TensorList{pool.back(), pool[pool.size() - 3]};
    };
    jit::Graph g = jit::trace(f, {a, b});
    jit::fuse(g);
    for (const std::string& s : jit::fused_kernel_sources(g)) {
      INFO(s);
      if (is_half(t)) CHECK_THAT(s, Contains(t == DType::bf16 ? "tx_narrow_bf16(" : "tx_narrow_f16("));  // 16-bit registers
      CHECK(jit::compile_cuda(s, 90)->size() > 0);
      ++compiled;
    }
  }
  CHECK(compiled >= 16);
}

TEST_CASE("codegen: the disk cache serves a new process, and ignores corrupt or foreign files", "[codegen]") {
  ScratchCache cache("disk");
  const std::string src = "// test kernel\n#include \"tx_ew_math.cuh\"\nextern \"C\" __global__ void tx_fused(float* o) { o[0] = "
                          "titanax::kernels::cuda::ewm::gelu_tanh<float>(1.0f); }\n";
  const auto first = jit::compile_cuda(src, 90);
  CHECK(jit::kernel_cache_stats().compiles == 1);
  REQUIRE(cache.files().size() == 1);
  const fs::path file = cache.files()[0];
  CHECK_THAT(file.filename().string(), Contains("-sm_90.cubin"));

  SECTION("memory hit, then disk hit after the memory cache is dropped (a new process)") {
    CHECK(*jit::compile_cuda(src, 90) == *first);
    CHECK(jit::kernel_cache_stats().memory_hits == 1);
    jit::clear_kernel_memory_cache();
    CHECK(*jit::compile_cuda(src, 90) == *first);
    const auto st = jit::kernel_cache_stats();
    CHECK(st.disk_hits == 1);
    CHECK(st.compiles == 1);
  }
  SECTION("another architecture is another file and another compile") {
    jit::compile_cuda(src, 80);
    CHECK(jit::kernel_cache_stats().compiles == 2);
    CHECK(cache.files().size() == 2);
  }
  SECTION("a corrupt file is rejected, recompiled and rewritten") {
    std::string bytes;
    {
      std::ifstream in(file, std::ios::binary);
      bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    bytes[bytes.size() / 2] ^= 0x5a;
    std::ofstream(file, std::ios::binary | std::ios::trunc).write(bytes.data(), std::streamsize(bytes.size()));
    jit::clear_kernel_memory_cache();
    CHECK(*jit::compile_cuda(src, 90) == *first);
    auto st = jit::kernel_cache_stats();
    CHECK(st.disk_rejected == 1);
    CHECK(st.compiles == 2);
    jit::clear_kernel_memory_cache();
    jit::compile_cuda(src, 90);  // the rewritten file is good again
    st = jit::kernel_cache_stats();
    CHECK(st.disk_hits == 1);
    CHECK(st.compiles == 2);
  }
  SECTION("a truncated file and a file holding another source (a hash collision) are rejected") {
    const std::string other = src + "// another kernel\n";
    jit::compile_cuda(other, 90);
    fs::path other_file;
    for (const auto& f : cache.files())
      if (f != file) other_file = f;
    REQUIRE(!other_file.empty());
    fs::copy_file(other_file, file, fs::copy_options::overwrite_existing);  // file now holds `other`'s key
    jit::clear_kernel_memory_cache();
    jit::reset_kernel_cache_stats();
    CHECK(*jit::compile_cuda(src, 90) == *first);
    CHECK(jit::kernel_cache_stats().disk_rejected == 1);
    fs::resize_file(file, fs::file_size(file) / 2);
    jit::clear_kernel_memory_cache();
    CHECK(*jit::compile_cuda(src, 90) == *first);
    CHECK(jit::kernel_cache_stats().disk_rejected == 2);
    CHECK(jit::kernel_cache_stats().compiles == 2);
  }
  SECTION("TITANAX_KERNEL_CACHE=off writes nothing") {
    setenv("TITANAX_KERNEL_CACHE", "off", 1);
    CHECK(jit::kernel_cache_dir().empty());
    jit::compile_cuda(src + "// off\n", 90);
    CHECK(cache.files().size() == 1);
  }
}

TEST_CASE("codegen: a source that does not compile throws DeviceError with NVRTC's log", "[codegen]") {
  ScratchCache cache("bad");
  try {
    jit::compile_cuda("extern \"C\" __global__ void tx_fused() { undeclared_name = 1; }\n", 90);
    FAIL("no error");
  } catch (const DeviceError& e) {
    CHECK_THAT(std::string(e.what()), Contains("nvrtcCompileProgram") && Contains("undeclared_name"));
  }
  CHECK(cache.files().empty());
}

TEST_CASE("codegen: compile_cuda_parallel compiles distinct sources once each, on several threads", "[codegen]") {
  ScratchCache cache("parallel");
  std::vector<std::string> sources;
  for (int k = 0; k < 6; ++k)
    sources.push_back("#include \"tx_ew_math.cuh\"\nextern \"C\" __global__ void tx_fused(float* o) { o[0] = "
                      "titanax::kernels::cuda::ewm::gelu_tanh<float>(" + std::to_string(k) + ".0f); }\n");
  sources.push_back(sources[2]);  // a repeat
  sources.push_back(sources[0]);
  CHECK(jit::compile_cuda_parallel(sources, 90, 3) == 6);
  auto st = jit::kernel_cache_stats();
  CHECK(st.compiles == 6);
  CHECK(cache.files().size() == 6);
  // Later requests (a fused node's first run) are served from memory.
  for (const auto& s : sources) CHECK(jit::compile_cuda(s, 90)->compare(0, 4, "\x7f" "ELF") == 0);
  st = jit::kernel_cache_stats();
  CHECK(st.compiles == 6);
  CHECK(st.memory_hits == int64_t(sources.size()));

  SECTION("a source that does not compile throws once the others are compiled") {
    const std::string bad = "extern \"C\" __global__ void tx_fused() { undeclared_name = 1; }\n";
    const std::string fresh = sources[0] + "// another\n";
    CHECK_THROWS_AS(jit::compile_cuda_parallel({bad, fresh}, 90, 2), DeviceError);
    jit::compile_cuda(fresh, 90);
    CHECK(jit::kernel_cache_stats().compiles == 7);  // `fresh` compiled by the parallel call, then a hit
  }
  SECTION("precompile_fused_kernels leaves a CPU graph alone") {
    auto f = [](const TensorList& in) { return TensorList{exp(in[0]) * 2.0 + 1.0}; };
    jit::Graph g = jit::trace(f, {testing::randn64(RngKey::from_seed(1), Shape{8})});
    jit::fuse(g);
    REQUIRE(jit::fused_kernel_sources(g).size() == 1);
    jit::precompile_fused_kernels(g);
    CHECK(jit::kernel_cache_stats().compiles == 6);
  }
}
