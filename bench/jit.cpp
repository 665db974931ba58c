// bench/jit: a whole training step (forward, backward, AdamW update; f32, or the forward under bf16
// autocast with --precision bf16) eager vs compiled with jit::jit, for the MNIST MLP (784-512-512-10,
// B=128) and a GPT (default: the reference config of ../shared/peers/gpt_small_torch.py, vocab 8192,
// 4 layers, dim 256, 4 heads, T 128, B 16; --gpt2 for GPT-2 124M: 12 layers, dim 768, 12 heads, vocab
// 50304, T 1024, B 16). One line per model:
//   bench=jit model=mlp device=cpu ... first_call_s=... compile_s=... eager_us_per_step=...
//   jit_us_per_step=... speedup=... nodes=... launches_unfused=... launches=... eager_faults_per_step=...
//   jit_faults_per_step=... disk_cache=none [arena_bytes=... unplanned_*=...] [peer_eager_us_per_step=...]
// first_call_s: the first jit call (trace, which runs the step once, plus the passes and the memory
// plan); compile_s: the passes' share as JitStats counts it (trace included). The CPU backend
// interprets fused groups (no generated code), so there is no disk cache to be cold or warm on the CPU
// (disk_cache=none); in CUDA builds the line adds codegen_*: the NVRTC compile time of the step graph's
// distinct generated kernels with a cold disk cache (in parallel over codegen_threads, as jit() compiles
// them, and one by one) and a warm one (see codegen_figures). On a GPU, first_call_s includes that
// parallel compile.
// launches: nodes that run a kernel (views excluded), before and after elementwise fusion.
// *_faults_per_step: minor page faults per timed step (getrusage), the cost of memory mapped afresh (the
// CPU caching allocator and a reused arena take none in a steady state). Every variant takes 3 untimed
// steps first (the compiled ones: the trace, an op-by-op replay, then the CUDA-graph capture or the
// arena's first touch) and the same timed ones, so all end on the same loss.
// On the CPU, jit_us_per_step runs the default JitOptions (intermediates in the memory plan's arena of
// arena_bytes) and the line adds unplanned_us_per_step, unplanned_loss and unplanned_faults_per_step (the
// same compiled step with JitOptions::memory_plan off: unplanned_bytes of separate buffers).
// On a GPU, jit_us_per_step replays through CUDA graphs (jit/capture.h) and the line adds
// nographs_us_per_step (the same compiled step replayed op by op, JitOptions::cuda_graphs off) and the
// replay's segments: graph_segments (CUDA graphs launched per step), graph_captured_nodes,
// graph_eager_nodes (run op by op between them) and graph_failed_captures.
// The MLP's peer (../shared/peers/mlp_torch.py --device <same>, same shapes) runs in the same invocation
// when a Python with torch is found (bench/peer.h). Options: --device cpu|cuda (cuda:0: the model and 8
// batches resident on the GPU, cycled), --precision f32|bf16 (bf16: f32 master weights, the loss function under
// AutocastGuard(bf16), as EngineOptions::precision does), --steps N (default 50 MLP, 5 GPT), --model
// mlp|gpt|both, --gpt2, --no-peer, --profile. Steps are timed without reading the loss back (the last step's
// loss is read after the clock stops, the GPU synchronised first), as the peer times them.
// --profile adds, after the line, where an eager step spends its time (OpProfiler, core/profiler.h: the
// device synchronised around every op, 2 steps after the timed ones), one line per op by time, the top 25:
//   profile model=... op=... calls_per_step=... ms_per_step=... share=... out_mb_per_step=...
// and `profile model=... total_ms_per_step=...` (slower than eager_us_per_step by the waits: read shares).
#include <omp.h>

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <thread>

#include <titanax/titanax.h>

#include "engine/gpt.h"
#include "engine/nn.h"
#include "engine/optim.h"
#include "core/cuda_runtime.h"
#include "jit/capture.h"
#include "jit/codegen.h"
#include "jit/fusion.h"
#include "jit/memory_plan.h"
#include "peer.h"

namespace tx = titanax;

namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
// Minor page faults of this process so far (first touches of fresh pages: the cost of memory the
// allocator maps anew on every step).
long minor_faults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

// In CUDA builds: the NVRTC compile of every generated kernel of the step's fused graph (what a CUDA run
// of the same graph compiles; NVRTC needs no GPU), cold (an empty disk cache) and warm (the memory cache
// dropped, as in a new process, the disk cache kept). " codegen=unavailable" in CPU builds.
std::string codegen_figures(const tx::jit::Graph& g) {
  if (!tx::cuda_rt::built_with_cuda()) return " codegen=unavailable";
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("titanax-bench-kcache-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  const char* before = std::getenv("TITANAX_KERNEL_CACHE");
  const std::string saved = before ? before : "";
  setenv("TITANAX_KERNEL_CACHE", dir.c_str(), 1);
  const std::vector<std::string> sources = tx::jit::fused_kernel_sources(g);
  // Cold as jit() compiles (compile_cuda_parallel on every hardware thread), cold one by one (what a
  // single thread would take), and warm.
  double t[3] = {0, 0, 0};
  int distinct = 0;
  for (int run = 0; run < 3; ++run) {
    tx::jit::clear_kernel_memory_cache();
    if (run < 2) fs::remove_all(dir);
    const auto t0 = Clock::now();
    distinct = tx::jit::compile_cuda_parallel(sources, 90, run == 1 ? 1 : 0);
    t[run] = seconds_since(t0);
  }
  if (before) setenv("TITANAX_KERNEL_CACHE", saved.c_str(), 1);
  else unsetenv("TITANAX_KERNEL_CACHE");
  fs::remove_all(dir);
  char buf[320];
  std::snprintf(buf, sizeof buf,
                " codegen_arch=sm_90 codegen_kernels=%d codegen_threads=%u codegen_cold_disk_s=%.3f codegen_cold_serial_s=%.3f"
                " codegen_warm_disk_s=%.4f",
                distinct, std::max(1u, std::thread::hardware_concurrency()), t[0], t[1], t[2]);
  return buf;
}

struct Case {
  std::string name, shape;
  std::shared_ptr<tx::nn::Module> model;
  std::function<tx::Tensor(tx::nn::Module&, const tx::TensorList&)> loss;
  std::function<tx::TensorList(int64_t step)> batch;
};

// Times `steps` eager steps and `steps` jit steps of the same model from the same weights; prints the line.
void run_case(Case& c, int64_t steps, tx::Device dev, tx::DType precision, std::string extra, bool profile) {
  c.model->to(dev);
  tx::ParamTree params = c.model->parameters();
  std::vector<tx::Tensor> init;
  for (const auto& [p, t] : params) init.push_back(t.detach().clone());
  auto reset = [&] {
    for (size_t i = 0; i < params.size(); ++i) tx::copy_(params[i].second, init[i]);
  };
  std::vector<tx::TensorList> batches;  // made before the clock starts, on the device
  for (int64_t s = 0; s < 8; ++s) {
    tx::TensorList b;
    for (const auto& t : c.batch(s)) b.push_back(t.to(dev));
    batches.push_back(std::move(b));
  }
  auto batch = [&](int64_t s) { return batches[size_t(s % int64_t(batches.size()))]; };
  auto sync = [&] {
    if (dev.is_cuda()) tx::cuda_rt::synchronize(dev.index);
  };
  std::unique_ptr<tx::optim::Optimizer> opt;
  auto step_fn = [&](const tx::TensorList& in) {
    auto [loss, grads] = tx::value_and_grad(
        [&] {
          std::optional<tx::AutocastGuard> ac;
          if (precision != tx::DType::f32) ac.emplace(precision);
          return c.loss(*c.model, in).astype(tx::DType::f32);
        },
        params);
    opt->step(params, grads);
    return tx::TensorList{loss};
  };
  // Every variant takes kWarmup untimed steps first (a compiled step's first call traces, its second
  // replays op by op, its third captures CUDA graphs and touches a memory plan's arena for the first
  // time), then the same `steps` timed ones, so that all end on the same loss.
  constexpr int64_t kWarmup = 3;
  // Times `steps` calls of f from step kWarmup: microseconds and minor page faults per step, and the last
  // step's loss, read after the clock stopped.
  struct Timed {
    double us = 0, faults = 0, loss = 0;
  };
  auto timed = [&](const std::function<tx::TensorList(const tx::TensorList&)>& f) {
    sync();
    const long f0 = minor_faults();
    auto t0 = Clock::now();
    tx::Tensor last;
    for (int64_t s = kWarmup; s < kWarmup + steps; ++s) last = f(batch(s))[0];
    sync();
    Timed r{seconds_since(t0) * 1e6 / double(steps), double(minor_faults() - f0) / double(steps)};
    r.loss = last.item();
    return r;
  };
  opt = tx::optim::adamw(tx::optim::constant(1e-4));
  for (int64_t s = 0; s < kWarmup; ++s) step_fn(batch(s));
  const Timed eager = timed(step_fn);

  // Compiled as jit() does by default (on a GPU: replayed through CUDA graphs; on the CPU: intermediates
  // in the memory plan's arena), then on a GPU without CUDA graphs, on the CPU without the memory plan;
  // each from the initial weights.
  double first_call_s = 0, compile_s = 0;
  Timed run[2];  // the default; without CUDA graphs / the memory plan
  std::unique_ptr<tx::jit::Compiled> main_step;
  for (int variant = 0; variant < 2; ++variant) {
    reset();
    opt = tx::optim::adamw(tx::optim::constant(1e-4));
    auto step = std::make_unique<tx::jit::Compiled>(
        step_fn, variant == 0 ? tx::jit::JitOptions{} : tx::jit::JitOptions{.memory_plan = false, .cuda_graphs = false});
    sync();
    auto t0 = Clock::now();
    (*step)(batch(0));
    sync();
    if (variant == 0) first_call_s = seconds_since(t0), compile_s = step->stats().compile_seconds;
    for (int64_t s = 1; s < kWarmup; ++s) (*step)(batch(s));
    run[variant] = timed(std::ref(*step));
    if (variant == 0) main_step = std::move(step);
  }
  const Timed &compiled = run[0], &other = run[1];
  const tx::jit::Graph* g = main_step->graph_for(batch(0));
  // The same step traced and optimised without fusion (tracing takes one more step: the timings are done).
  tx::jit::Graph unfused = tx::jit::trace(step_fn, batch(0));
  tx::jit::optimize(unfused);
  char buf[768];
  std::snprintf(buf, sizeof buf,
                "bench=jit model=%s %s device=%s precision=%s threads=%d steps=%lld first_call_s=%.3f compile_s=%.3f "
                "eager_us_per_step=%.1f jit_us_per_step=%.1f speedup=%.2f eager_loss=%.6f jit_loss=%.6f nodes=%zu "
                "launches_unfused=%d launches=%d eager_faults_per_step=%.0f jit_faults_per_step=%.0f disk_cache=none",
                c.name.c_str(), c.shape.c_str(), dev.str().c_str(), std::string(tx::dtype_name(precision)).c_str(), omp_get_max_threads(),
                static_cast<long long>(steps), first_call_s, compile_s, eager.us, compiled.us, eager.us / compiled.us, eager.loss,
                compiled.loss, g->num_nodes(), tx::jit::kernel_launches(unfused), tx::jit::kernel_launches(*g), eager.faults, compiled.faults);
  if (!dev.is_cuda()) {  // the memory plan's arena, and the same step without it
    char plan[256];
    std::snprintf(plan, sizeof plan,
                  " arena_bytes=%lld unplanned_bytes=%lld unplanned_us_per_step=%.1f unplanned_loss=%.6f unplanned_faults_per_step=%.0f",
                  static_cast<long long>(g->plan ? g->plan->arena_bytes : 0), static_cast<long long>(g->plan ? g->plan->total_bytes : 0),
                  other.us, other.loss, other.faults);
    extra = plan + extra;
  }
  if (dev.is_cuda()) {  // the CUDA-graph replay: its segments, and the same step replayed op by op
    const tx::jit::CaptureStats* cs = main_step->capture_stats_for(batch(0));
    char graphs[256];
    std::snprintf(graphs, sizeof graphs,
                  " nographs_us_per_step=%.1f nographs_loss=%.6f graph_segments=%d graph_captured_nodes=%d "
                  "graph_eager_nodes=%d graph_failed_captures=%d",
                  other.us, other.loss, cs ? cs->segments : 0, cs ? cs->captured_nodes : 0,
                  cs ? cs->eager_nodes : int(g->num_nodes()), cs ? cs->failed_captures : 0);
    extra = graphs + extra;
  }
  std::printf("%s%s%s\n", buf, codegen_figures(*g).c_str(), extra.c_str());
  if (profile) {  // two eager steps op by op, the device synchronised around each op
    constexpr int64_t kProfileSteps = 2;
    tx::OpProfiler prof;
    for (int64_t s = 0; s < kProfileSteps; ++s) step_fn(batch(s));
    const double total = prof.total_seconds();
    const std::vector<tx::OpProfiler::Entry> es = prof.entries();
    for (size_t i = 0; i < es.size() && i < 25; ++i)
      std::printf("profile model=%s op=%s calls_per_step=%.1f ms_per_step=%.3f share=%.3f out_mb_per_step=%.1f\n",
                  c.name.c_str(), es[i].op.c_str(), double(es[i].calls) / kProfileSteps, es[i].seconds * 1e3 / kProfileSteps,
                  total > 0 ? es[i].seconds / total : 0.0, double(es[i].output_bytes) / 1e6 / kProfileSteps);
    std::printf("profile model=%s total_ms_per_step=%.3f ops=%zu\n", c.name.c_str(), total * 1e3 / kProfileSteps, es.size());
  }
  std::fflush(stdout);
}
}  // namespace

int main(int argc, char** argv) {
  int64_t steps = 0;
  std::string which = "both";
  bool peer = true, gpt2 = false, profile = false;
  std::string device = "cpu", precision = "f32";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--steps" && i + 1 < argc) steps = std::stoll(argv[++i]);
    else if (a == "--device" && i + 1 < argc) device = argv[++i];
    else if (a == "--precision" && i + 1 < argc) precision = argv[++i];
    else if (a == "--model" && i + 1 < argc) which = argv[++i];
    else if (a == "--gpt2") gpt2 = true;
    else if (a == "--no-peer") peer = false;
    else if (a == "--profile") profile = true;
    else {
      std::fprintf(stderr,
                   "usage: jit [--device cpu|cuda] [--precision f32|bf16] [--steps N] [--model mlp|gpt|both] [--gpt2] "
                   "[--no-peer] [--profile]\n");
      return 2;
    }
  }
  if ((device != "cpu" && device != "cuda") || (precision != "f32" && precision != "bf16")) {
    std::fprintf(stderr, "jit: --device must be cpu or cuda and --precision f32 or bf16, not '%s' / '%s'\n",
                 device.c_str(), precision.c_str());
    return 2;
  }
  return tx::bench::guarded([&] {
    const tx::Device dev = device == "cuda" ? tx::Device::cuda(0) : tx::Device::cpu();
    const tx::DType prec = precision == "bf16" ? tx::DType::bf16 : tx::DType::f32;
    if (which == "mlp" || which == "both") {
      const int64_t B = 128;
      Case c{"mlp", "B=128 sizes=784-512-512-10", std::make_shared<tx::nn::MLP>(std::vector<int64_t>{784, 512, 512, 10}),
             [](tx::nn::Module& m, const tx::TensorList& in) { return tx::cross_entropy(m(in[0]), in[1]); },
             [&](int64_t s) {
               const tx::RngKey k = tx::fold_in(tx::RngKey::from_seed(1), uint64_t(s));
               tx::Tensor y = (tx::random_uniform(tx::fold_in(k, 1), tx::Shape{B}, tx::DType::f64) * 10.0).astype(tx::DType::i64);
               return tx::TensorList{tx::random_uniform(k, tx::Shape{B, 784}), y};
             }};
      std::string extra;
      const int64_t n = steps > 0 ? steps : 50;
      auto kv = tx::bench::peer_figures(peer, tx::bench::peers_dir() + "/mlp_torch.py",
                                        "--device " + device + " --B 128 --hidden 512 --steps " + std::to_string(n), {"us_per_step"}, extra);
      if (!kv.empty()) extra = " peer=" + kv["peer"] + " peer_eager_us_per_step=" + kv["us_per_step"];
      run_case(c, n, dev, prec, extra, profile);
    }
    if (which == "gpt" || which == "both") {
      tx::nn::GPTConfig cfg{.vocab = 8192, .layers = 4, .heads = 4, .dim = 256, .seq_len = 128};
      int64_t B = 16;
      if (gpt2) cfg = {.vocab = 50304, .layers = 12, .heads = 12, .dim = 768, .seq_len = 1024};
      const int64_t T = cfg.seq_len;
      Case c{gpt2 ? "gpt2_124m" : "gpt_reference",
             "B=" + std::to_string(B) + " T=" + std::to_string(T) + " layers=" + std::to_string(cfg.layers) + " dim=" + std::to_string(cfg.dim),
             std::make_shared<tx::nn::GPT>(cfg),
             [](tx::nn::Module& m, const tx::TensorList& in) { return tx::nn::lm_loss(m, tx::Batch{{{"x", in[0]}, {"y", in[1]}}}); },
             [&](int64_t s) {
               const tx::RngKey k = tx::fold_in(tx::RngKey::from_seed(2), uint64_t(s));
               tx::Tensor t = (tx::random_uniform(k, tx::Shape{B, T + 1}, tx::DType::f64) * double(cfg.vocab)).astype(tx::DType::i64);
               return tx::TensorList{t.slice(1, 0, T).contiguous(), t.slice(1, 1, T + 1).contiguous()};
             }};
      run_case(c, steps > 0 ? steps : 5, dev, prec, "", profile);
    }
    return 0;
  });
}
