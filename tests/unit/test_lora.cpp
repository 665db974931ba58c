// Frozen parameters (nn::Module::set_trainable) and LoRA adapters (engine/tp_layers.h, GPTConfig::lora_rank)
// on one rank: what is trainable, an Engine step against an unfrozen one (eager and under jit), the
// adapter's function against the merged weight it stands for, gradients against finite differences
// (f64), GPT::merge_lora and the Hugging Face export against the unmerged model, fine-tuning under the
// Engine with a bitwise resume. The tensor-parallel split of the adapters: tests/mpi/test_mpi_tp.cpp.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <algorithm>
#include <functional>

#include "engine/engine.h"
#include "engine/gpt.h"
#include "engine/gpt_pretrained.h"
#include "op_cases.h"
#include "test_util.h"

using namespace titanax;
using Catch::Matchers::Contains;
using testing::catch_error;

namespace {

Mesh single_rank() { return MeshSpec{{"data"}, {1}}.build(make_local_communicator()); }

std::vector<double> vals(const Tensor& t) { return t.astype(DType::f64).contiguous().to_vector<double>(); }

double max_abs_diff(const Tensor& a, const Tensor& b) {
  REQUIRE(a.shape() == b.shape());
  const auto va = vals(a), vb = vals(b);
  double m = 0;
  for (size_t i = 0; i < va.size(); ++i) m = std::max(m, std::fabs(va[i] - vb[i]));
  return m;
}

bool is_adapter(const std::string& p) {
  return p.size() > 7 && (p.compare(p.size() - 7, 7, "/lora_a") == 0 || p.compare(p.size() - 7, 7, "/lora_b") == 0);
}

ParamTree snapshot(const nn::Module& m) {
  return m.parameters().map([](const std::string&, const Tensor& t) { return t.clone(); });
}

nn::GPTConfig tiny_lora(DType dt) {
  nn::GPTConfig c;
  c.vocab = 16;
  c.layers = 2;
  c.heads = 2;
  c.dim = 8;
  c.seq_len = 6;
  c.dtype = dt;
  c.lora_rank = 2;
  c.lora_alpha = 3;
  c.lora_targets = {"attn/qkv", "attn/proj", "mlp/fc", "mlp/out"};
  return c;
}

Tensor ids(uint64_t seed, int64_t B, int64_t T, int64_t vocab) { return testing::randint(RngKey::from_seed(seed), Shape{B, T}, vocab); }

// The parameters of `m` that `pick` selects, drawn afresh with std `scale` (the same for the same path).
void randomize(nn::Module& m, double scale, const std::function<bool(const std::string&, const Tensor&)>& pick) {
  NoGradGuard ng;
  for (auto& [p, t] : m.parameters())
    if (pick(p, t))
      copy_(t, testing::randn64(RngKey::from_seed(std::hash<std::string>{}(p) + 7), t.shape(), scale).astype(t.dtype()));
}
// Every parameter (so no term of the model is zero).
bool every(const std::string&, const Tensor&) { return true; }
// The base model's matrices (layer norms stay 1 and 0, adapters as initialised).
bool base_matrices(const std::string& p, const Tensor& t) { return t.dim() >= 2 && !is_adapter(p); }


}  // namespace

TEST_CASE("set_trainable freezes parameters by glob, and trainable_parameters leaves them out", "[engine][nn][freeze]") {
  nn::MLP m({6, 8, 8, 3});
  CHECK(m.trainable_parameters().paths() == m.parameters().paths());
  CHECK(m.set_trainable("layers/0/**", false) == 2);
  CHECK(m.trainable_parameters().paths() ==
        std::vector<std::string>{"layers/1/weight", "layers/1/bias", "layers/2/weight", "layers/2/bias"});
  CHECK(m.set_trainable("**/bias", false) == 3);
  CHECK(m.trainable_parameters().paths() == std::vector<std::string>{"layers/1/weight", "layers/2/weight"});
  CHECK(m.parameters().size() == 6);  // frozen ones are still the model's
  const std::string tree = m.describe();
  INFO(tree);
  CHECK_THAT(tree, Contains("Linear(6 -> 8, bias)  [56 params, frozen]") && Contains("Linear(8 -> 8, bias)  [72 params, 8 frozen]") &&
                       Contains("Linear(8 -> 3, bias)  [27 params, 3 frozen]"));
  CHECK(m.set_trainable("**", true) == 6);
  CHECK(m.trainable_parameters().paths() == m.parameters().paths());
  const std::string e = catch_error<ValueError>([&] { m.set_trainable("layer/0/**", false); }).what();
  CHECK_THAT(e, Contains("no parameter") && Contains("'layer/0/**'") && Contains("layers/0/weight"));
  CHECK(m.trainable_parameters().size() == 6);  // nothing changed
}

TEST_CASE("an Engine step leaves frozen parameters as they were and updates the others as an unfrozen step does",
          "[engine][freeze]") {
  const Tensor x = testing::randn64(RngKey::from_seed(1), Shape{16, 6}).astype(DType::f32);
  const Batch batch{{{"x", x}, {"y", testing::randint(RngKey::from_seed(2), Shape{16}, 3)}}};
  Mesh mesh = single_rank();
  for (bool jit : {false, true}) {
    INFO((jit ? "jit" : "eager"));
    nn::MLP frozen({6, 8, 8, 3}), full({6, 8, 8, 3});  // the same init
    frozen.set_trainable("layers/0/**", false);
    const ParamTree before = snapshot(frozen);
    // The gradient norm the frozen run clips and reports: that of the trainable parameters only.
    auto [l0, g0] = value_and_grad([&] { return classification_loss(full, batch); }, full.parameters());
    ParamTree trained;
    for (const auto& [p, g] : g0)
      if (p.rfind("layers/0/", 0) != 0) trained.insert(p, g);

    Engine a(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-2)), {.jit = jit});
    Engine b(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-2)));
    const StepResult ra = a.step(frozen, classification_loss, batch);
    const StepResult rb = b.step(full, classification_loss, batch);
    CHECK(ra.loss == Approx(rb.loss).epsilon(1e-6));
    CHECK(ra.grad_norm == Approx(optim::global_norm(trained)).epsilon(1e-5));
    CHECK(ra.grad_norm < rb.grad_norm);
    for (const auto& [p, t] : frozen.parameters()) {
      INFO(p);
      if (p.rfind("layers/0/", 0) == 0) {
        CHECK(vals(t) == vals(before.at(p)));  // bitwise
      } else {
        CHECK(vals(t) != vals(before.at(p)));
      }
    }
    // The other parameters' gradients do not depend on whether layer 0's are taken: their update is the
    // full run's, bitwise eagerly (the compiled step's fused kernels round differently).
    for (const auto& p : trained.paths()) {
      INFO(p);
      if (jit) CHECK(max_abs_diff(frozen.parameters().at(p), full.parameters().at(p)) <= 1e-6);
      else CHECK(vals(frozen.parameters().at(p)) == vals(full.parameters().at(p)));
    }
    const ParamTree state = a.optimizer().state();
    CHECK(state.contains("m/layers/1/weight"));
    CHECK_FALSE(state.contains("m/layers/0/weight"));
    CHECK_FALSE(state.contains("v/layers/0/bias"));
    // Unfreezing after the first step would pair the moments with other parameters: refused, unchanged.
    frozen.set_trainable("layers/0/**", true);
    const ParamTree after_one = snapshot(frozen);
    CHECK_THAT(catch_error<ValueError>([&] { a.step(frozen, classification_loss, batch); }).what(),
               Contains("not those its state was made for") && Contains("before the first step"));
    for (const auto& [p, t] : frozen.parameters()) CHECK(vals(t) == vals(after_one.at(p)));
  }
  // Nothing left to train is refused before any work.
  nn::MLP all({6, 8, 3});
  all.set_trainable("**", false);
  Engine e(mesh, Plan{.dp = DP{"data", 1}}, optim::sgd(optim::constant(0.1)));
  CHECK_THAT(catch_error<PlanError>([&] { e.step(all, classification_loss, batch); }).what(), Contains("nothing to train"));
}

TEST_CASE("a LoRA adapter computes nothing at init, then x W^T + b + (alpha / r) x A^T B^T", "[nn][lora]") {
  const Tensor x = testing::randn64(RngKey::from_seed(3), Shape{2, 5, 6});
  SECTION("column-parallel, 3 groups (qkv)") {
    nn::ColumnParallelLinear l(6, 9, {}, true, 3, 0.5, DType::f64);
    const Tensor w = l.weight.clone(), y0 = l(x);
    l.add_lora(2, 3.0);
    CHECK(vals(l.weight) == vals(w));  // the layer's own weights are left alone
    CHECK(l.lora_a.shape() == Shape{2, 6});
    CHECK(l.lora_b.shape() == Shape{3, 3, 2});
    for (double v : vals(l.lora_a)) CHECK(std::fabs(v) <= 1 / std::sqrt(6.0));
    CHECK(vals(l.lora_b) == std::vector<double>(18, 0.0));
    CHECK(vals(l(x)) == vals(y0));  // a fresh adapter adds exact zeros
    copy_(l.lora_b, testing::randn64(RngKey::from_seed(4), l.lora_b.shape()));
    const Tensor merged = add(w.reshape(Shape{9, 6}), matmul(l.lora_b.reshape(Shape{9, 2}), l.lora_a) * 1.5);
    CHECK(max_abs_diff(l(x), linear(x, merged, l.bias.reshape(Shape{9}))) <= 1e-12);
    CHECK_THAT(catch_error<ValueError>([&] { l.add_lora(2, 3.0); }).what(), Contains("second LoRA adapter"));
    CHECK_THAT(l.name(), Contains("LoRA r=2"));
  }
  SECTION("row-parallel") {
    nn::RowParallelLinear l(6, 4, {}, true, 0.5, DType::f64);
    const Tensor w = l.weight.clone(), y0 = l(x);
    l.add_lora(3, 1.5);
    CHECK(l.lora_a.shape() == Shape{3, 6});
    CHECK(l.lora_b.shape() == Shape{4, 3});
    CHECK(vals(l(x)) == vals(y0));
    copy_(l.lora_b, testing::randn64(RngKey::from_seed(5), l.lora_b.shape()));
    const Tensor merged = add(w, matmul(l.lora_b, l.lora_a) * 0.5);
    CHECK(max_abs_diff(l(x), linear(x, merged, l.bias)) <= 1e-12);
  }
  SECTION("input dropout in training (PEFT's lora_dropout)") {
    nn::RowParallelLinear l(6, 4, {}, true, 0.5, DType::f64), plain(6, 4, {}, true, 0.5, DType::f64);
    l.add_lora(2, 2.0, 0.5);
    plain.add_lora(2, 2.0);
    CHECK(l.stochastic());
    CHECK_FALSE(plain.stochastic());
    copy_(l.lora_b, testing::randn64(RngKey::from_seed(6), l.lora_b.shape()));
    copy_(plain.lora_a, l.lora_a);
    copy_(plain.lora_b, l.lora_b);
    const RngKey key = RngKey::from_seed(77);
    // Training: the adapter sees x through nn::Dropout(0.5) with the same key; the layer's own product all of x.
    nn::RngContext::set(key);
    const Tensor y = l(x);
    nn::RngContext::set(key);
    const Tensor xd = nn::Dropout(0.5)(x);
    CHECK(max_abs_diff(y, add(linear(x, l.weight, l.bias), linear(linear(xd, l.lora_a), l.lora_b))) <= 1e-12);
    const auto kept = vals(xd);
    const double dropped = double(std::count(kept.begin(), kept.end(), 0.0)) / double(kept.size());
    CHECK(dropped > 0.3);
    CHECK(dropped < 0.7);
    // Evaluation: no dropout, the plain adapter's output.
    l.eval();
    plain.eval();
    CHECK(vals(l(x)) == vals(plain(x)));
    CHECK_THAT(l.name(), Contains("dropout 0.5"));
    CHECK_THAT(catch_error<ValueError>([&] { nn::RowParallelLinear(6, 4).add_lora(2, 2.0, 1.0); }).what(),
               Contains("dropout must lie in [0, 1)"));
  }
  SECTION("bad ranks and scales") {
    nn::ColumnParallelLinear l(6, 9, {}, true, 3, 0.02, DType::f64);
    CHECK_THAT(catch_error<ValueError>([&] { l.add_lora(0, 1.0); }).what(), Contains("rank out of range"));
    CHECK_THAT(catch_error<ValueError>([&] { l.add_lora(4, 1.0); }).what(), Contains("min(in, out) = 3"));
    CHECK_THAT(catch_error<ValueError>([&] { l.add_lora(2, 0.0); }).what(), Contains("alpha"));
    CHECK_THAT(catch_error<ValueError>([&] { l.add_lora(2, NAN); }).what(), Contains("alpha"));
    CHECK_FALSE(l.lora_a.defined());
  }
}

TEST_CASE("a LoRA GPT: only the adapters train, their gradients match finite differences, merged it computes the same",
          "[gpt][lora][gradcheck]") {
  const nn::GPTConfig cfg = tiny_lora(DType::f64);
  nn::GPT m(cfg), base(cfg.without_lora());
  const Tensor x = ids(1, 2, 6, cfg.vocab), y = ids(2, 2, 6, cfg.vocab);
  // Trainable: the 2 x 4 adapters of each block; the base parameters start as the base model's.
  const ParamTree trainable = m.trainable_parameters();
  CHECK(trainable.size() == size_t(2 * 4 * cfg.layers));
  for (const auto& p : trainable.paths()) CHECK(is_adapter(p));
  for (const auto& [p, t] : base.parameters()) CHECK(vals(m.parameters().at(p)) == vals(t));
  CHECK(vals(m(x)) == vals(base(x)));  // lora_b = 0

  randomize(m, 0.5, every);
  // Directional derivatives of the loss along random directions of the adapters: central differences
  // against the gradient's inner product with the direction.
  auto [loss, g] = value_and_grad([&] { return m.loss(x, y); }, trainable);
  for (uint64_t d = 0; d < 3; ++d) {
    NoGradGuard ng;
    ParamTree dir = trainable.map([&](const std::string& p, const Tensor& t) {
      return testing::randn64(RngKey::from_seed(100 * d + std::hash<std::string>{}(p)), t.shape());
    });
    double analytic = 0;
    for (const auto& [p, v] : dir) analytic += sum(mul(g.at(p), v)).item();
    const double h = 1e-6;
    const ParamTree at = trainable.map([](const std::string&, const Tensor& t) { return t.clone(); });
    auto shifted = [&](double s) {  // the loss at the adapters + s * dir; then the adapters as they were
      for (const auto& [p, v] : dir) {
        Tensor t = trainable.at(p);
        copy_(t, add(at.at(p), v * s));
      }
      const double l = m.loss(x, y).item();
      for (const auto& [p, v] : at) {
        Tensor t = trainable.at(p);
        copy_(t, v);
      }
      return l;
    };
    const double numeric = (shifted(h) - shifted(-h)) / (2 * h);
    INFO("direction " << d << ": " << analytic << " vs " << numeric);
    CHECK(std::fabs(analytic - numeric) <= 1e-6 * std::max(1.0, std::fabs(numeric)));
  }

  // Merged (PEFT's merge_and_unload): a plain GPT with W + (alpha / r) B A computes the adapted logits.
  const ParamTree merged = nn::GPT::merge_lora(m.parameters(), cfg);
  CHECK(merged.size() == base.parameters().size());
  nn::GPT plain(cfg.without_lora());
  plain.load_global_parameters(merged);
  const Tensor logits = m(x);
  CHECK(max_abs_diff(plain(x), logits) <= 1e-10);
  CHECK(vals(merged.at("lnf/bias")) == vals(m.parameters().at("lnf/bias")));
  CHECK(max_abs_diff(merged.at("blocks/0/mlp/out/weight"), m.parameters().at("blocks/0/mlp/out/weight")) > 0.1);

  // The Hugging Face export merges too (its F32 file read back into a plain f64 GPT).
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("titanax_lora_" + std::to_string(::getpid()));
  nn::write_gpt2_safetensors(m.parameters(), cfg, dir.string());
  nn::GPT read(cfg.without_lora());
  nn::load_gpt2_weights(read, (dir / "model.safetensors").string());
  double largest = 0;
  for (double v : vals(logits)) largest = std::max(largest, std::fabs(v));
  CHECK(max_abs_diff(read(x), logits) <= 1e-5 * (1 + largest));  // the file's f32 rounding
  // Base weights load into a LoRA model and leave its adapters as they are.
  nn::GPT again(cfg);
  const ParamTree adapters = snapshot(again);
  nn::load_gpt2_weights(again, (dir / "model.safetensors").string());
  for (const auto& [p, t] : again.parameters()) {
    INFO(p);
    CHECK(vals(t) == vals(is_adapter(p) ? adapters.at(p) : read.parameters().at(p)));
  }
  fs::remove_all(dir);
}

TEST_CASE("LoRA settings that do not fit the model are refused by name", "[gpt][lora]") {
  nn::GPTConfig c = tiny_lora(DType::f32);
  c.lora_targets = {"attn/qkv", "mlp/ot"};
  const std::string e = catch_error<ValueError>([&] { nn::GPT m(c); }).what();
  CHECK_THAT(e, Contains("'mlp/ot' is not a layer") && Contains("did you mean 'mlp/out'"));
  c.lora_targets = {"mlp/fc", "mlp/fc"};
  CHECK_THAT(catch_error<ValueError>([&] { nn::GPT m(c); }).what(), Contains("names 'mlp/fc' twice"));
  c.lora_targets = {};
  CHECK_THAT(catch_error<ValueError>([&] { nn::GPT m(c); }).what(), Contains("lora_targets is empty"));
  c.lora_targets = {"attn/proj"};
  c.lora_rank = 9;  // above dim 8
  CHECK_THAT(catch_error<ValueError>([&] { nn::GPT m(c); }).what(), Contains("rank out of range"));
  c.lora_rank = -1;
  CHECK_THROWS_AS(nn::GPT(c), ValueError);
  c.lora_rank = 2;
  nn::GPT m(c);
  ParamTree no_adapter;
  for (const auto& [p, t] : m.parameters())
    if (p != "blocks/1/attn/proj/lora_b") no_adapter.insert(p, t);
  CHECK_THAT(catch_error<ValueError>([&] { nn::GPT::merge_lora(no_adapter, c); }).what(),
             Contains("no tensor of global shape [8, 2] for 'blocks/1/attn/proj/lora_b'"));
  // Adapters alone: every one of them, nothing else.
  ParamTree adapters;
  for (const auto& [p, t] : m.parameters())
    if (is_adapter(p)) adapters.insert(p, t.clone());
  CHECK_NOTHROW(m.load_global_adapters(adapters));
  ParamTree with_base = adapters;
  with_base.insert("lnf/bias", m.parameters().at("lnf/bias"));
  CHECK_THAT(catch_error<ValueError>([&] { m.load_global_adapters(with_base); }).what(), Contains("'lnf/bias' is not a LoRA adapter"));
  ParamTree one_short;
  for (const auto& [p, t] : adapters)
    if (p != "blocks/0/attn/proj/lora_a") one_short.insert(p, t);
  CHECK_THAT(catch_error<ValueError>([&] { m.load_global_adapters(one_short); }).what(),
             Contains("no tensor for 'blocks/0/attn/proj/lora_a'"));
}

TEST_CASE("LoRA fine-tuning under the Engine: the base stays, the loss falls, and a resume is bitwise", "[gpt][lora][engine]") {
  namespace fs = std::filesystem;
  nn::GPTConfig cfg = tiny_lora(DType::f32);
  cfg.lora_rank = 4;
  const Batch batch{{{"x", ids(3, 4, 6, cfg.vocab)}, {"y", ids(4, 4, 6, cfg.vocab)}}};
  const fs::path dir = fs::temp_directory_path() / ("titanax_lora_resume_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  Mesh mesh = single_rank();
  auto run = [&](nn::GPT& m, int steps, bool resume, bool save) {
    Engine eng(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-1)),
               {.checkpointer = std::make_shared<Checkpointer>(dir.string(), 2), .grad_clip = 1.0});
    if (resume) REQUIRE(eng.restore(m) == 5);
    std::vector<double> losses;
    for (int s = 0; s < steps; ++s) losses.push_back(eng.step(m, nn::lm_loss, batch).loss);
    if (save) eng.save(m);
    return losses;
  };
  // A base model of weights large enough for its logits to follow the adapters (the 0.02 init's tied
  // head gives logits near 0 whatever the blocks compute).
  nn::GPT straight(cfg);
  randomize(straight, 0.3, base_matrices);
  const ParamTree start = snapshot(straight);
  const std::vector<double> losses = run(straight, 30, false, false);  // memorising one batch
  INFO("loss " << losses.front() << " -> " << losses.back());
  CHECK(losses.back() < 0.8 * losses.front());
  for (const auto& [p, t] : straight.parameters()) {
    INFO(p);
    if (is_adapter(p) && p.find("lora_b") != std::string::npos) CHECK(vals(t) != vals(start.at(p)));
    if (!is_adapter(p)) CHECK(vals(t) == vals(start.at(p)));  // bitwise
  }
  // 5 steps, a checkpoint, then 25 more from it in a fresh model and engine: the same parameters, bitwise.
  nn::GPT first(cfg), second(cfg);
  randomize(first, 0.3, base_matrices);
  run(first, 5, false, true);
  run(second, 25, true, false);
  for (const auto& [p, t] : second.parameters()) {
    INFO(p);
    CHECK(vals(t) == vals(straight.parameters().at(p)));
  }
  fs::remove_all(dir);
}
