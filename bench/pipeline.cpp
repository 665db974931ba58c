// bench/pipeline: pipeline parallelism on the GPT reference config (vocab 8192, 4 layers, dim 256,
// 4 heads, T 128; AdamW, clip 1.0; f32, one thread per rank) over S = the ranks of this launch
// (mesh {pipe: S}), for M microbatches of --mb sequences each. Run under mpirun -np S (S = 1, 2, 4).
// Stages: an even split of the 4 blocks, or --boundaries. In the same run, rank 0 first times PP = 1 alone (the whole model, the same global batch of M x mb
// sequences as one stage with the same M microbatches) while the other ranks wait, then all ranks run
// the pipeline. One line per M:
//   bench=pipeline stages=S microbatches=M schedule=1f1b ideal_bubble=(S-1)/(M+S-1) measured_bubble=...
//   step_ms=... tokens_per_s=... pp1_tokens_per_s=... throughput_vs_pp1=... cores=...
// measured_bubble: 1 - (time in forwards and backwards) / (step time), averaged over the stages (what
// the stages did not compute: the schedule's bubble plus message waits and transfers).
// Options: --microbatches 4,8,16  --mb 2  --steps 4  --warmup 1  --schedule 1f1b|gpipe  --no-pp1
//          --boundaries 3[,..]  (the first block of each stage after the first; default: an even split)
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <titanax/titanax.h>

#include "engine/engine.h"
#include "engine/gpt.h"

namespace tx = titanax;

namespace {

tx::nn::GPTConfig config() {
  tx::nn::GPTConfig c;
  c.tp_axis = "";
  c.pp_axis = "pipe";
  return c;
}

tx::Batch batch(int64_t B, int64_t T, int64_t vocab, uint64_t seed) {
  auto ids = [&](uint64_t s) {
    auto u = tx::random_uniform(tx::RngKey::from_seed(s), tx::Shape{B, T}, tx::DType::f64).to_vector<double>();
    std::vector<int64_t> v;
    for (double x : u) v.push_back(std::min<int64_t>(vocab - 1, int64_t(x * double(vocab))));
    return tx::from_vector(v, tx::Shape{B, T});
  };
  return tx::Batch{{{"x", ids(seed)}, {"y", ids(seed + 1)}}};
}

std::unique_ptr<tx::optim::Optimizer> adamw() {
  return tx::optim::adamw(tx::optim::constant(1e-3), {.beta1 = 0.9, .beta2 = 0.95, .weight_decay = 0.1});
}

struct Timing {
  double step_s = 0, bubble = 0;
};

// Seconds per step of `steps` timed steps after `warmup` ones, and this rank's mean bubble fraction.
Timing time_steps(tx::Engine& eng, tx::nn::GPT& model, const tx::Batch& b, int warmup, int steps) {
  for (int i = 0; i < warmup; ++i) eng.step(model, tx::nn::lm_loss, b);
  Timing t;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) {
    eng.step(model, tx::nn::lm_loss, b);
    t.bubble += eng.last_pipeline_stats().bubble_fraction() / steps;
  }
  t.step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps;
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  tx::Runtime rt(argc, argv);
  std::vector<int> Ms{4, 8, 16};
  int mb = 2, steps = 4, warmup = 1;
  bool pp1 = true;
  std::vector<int64_t> boundaries;
  tx::PipelineSchedule schedule = tx::PipelineSchedule::one_f_one_b;
  for (int i = 1; i < argc; ++i) {
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (!std::strcmp(argv[i], "--microbatches")) {
      Ms.clear();
      std::stringstream ss(next());
      for (std::string x; std::getline(ss, x, ',');) Ms.push_back(std::stoi(x));
    } else if (!std::strcmp(argv[i], "--mb")) mb = std::stoi(next());
    else if (!std::strcmp(argv[i], "--steps")) steps = std::stoi(next());
    else if (!std::strcmp(argv[i], "--warmup")) warmup = std::stoi(next());
    else if (!std::strcmp(argv[i], "--schedule")) schedule = tx::parse_schedule(next());
    else if (!std::strcmp(argv[i], "--no-pp1")) pp1 = false;
    else if (!std::strcmp(argv[i], "--boundaries")) {
      std::stringstream ss(next());
      for (std::string x; std::getline(ss, x, ',');) boundaries.push_back(std::stoll(x));
    }
  }
  omp_set_num_threads(1);
  const int S = rt.world_size();
  tx::Mesh mesh = tx::MeshSpec{{"pipe"}, {S}}.build(rt);
  tx::Mesh solo = tx::MeshSpec{{"pipe"}, {1}}.build(tx::make_local_communicator());
  tx::nn::GPTConfig cfg = config();
  cfg.pp_boundaries = boundaries;
  for (int M : Ms) {
    const tx::Batch b = batch(int64_t(M) * mb, cfg.seq_len, cfg.vocab, uint64_t(M));
    const double tokens = double(M) * mb * double(cfg.seq_len);
    double pp1_tps = 0;
    if (pp1 && rt.rank() == 0) {
      tx::nn::GPTConfig one = cfg;
      one.pp_boundaries.clear();
      tx::nn::GPT whole(one, solo);
      tx::Engine eng(solo, tx::Plan{.pp = tx::PP{"pipe", M}}, adamw(), {.grad_clip = 1.0});
      pp1_tps = tokens / time_steps(eng, whole, b, warmup, steps).step_s;
    }
    rt.world()->barrier();
    tx::nn::GPT staged(cfg, mesh);
    tx::Engine eng(mesh, tx::Plan{.pp = tx::PP{.axis = "pipe", .microbatches = M, .schedule = schedule}}, adamw(),
                   {.grad_clip = 1.0});
    Timing t = time_steps(eng, staged, b, warmup, steps);
    tx::Tensor v = tx::from_vector(std::vector<double>{t.bubble, t.step_s}, tx::Shape{2});
    rt.world()->all_reduce(v);
    const double bubble = v.to_vector<double>()[0] / S, step_s = v.to_vector<double>()[1] / S;
    if (rt.rank() == 0) {
      std::string split = "even";
      for (size_t k = 0; k < boundaries.size(); ++k) split = (k ? split + "," : "") + std::to_string(boundaries[k]);
      std::printf("bench=pipeline stages=%d split=%s microbatches=%d microbatch_size=%d schedule=%s ideal_bubble=%.3f "
                  "measured_bubble=%.3f step_ms=%.1f tokens_per_s=%.0f",
                  S, split.c_str(), M, mb, tx::schedule_name(schedule), tx::ideal_bubble_fraction(S, M), bubble, 1e3 * step_s,
                  tokens / step_s);
      if (pp1) std::printf(" pp1_tokens_per_s=%.0f throughput_vs_pp1=%.2f", pp1_tps, tokens / step_s / pp1_tps);
      std::printf(" threads_per_rank=1 cores=%u\n", std::thread::hardware_concurrency());
      std::fflush(stdout);
    }
  }
  return 0;
}
