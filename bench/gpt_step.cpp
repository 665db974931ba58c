// bench/gpt_step: one training step of the GPT reference config (../shared/peers/gpt_small_torch.py:
// vocab 8192, 4 layers, dim 256, 4 heads, T 128, B 16; AdamW(0.9, 0.95), weight decay 0.1 on matrices,
// global grad-norm clip 1.0; f32) through Engine::step on random tokens. Prints one line:
//   bench=gpt_step device=cpu ranks=1 tp=1 threads=2 ... us_per_step=... peer_us_per_step=... speedup=...
// Under mpirun the model is split over TP = world size (mesh {model: n}).
// The peer (gpt_small_torch.py --device cpu on a synthetic token shard, same shapes) runs in the same
// invocation when a Python with torch is found (bench/peer.h; else peer=unavailable); its time per step
// is its total over --peer-steps steps (it reports no finer figure).
// Options: --steps N (default 20), --warmup N (default 3), --B, --T, --vocab, --dim, --layers, --heads,
// --peer-steps N (default 20), --no-peer, --lora R: also times LoRA fine-tuning of the same model (rank-R
// adapters on every block's qkv, proj, fc and out; the rest frozen), adding lora_us_per_step,
// lora_of_full (the full step's time over the LoRA step's, from the same run), and the peak memory of
// each run from the model's construction on (weights, optimizer state, one step's activations and
// gradients: full_peak_mb, lora_peak_mb; the CPU allocator's statistics). --zero (under mpirun): data
// parallelism over the n ranks (mesh {data: n}, each rank its own B rows) instead of TP, timed with the
// gradients all-reduced and with the optimizer state sharded (DP::shard_optimizer, ZeRO-1) in the same
// run: dp_us_per_step, zero_us_per_step, dp_peak_mb, zero_peak_mb (rank 0's allocator peak),
// dp_opt_state_mb, zero_opt_state_mb (rank 0's optimizer state), and a checkpoint save after the
// timed steps (Engine::save into a temporary directory, removed after): dp_save_ms, zero_save_ms, and
// dp_save_peak_mb, zero_save_peak_mb (rank 0's allocator peak during the save, over what it held
// before); then the same save through Engine::save_async: dp/zero_async_save_ms (until the call returns:
// the copy to host memory), dp/zero_async_save_peak_mb (that copy), dp/zero_async_step_us (one step taken
// while the shards are written) and dp/zero_async_commit_ms (from the call until wait() committed it).
// --bf16: bf16 autocast (f32 master weights, EngineOptions::precision) instead of f32. Every run prints peak_mb, its peak memory.
// --loss-chunk N: also times the same step with the loss head in chunks of N tokens
// (GPTConfig::loss_chunk_tokens), adding chunk_us_per_step, chunk_of_full (the whole head's time over
// the chunked one's) and chunk_peak_mb. --jit: every run compiles the step (EngineOptions::jit; the
// replays' arena counts in the peaks); every line says jit=0 or 1. step_peak_mb (chunk_step_peak_mb):
// the peak over the timed steps alone, after the warm-up (under jit the first step traces, holding every
// tensor of the trace: the replays' peak is this one).
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <unistd.h>
#include <string>

#include <titanax/titanax.h>

#include "engine/engine.h"
#include "engine/gpt.h"
#include "peer.h"

namespace tx = titanax;

namespace {
// An llm.c / nanoGPT token shard: 256 int32 header (20240520, 1, count), then uint16 tokens.
void write_shard(const std::string& path, int64_t count, int64_t vocab, uint64_t seed) {
  std::vector<int32_t> header(256, 0);
  header[0] = 20240520;
  header[1] = 1;
  header[2] = int32_t(count);
  auto u = tx::random_uniform(tx::RngKey::from_seed(seed), tx::Shape{count}, tx::DType::f64).to_vector<double>();
  std::vector<uint16_t> tok(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) tok[size_t(i)] = uint16_t(std::min<int64_t>(vocab - 1, int64_t(u[size_t(i)] * double(vocab))));
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(header.data()), 1024);
  f.write(reinterpret_cast<const char*>(tok.data()), std::streamsize(tok.size() * 2));
}
}  // namespace

int main(int argc, char** argv) {
  int64_t steps = 20, warmup = 3, peer_steps = 20;
  tx::nn::GPTConfig cfg;  // the reference config
  int64_t B = 16, lora = 0, loss_chunk = 0;
  bool peer = true, zero = false, bf16 = false, jit = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&] { return std::stoll(argv[++i]); };
    if (i + 1 < argc && a == "--steps") steps = next();
    else if (i + 1 < argc && a == "--warmup") warmup = next();
    else if (i + 1 < argc && a == "--peer-steps") peer_steps = next();
    else if (i + 1 < argc && a == "--B") B = next();
    else if (i + 1 < argc && a == "--T") cfg.seq_len = next();
    else if (i + 1 < argc && a == "--vocab") cfg.vocab = next();
    else if (i + 1 < argc && a == "--dim") cfg.dim = next();
    else if (i + 1 < argc && a == "--layers") cfg.layers = next();
    else if (i + 1 < argc && a == "--heads") cfg.heads = next();
    else if (i + 1 < argc && a == "--lora") lora = next();
    else if (i + 1 < argc && a == "--loss-chunk") loss_chunk = next();
    else if (a == "--no-peer") peer = false;
    else if (a == "--zero") zero = true;
    else if (a == "--bf16") bf16 = true;
    else if (a == "--jit") jit = true;
    else {
      std::fprintf(stderr, "usage: gpt_step [--steps N] [--warmup N] [--B N] [--T N] [--vocab N] [--dim N] [--layers N] "
                           "[--heads N] [--peer-steps N] [--no-peer] [--lora R] [--loss-chunk N] [--zero] [--bf16] [--jit]\n");
      return 2;
    }
  }
  return tx::bench::guarded([&] {
    tx::Runtime rt(argc, argv);
    const int n = rt.world_size();
    const bool tp = n > 1 && !zero;
    tx::Mesh mesh = tp ? tx::MeshSpec{{"model"}, {n}}.build(rt) : tx::MeshSpec{{"data"}, {n}}.build(rt);
    tx::Plan plan;
    if (tp) plan.tp = tx::TP{"model", tx::nn::GPT::sharding_rules("model")};
    else plan.dp = tx::DP{"data"};
    const int64_t T = cfg.seq_len;
    auto batch = [&](int64_t i) {  // DP: each rank its own rows
      const uint64_t seed = uint64_t(100 + i) + (tp ? 0 : 100000 * uint64_t(rt.rank()));
      tx::Tensor u = tx::random_uniform(tx::RngKey::from_seed(seed), tx::Shape{B, T + 1}, tx::DType::f64);
      auto uv = u.to_vector<double>();
      std::vector<int64_t> v(uv.size());
      for (size_t k = 0; k < v.size(); ++k) v[k] = std::min<int64_t>(cfg.vocab - 1, int64_t(uv[k] * double(cfg.vocab)));
      tx::Tensor w = tx::from_vector(v, tx::Shape{B, T + 1});
      return tx::Batch{{{"x", w.slice(1, 0, T).contiguous()}, {"y", w.slice(1, 1, T + 1).contiguous()}}};
    };
    // The mean and best microseconds per Engine::step of a model of config c, and its last loss.
    struct Timing {
      double mean = 0, best = 1e300, loss = 0, peak_mb = 0, opt_state_mb = 0, step_peak_mb = 0, save_ms = 0, save_peak_mb = 0;
      double async_save_ms = 0, async_save_peak_mb = 0, async_step_us = 0, async_commit_ms = 0;
    };
    namespace fs = std::filesystem;
    // --zero: where the runs save a checkpoint (one directory for all ranks: rank 0's name).
    const fs::path ckpt_dir =
        rt.world()->all_gather_string((fs::temp_directory_path() / ("titanax_gpt_bench_ckpt_" + std::to_string(::getpid()))).string())[0];
    tx::Allocator& alloc = tx::allocator_for(tx::Device::cpu());
    auto time_steps = [&](const tx::nn::GPTConfig& c, const tx::Plan& pl) {
      const int64_t before = alloc.stats().current_bytes;
      alloc.reset_peak();
      std::unique_ptr<tx::nn::GPT> model = tp ? std::make_unique<tx::nn::GPT>(c, mesh) : std::make_unique<tx::nn::GPT>(c);
      auto opt = tx::optim::adamw(tx::optim::warmup_cosine(1e-3, 100, 2000, 0.1),
                                  {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1,
                                   .decay_filter = [](const std::string&, const tx::Tensor& t) { return t.dim() >= 2; }});
      auto ckpt = zero ? std::make_shared<tx::Checkpointer>(ckpt_dir.string(), 1, rt.world()) : nullptr;
      tx::Engine engine(mesh, pl, std::move(opt),
                        {.precision = bf16 ? tx::Precision::bf16() : tx::Precision::f32(),
                         .checkpointer = ckpt,
                         .grad_clip = 1.0,
                         .jit = jit});
      Timing t;
      for (int64_t i = 0; i < warmup; ++i) t.loss = engine.step(*model, tx::nn::lm_loss, batch(i)).loss;
      const double warm_peak = double(alloc.stats().peak_bytes);
      alloc.reset_peak();
      for (int64_t i = 0; i < steps; ++i) {
        tx::Batch b = batch(warmup + i);
        auto t0 = std::chrono::steady_clock::now();
        t.loss = engine.step(*model, tx::nn::lm_loss, b).loss;
        double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
        t.mean += us / double(steps);
        t.best = std::min(t.best, us);
      }
      t.step_peak_mb = double(alloc.stats().peak_bytes - before) / (1 << 20);
      t.peak_mb = (std::max(warm_peak, double(alloc.stats().peak_bytes)) - double(before)) / (1 << 20);
      for (const auto& [name, v] : engine.optimizer().state()) t.opt_state_mb += double(v.nbytes()) / (1 << 20);
      if (zero) {
        const int64_t held = alloc.stats().current_bytes;
        alloc.reset_peak();
        auto t0 = std::chrono::steady_clock::now();
        engine.save(*model);
        t.save_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        t.save_peak_mb = double(alloc.stats().peak_bytes - held) / (1 << 20);
        rt.world()->barrier();
        if (rt.rank() == 0) fs::remove_all(ckpt_dir);
        // The same save in the background: the call's time and memory (the host copies), one step taken
        // while the shards are written, and the time until the checkpoint is committed.
        const int64_t held_async = alloc.stats().current_bytes;
        alloc.reset_peak();
        t0 = std::chrono::steady_clock::now();
        engine.save_async(*model);
        auto t1 = std::chrono::steady_clock::now();
        t.async_save_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
        t.async_save_peak_mb = double(alloc.stats().peak_bytes - held_async) / (1 << 20);
        engine.step(*model, tx::nn::lm_loss, batch(warmup + steps));
        t.async_step_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t1).count();
        ckpt->wait();
        t.async_commit_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        rt.world()->barrier();
        if (rt.rank() == 0) fs::remove_all(ckpt_dir);
      }
      return t;
    };
    const Timing full = time_steps(cfg, plan);
    const double us = full.mean, best = full.best;
    char buf[1024];
    std::snprintf(buf, sizeof buf,
                  "bench=gpt_step device=cpu ranks=%d tp=%d threads=%d vocab=%lld layers=%lld dim=%lld heads=%lld T=%lld B=%lld "
                  "steps=%lld precision=%s us_per_step=%.0f best_us=%.0f tokens_per_s=%.0f loss=%.4f minutes_per_2000_steps=%.1f "
                  "peak_mb=%.1f step_peak_mb=%.1f jit=%d",
                  n, tp ? n : 1, omp_get_max_threads(), (long long)cfg.vocab, (long long)cfg.layers, (long long)cfg.dim,
                  (long long)cfg.heads, (long long)T, (long long)B, (long long)steps, bf16 ? "bf16" : "f32", us, best,
                  double(B * T) * 1e6 / us, full.loss, us * 2000 / 6e7, full.peak_mb, full.step_peak_mb, int(jit));
    std::string line = buf;
    if (lora > 0) {
      tx::nn::GPTConfig lc = cfg;
      lc.lora_rank = lora;
      lc.lora_alpha = double(2 * lora);
      lc.lora_targets = {"attn/qkv", "attn/proj", "mlp/fc", "mlp/out"};
      const Timing l = time_steps(lc, plan);
      std::snprintf(buf, sizeof buf,
                    " lora_rank=%lld lora_us_per_step=%.0f lora_best_us=%.0f lora_of_full=%.2f full_peak_mb=%.1f lora_peak_mb=%.1f",
                    (long long)lora, l.mean, l.best, us / l.mean, full.peak_mb, l.peak_mb);
      line += buf;
    }
    if (loss_chunk > 0) {
      tx::nn::GPTConfig cc = cfg;
      cc.loss_chunk_tokens = loss_chunk;
      const Timing c = time_steps(cc, plan);
      std::snprintf(buf, sizeof buf, " loss_chunk=%lld chunk_us_per_step=%.0f chunk_of_full=%.2f chunk_peak_mb=%.1f chunk_step_peak_mb=%.1f",
                    (long long)loss_chunk, c.mean, us / c.mean, c.peak_mb, c.step_peak_mb);
      line += buf;
    }
    if (zero) {
      tx::Plan sharded = plan;
      sharded.dp->shard_optimizer = true;
      const Timing z = time_steps(cfg, sharded);
      std::snprintf(buf, sizeof buf,
                    " dp=%d dp_us_per_step=%.0f zero_us_per_step=%.0f zero_of_dp=%.2f dp_peak_mb=%.1f zero_peak_mb=%.1f "
                    "dp_opt_state_mb=%.1f zero_opt_state_mb=%.1f dp_save_ms=%.0f zero_save_ms=%.0f dp_save_peak_mb=%.1f "
                    "zero_save_peak_mb=%.1f dp_async_save_ms=%.0f zero_async_save_ms=%.0f dp_async_save_peak_mb=%.1f "
                    "zero_async_save_peak_mb=%.1f dp_async_step_us=%.0f zero_async_step_us=%.0f dp_async_commit_ms=%.0f "
                    "zero_async_commit_ms=%.0f",
                    n, us, z.mean, us / z.mean, full.peak_mb, z.peak_mb, full.opt_state_mb, z.opt_state_mb, full.save_ms,
                    z.save_ms, full.save_peak_mb, z.save_peak_mb, full.async_save_ms, z.async_save_ms,
                    full.async_save_peak_mb, z.async_save_peak_mb, full.async_step_us, z.async_step_us,
                    full.async_commit_ms, z.async_commit_ms);
      line += buf;
    }
    const fs::path tmp = fs::temp_directory_path() / ("titanax_gpt_bench_" + std::to_string(::getpid()));
    const bool run_peer = peer && n == 1;  // the peer is one process
    if (run_peer) {
      fs::create_directories(tmp);
      write_shard((tmp / "train.bin").string(), (peer_steps + 2) * B * T + T + 2, cfg.vocab, 1);
      write_shard((tmp / "val.bin").string(), 64 * T, cfg.vocab, 2);
    }
    auto kv = tx::bench::peer_figures(run_peer, tx::bench::peers_dir() + "/gpt_small_torch.py",
                                      "--device cpu --train " + (tmp / "train.bin").string() + " --val " + (tmp / "val.bin").string() +
                                          " --steps " + std::to_string(peer_steps) + " --val_batches 1 --B " + std::to_string(B) +
                                          " --T " + std::to_string(T) + " --vocab " + std::to_string(cfg.vocab) + " --dim " +
                                          std::to_string(cfg.dim) + " --layers " + std::to_string(cfg.layers) + " --heads " +
                                          std::to_string(cfg.heads),
                                      {"seconds"}, line);
    if (run_peer) fs::remove_all(tmp);
    if (!kv.empty()) {
      double peer_us = std::stod(kv["seconds"]) * 1e6 / double(peer_steps);
      std::snprintf(buf, sizeof buf, " peer=torch peer_us_per_step=%.0f speedup=%.2f", peer_us, peer_us / us);
      line += buf;
    }
    if (rt.is_main()) std::printf("%s\n", line.c_str());
    return 0;
  });
}
