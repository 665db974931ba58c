// Tensor parallelism under mpirun: Megatron's f / g / scatter / gather (values and gradients computed
// here from rank ids), the vocabulary-parallel embedding and cross-entropy against the unsplit ops on
// the gathered tensors, the GPT split over TP = world size (and DP x TP = 2 x 2 at 4 ranks) against
// the whole model computed on the same rank (loss and every gradient, gathered), and 20 AdamW steps
// with gradient clipping under Engine against the whole model's engine; GPT-2 weights written by one
// rank load into every rank's TP block and pipeline stage; KV-cache decoding against the whole model.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>

#include "engine/engine.h"
#include "engine/gpt.h"
#include "engine/gpt_pretrained.h"
#include "mpi_util.h"
#include "test_util.h"
#include "parallel/sharding.h"
#include "parallel/tp.h"

using namespace titanax;
using namespace mpitest;
using Catch::Matchers::Contains;

namespace {

/// {model: n}; at 4 ranks also {data: 2, model: 2}.
std::vector<MeshCase> tp_cases() {
  const int n = world_size();
  std::vector<MeshCase> c{{{"model"}, {n}}};
  if (n == 4) c.push_back({{"data", "model"}, {2, 2}});
  return c;
}

Tensor randn(uint64_t seed, const Shape& s, DType dt = DType::f64, double scale = 1.0) {
  return (random_normal(RngKey::from_seed(seed), s, DType::f64) * scale).astype(dt);
}
Tensor randint(uint64_t seed, const Shape& s, int64_t n) {
  std::vector<int64_t> v(size_t(s.numel()));
  Tensor u = random_uniform(RngKey::from_seed(seed), s, DType::f64);
  auto uv = u.to_vector<double>();
  for (size_t i = 0; i < v.size(); ++i) v[i] = std::min<int64_t>(n - 1, int64_t(uv[i] * double(n)));
  return from_vector(v, s);
}

/// max |a - b| <= rtol * max |b| (+ atol): relative to the tensor's scale.
void check_rel(const Tensor& a, const Tensor& b, double rtol, const std::string& what, double atol = 0) {
  INFO(what << " " << a.shape().str() << " vs " << b.shape().str());
  REQUIRE(a.shape() == b.shape());
  auto va = a.contiguous().to_vector<double>(), vb = b.contiguous().to_vector<double>();
  double scale = 0, err = 0;
  for (size_t i = 0; i < va.size(); ++i) {
    scale = std::max(scale, std::fabs(vb[i]));
    err = std::max(err, std::fabs(va[i] - vb[i]));
  }
  INFO("max abs error " << err << " scale " << scale);
  CHECK(err <= rtol * scale + atol);
}

nn::GPTConfig small(DType dt) {
  nn::GPTConfig c;
  c.vocab = 64;
  c.layers = 2;
  c.heads = 4;
  c.dim = 32;
  c.seq_len = 16;
  c.dtype = dt;
  return c;
}

}  // namespace

TEST_CASE("f and g: identity / psum forward, psum / identity backward", "[mpi][tp]") {
  const int r = world_rank();
  for (const auto& mc : tp_cases()) {
    INFO(mc.name());
    Mesh mesh = MeshSpec{mc.axes, mc.shape}.build(rt());
    std::vector<int> group = group_of(mc.shape, r, mc.axes.size() - 1);
    double csum = 0;
    for (int g : group) csum += g + 1;
    Tensor x = value_of(r, Shape{3});
    x.set_requires_grad();
    // f: y = x; d sum((r + 1) * y) / dx = sum over the group of (g + 1).
    Tensor y = copy_to_tensor_parallel_region(mesh, x, "model");
    CHECK(vals(y) == vals(x));
    TensorList gx = grad(sum(y * double(r + 1)), {x});
    for (double v : vals(gx[0])) CHECK(v == csum);
    // g: y = sum over the group of x_g; the gradient passes through unchanged: (r + 1).
    Tensor z = reduce_from_tensor_parallel_region(mesh, x, "model");
    std::vector<double> want(3, 0.0);
    for (int g : group)
      for (int i = 0; i < 3; ++i) want[size_t(i)] += vals(value_of(g, Shape{3}))[size_t(i)];
    CHECK(vals(z) == want);
    gx = grad(sum(z * double(r + 1)), {x});
    for (double v : vals(gx[0])) CHECK(v == double(r + 1));
    // scatter / gather along the last dim: each other's transposes.
    const int n = int(group.size()), me = mesh.axis_index("model");
    Tensor full = randn(7, Shape{2, 2 * n});
    full.set_requires_grad();
    Tensor part = scatter_to_tensor_parallel_region(mesh, full, "model");
    CHECK(vals(part) == vals(full.detach().slice(1, 2 * me, 2 * me + 2).contiguous()));
    Tensor back = gather_from_tensor_parallel_region(mesh, part, "model");
    CHECK(vals(back) == vals(full.detach()));
    Tensor c = randn(8, Shape{2, 2 * n});  // the same on every rank: a replicated downstream loss
    TensorList gf = grad(sum(back * c), {full});
    CHECK(vals(gf[0]) == vals(c));
  }
}

TEST_CASE("vocab-parallel embedding and cross-entropy equal the unsplit ops", "[mpi][tp]") {
  for (const auto& mc : tp_cases()) {
    INFO(mc.name());
    Mesh mesh = MeshSpec{mc.axes, mc.shape}.build(rt());
    const int n = mesh.axis_size("model");
    const int64_t V = 8 * n, D = 5, R = 12;
    // Embedding: the full table is the same everywhere; each rank holds its rows.
    Tensor table = randn(1, Shape{V, D});
    Tensor local = shard_of(table, {"model", ""}, mesh).contiguous().detach();
    local.set_requires_grad();
    Tensor whole = table.detach().clone().detach();
    whole.set_requires_grad();
    Tensor ids = randint(2, Shape{3, 4}, V);
    Tensor c = randn(3, Shape{3, 4, D});
    Tensor a = vocab_parallel_embedding(mesh, local, ids, "model");
    Tensor b = embedding(whole, ids);
    check_rel(a, b, 1e-15, "embedding");
    Tensor ga = grad(sum(a * c), {local})[0], gb = grad(sum(b * c), {whole})[0];
    check_rel(ga, shard_of(gb, {"model", ""}, mesh), 1e-15, "embedding grad");
    CHECK_THROWS_AS(vocab_parallel_embedding(mesh, local, full(Shape{2}, double(V), DType::i64), "model"), ValueError);

    // Cross-entropy: labels spread over every rank's block, one ignored.
    Tensor logits = randn(4, Shape{R, V}, DType::f64, 3.0);
    Tensor labels = randint(5, Shape{R}, V);
    {
      auto lv = labels.to_vector<int64_t>();
      lv[3] = -100;
      labels = from_vector(lv, Shape{R});
    }
    for (DType dt : {DType::f64, DType::f32}) {
      const double tol = dt == DType::f64 ? 1e-12 : 1e-6;
      Tensor lg = logits.astype(dt);
      Tensor lloc = shard_of(lg, {"", "model"}, mesh).contiguous().detach();
      lloc.set_requires_grad();
      Tensor gathered = all_gather(mesh, lloc.detach(), "model", -1);
      CHECK(vals(gathered) == vals(lg));
      Tensor lw = gathered.clone().detach();
      lw.set_requires_grad();
      for (Reduction red : {Reduction::mean, Reduction::sum, Reduction::none}) {
        Tensor la = vocab_parallel_cross_entropy(mesh, lloc, labels, "model", red);
        Tensor lb = cross_entropy(lw, labels, red);
        check_rel(la, lb, tol, "cross-entropy");
        Tensor seed = red == Reduction::none ? randn(6, Shape{R}, dt) : ones(Shape{}, dt);
        BackwardOptions oa, ob;
        oa.seed = seed;
        ob.seed = seed;
        Tensor da = grad(la, {lloc}, oa)[0], db = grad(lb, {lw}, ob)[0];
        check_rel(da, shard_of(db, {"", "model"}, mesh), tol, "cross-entropy grad");
        // Second derivatives: Hessian-vector products of sum(loss^2) (the loss's own cotangent then
        // depends on the logits, so both cotangents of the backward op are exercised), and a third
        // derivative: the gradient of <that product, w>.
        const Tensor v = randn(7, Shape{R, V}, dt), w = randn(8, Shape{R, V}, dt);
        const Tensor vloc = shard_of(v, {"", "model"}, mesh).contiguous(), wloc = shard_of(w, {"", "model"}, mesh).contiguous();
        auto sq_split = [&](const TensorList& a) { return sum(square(vocab_parallel_cross_entropy(mesh, a[0], labels, "model", red))); };
        auto sq_whole = [&](const TensorList& a) { return sum(square(cross_entropy(a[0], labels, red))); };
        check_rel(hvp(sq_split, {lloc}, {vloc}).second[0], shard_of(hvp(sq_whole, {lw}, {v}).second[0], {"", "model"}, mesh), tol,
                  "cross-entropy Hessian-vector product");
        FunctionalOptions cg;
        cg.create_graph = true;
        // <hvp, w> over the whole vocabulary: on the split, the ranks' partial sums made one replicated
        // scalar by g (reduce_from_tensor_parallel_region), as a loss is.
        // A fourth: the gradient of <third, w> again.
        auto third = [&](auto&& f, const Tensor& x, const Tensor& dir, const Tensor& c, bool split, bool fourth) {
          const Tensor leaf = x.detach().set_requires_grad();
          auto whole_sum = [&](const Tensor& partial) { return split ? reduce_from_tensor_parallel_region(mesh, partial, "model") : partial; };
          BackwardOptions o;
          o.create_graph = fourth;
          const Tensor t = grad(whole_sum(sum(hvp(f, {leaf}, {dir}, cg).second[0] * c)), {leaf}, o)[0];
          return fourth ? grad(whole_sum(sum(t * c)), {leaf})[0] : t;
        };
        for (bool fourth : {false, true})
          check_rel(third(sq_split, lloc, vloc, wloc, true, fourth),
                    shard_of(third(sq_whole, lw, v, w, false, fourth), {"", "model"}, mesh), tol * 10,
                    fourth ? "cross-entropy fourth derivative" : "cross-entropy third derivative");
      }
    }
    // A bad label fails on every rank of the axis (they all hold it), not a hang.
    std::string err;
    try {
      vocab_parallel_cross_entropy(mesh, shard_of(logits, {"", "model"}, mesh), full(Shape{R}, double(V), DType::i64), "model");
    } catch (const ValueError& e) {
      err = e.what();
    }
    CHECK_THAT(err, Contains("label out of range"));
    CHECK(all_ranks(!err.empty()));
  }
}

TEST_CASE("GPT split over TP equals the whole model: loss, logits and gradients", "[mpi][tp][gpt]") {
  for (const auto& mc : tp_cases()) {
    Mesh mesh = MeshSpec{mc.axes, mc.shape}.build(rt());
    const int dp = mesh.has_axis("data") ? mesh.axis_size("data") : 1, di = mesh.has_axis("data") ? mesh.axis_index("data") : 0;
    for (DType dt : {DType::f32, DType::f64}) {
      INFO(mc.name() << " " << dtype_name(dt));
      const double tol = dt == DType::f32 ? 1e-5 : 1e-11;
      nn::GPTConfig cfg = small(dt);
      nn::GPT whole(cfg), split(cfg, mesh);
      CHECK(split.tp_size() == mesh.axis_size("model"));
      CHECK(split.parameters().at("blocks/0/attn/qkv/weight").shape() == Shape{3, 32 / split.tp_size(), 32});
      auto specs = split.partition_specs();
      // Init parity: every parameter is this rank's block of the whole model's.
      for (const auto& [p, t] : split.parameters())
        CHECK(vals(t) == vals(shard_of(whole.parameters().at(p), specs.at(p), mesh).contiguous()));

      // The global batch (same on every rank); each data-parallel group takes its rows.
      const int64_t B = 8, T = 16, b0 = B * di / dp, b1 = B * (di + 1) / dp;
      Tensor x = randint(11, Shape{B, T}, cfg.vocab), y = randint(12, Shape{B, T}, cfg.vocab);
      Tensor xl = x.slice(0, b0, b1).contiguous(), yl = y.slice(0, b0, b1).contiguous();

      // Logits: this rank's vocabulary block; gathered, the whole model's.
      Tensor logits = split(xl);
      CHECK(logits.shape() == Shape{b1 - b0, T, cfg.vocab / split.tp_size()});
      check_rel(all_gather(mesh, logits, "model", -1), whole(xl), tol, "logits");

      // Loss and gradients on this group's rows.
      auto [ls, gs] = value_and_grad([&] { return split.loss(xl, yl); }, split.parameters());
      auto [lw, gw] = value_and_grad([&] { return whole.loss(xl, yl); }, whole.parameters());
      CHECK(ls.item() == Approx(lw.item()).epsilon(tol));
      for (const auto& [p, g] : gs) check_rel(unshard(g, specs.at(p), mesh), gw.at(p), tol, p);

      // Averaged over the data axis, they are the whole model's gradients on the global batch.
      if (dp > 1) {
        GradientSync sync(mesh, "data", split.parameters());
        ParamTree avg = sync.sync(gs);
        auto [lf, gf] = value_and_grad([&] { return whole.loss(x, y); }, whole.parameters());
        for (const auto& [p, g] : avg) check_rel(unshard(g, specs.at(p), mesh), gf.at(p), tol, "dp " + p);
        // And the TP-aware norm of the split gradients is the whole model's norm.
        CHECK(optim::global_norm(avg, specs, mesh) == Approx(optim::global_norm(gf)).epsilon(tol));
      } else {
        CHECK(optim::global_norm(gs, specs, mesh) == Approx(optim::global_norm(gw)).epsilon(tol));
      }
    }
  }
}

TEST_CASE("GPT split over TP: Hessian-vector products equal the whole model's", "[mpi][tp][gpt][autodiff]") {
  // Second derivatives through every tensor-parallel op (f, g, column- and row-parallel linears, the
  // vocabulary-parallel embedding and cross-entropy): H v for a random direction v of the whole model,
  // each rank holding its block of v. The inner product <grad, v> is one replicated scalar: the sharded
  // parameters' partial sums joined by g, the replicated parameters' added once.
  for (const auto& mc : tp_cases()) {
    INFO(mc.name());
    Mesh mesh = MeshSpec{mc.axes, mc.shape}.build(rt());
    const int dp = mesh.has_axis("data") ? mesh.axis_size("data") : 1, di = mesh.has_axis("data") ? mesh.axis_index("data") : 0;
    nn::GPTConfig cfg = small(DType::f64);
    nn::GPT whole(cfg), split(cfg, mesh);
    const auto specs = split.partition_specs();
    const int64_t B = 4, T = 16, b0 = B * di / dp, b1 = B * (di + 1) / dp;
    const Tensor x = randint(31, Shape{B, T}, cfg.vocab).slice(0, b0, b1).contiguous();
    const Tensor y = randint(32, Shape{B, T}, cfg.vocab).slice(0, b0, b1).contiguous();
    ParamTree vw;
    uint64_t seed = 40;
    for (const auto& [p, t] : whole.parameters()) vw.insert(p, randn(seed++, t.shape()));
    auto hessian_vector = [&](nn::GPT& m, bool sharded) {
      ParamTree ps = m.parameters();
      TensorList leaves = ps.tensors();
      for (auto& t : leaves) t.set_requires_grad(true);
      BackwardOptions cg;
      cg.create_graph = true;
      const TensorList g = grad(m.loss(x, y), leaves, cg);
      Tensor replicated = scalar(0.0, DType::f64), partial = scalar(0.0, DType::f64);
      for (size_t i = 0; i < g.size(); ++i) {
        const std::string& p = ps[i].first;
        const bool split_param = sharded && !specs.at(p).empty();
        const Tensor v = sharded ? shard_of(vw.at(p), specs.at(p), mesh).contiguous() : vw.at(p);
        (split_param ? partial : replicated) = (split_param ? partial : replicated) + sum(g[i] * v);
      }
      const Tensor inner = sharded ? replicated + reduce_from_tensor_parallel_region(mesh, partial, "model") : replicated + partial;
      const TensorList hv = grad(inner, leaves);
      for (auto& t : leaves) t.set_requires_grad(false);
      ParamTree out;
      for (size_t i = 0; i < hv.size(); ++i) out.insert(ps[i].first, hv[i]);
      return out;
    };
    const ParamTree hs = hessian_vector(split, true), hw = hessian_vector(whole, false);
    for (const auto& [p, h] : hs) check_rel(unshard(h, specs.at(p), mesh), hw.at(p), 1e-10, "H v " + p);
  }
}

TEST_CASE("GPT-2 weights load into each rank's tensor-parallel block and pipeline stage", "[mpi][tp][gpt][pretrained]") {
  const int n = world_size();
  std::vector<MeshCase> cases{{{"model"}, {n}}};
  if (n == 2) cases.push_back({{"pipe"}, {2}});
  if (n == 4) cases.push_back({{"pipe", "model"}, {2, 2}});
  // f32: the file holds f32 (the format's), so every rank's values are the whole model's exactly.
  const nn::GPTConfig cfg = small(DType::f32);
  nn::GPT whole(cfg);
  whole.init_parameters(9);  // not the default init the split models start from
  SharedDir d;
  if (world_rank() == 0) nn::write_gpt2_safetensors(whole.parameters(), cfg, (d.path / "gpt2").string());
  rt().world()->barrier();
  for (const auto& mc : cases) {
    INFO(mc.name());
    Mesh mesh = MeshSpec{mc.axes, mc.shape}.build(rt());
    nn::GPTConfig c = cfg;
    c.tp_axis = mesh.has_axis("model") ? "model" : "";
    c.pp_axis = mesh.has_axis("pipe") ? "pipe" : "";
    nn::GPT split(c, mesh);
    nn::load_gpt2_weights(split, (d.path / "gpt2" / "model.safetensors").string());
    const auto specs = split.partition_specs();
    for (const auto& [p, t] : split.parameters()) {
      INFO(p);
      CHECK(vals(t) == vals(shard_of(whole.parameters().at(p), specs.at(p), mesh).contiguous()));
    }
    if (!c.pp_axis.empty()) continue;  // a stage's loss needs the pipeline (test_mpi_pipeline.cpp)
    Tensor x = randint(21, Shape{2, 16}, cfg.vocab), y = randint(22, Shape{2, 16}, cfg.vocab);
    CHECK(split.loss(x, y).item() == Approx(whole.loss(x, y).item()).epsilon(1e-5));
  }
}

TEST_CASE("GPT split over TP decodes with a KV cache as the whole model does", "[mpi][tp][gpt][kv_cache]") {
  for (const auto& mc : tp_cases()) {
    INFO(mc.name());
    Mesh mesh = MeshSpec{mc.axes, mc.shape}.build(rt());
    const nn::GPTConfig cfg = small(DType::f64);
    nn::GPT whole(cfg), split(cfg, mesh);
    whole.init_parameters(5);
    split.load_global_parameters(whole.parameters());
    NoGradGuard ng;
    // Logits position by position against the whole model's forward (this rank's vocabulary block).
    const Tensor ids = randint(31, Shape{2, 16}, cfg.vocab);
    const Tensor full = whole(ids);
    nn::KVCache cache;
    check_rel(all_gather(mesh, split.forward_cached(ids.slice(1, 0, 6).contiguous(), cache), "model", -1),
              full.slice(1, 0, 6), 1e-11, "prompt logits");
    for (int64_t t = 6; t < 16; ++t)
      check_rel(all_gather(mesh, split.forward_cached(ids.slice(1, t, t + 1).contiguous(), cache), "model", -1),
                full.slice(1, t, t + 1), 1e-11, "position " + std::to_string(t));
    // generate across the seq_len boundary (prompt 5 + 14 new > 16), greedy and drawn.
    for (double temperature : {0.0, 1.5}) {
      const nn::GenerateOptions o{.max_new_tokens = 14, .temperature = temperature, .seed = 2};
      CHECK(nn::generate(split, {1, 2, 3, 4, 5}, o) == nn::generate(whole, {1, 2, 3, 4, 5}, o));
    }
  }
}

TEST_CASE("GPT with a padded vocabulary split over TP computes the unpadded whole model", "[mpi][tp][gpt][pad_vocab]") {
  for (const auto& mc : tp_cases()) {
    INFO(mc.name());
    Mesh mesh = MeshSpec{mc.axes, mc.shape}.build(rt());
    nn::GPTConfig cfg = small(DType::f64);
    cfg.vocab = 61;  // GPT-2-like: divides by no TP size; padded to 64
    nn::GPT whole(cfg);
    whole.init_parameters(6);
    cfg.pad_vocab_multiple = 4;
    nn::GPT split(cfg, mesh);
    ParamTree global;
    for (const auto& [p, t] : whole.parameters())
      global.insert(p, p == "wte/weight" ? concat({t, zeros(Shape{3, cfg.dim}, DType::f64)}, 0) : t);
    split.load_global_parameters(global);
    const Tensor x = randint(41, Shape{2, 16}, 61), y = randint(42, Shape{2, 16}, 61);
    CHECK(split.loss(x, y).item() == Approx(whole.loss(x, y).item()).epsilon(1e-11));
    const Tensor logits = all_gather(mesh, split(x), "model", -1);
    check_rel(logits.slice(2, 0, 61).contiguous(), whole(x), 1e-11, "logits");
    for (double v : logits.slice(2, 61, 64).contiguous().to_vector<double>()) CHECK(v == -INFINITY);
    const nn::GenerateOptions o{.max_new_tokens = 10, .temperature = 1.5, .seed = 4};
    CHECK(nn::generate(split, {7, 8, 9}, o) == nn::generate(whole, {7, 8, 9}, o));
  }
}

TEST_CASE("a GPT that does not divide over the TP axis fails on every rank", "[mpi][tp][gpt]") {
  const int n = world_size();
  Mesh mesh = MeshSpec{{"model"}, {n}}.build(rt());
  if (n == 1) return;
  nn::GPTConfig c = small(DType::f32);
  c.heads = 2 * n + 1;
  c.dim = c.heads * 4;
  std::string err;
  try {
    nn::GPT g(c, mesh);
  } catch (const PlanError& e) {
    err = e.what();
  }
  CHECK_THAT(err, Contains("heads (" + std::to_string(c.heads) + ") does not divide by the tensor-parallel size " + std::to_string(n)));
  CHECK(all_ranks(!err.empty()));
}

TEST_CASE("20 AdamW steps with clipping under Engine: TP matches the whole model", "[mpi][tp][gpt][engine]") {
  // The reference: the whole model on this rank alone (its own one-rank mesh).
  Mesh solo = MeshSpec{{"data"}, {1}}.build(make_local_communicator());
  for (const auto& mc : tp_cases()) {
    INFO(mc.name());
    Mesh mesh = MeshSpec{mc.axes, mc.shape}.build(rt());
    const bool has_dp = mesh.has_axis("data");
    const int dp = has_dp ? mesh.axis_size("data") : 1, di = has_dp ? mesh.axis_index("data") : 0;
    nn::GPTConfig cfg = small(DType::f32);
    nn::GPT whole(cfg), split(cfg, mesh);
    auto opt = [] {  // the reference run's optimiser: AdamW(0.9, 0.95), decay 0.1 on matrices, warm-up + cosine
      return optim::adamw(optim::warmup_cosine(3e-3, 5, 20, 0.1),
                          {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1,
                           .decay_filter = [](const std::string&, const Tensor& t) { return t.dim() >= 2; }});
    };
    const double clip = 0.5;
    Engine ref(solo, Plan{}, opt(), {.grad_clip = clip});
    Plan plan{.tp = TP{"model", nn::GPT::sharding_rules("model")}};
    if (has_dp) plan.dp = DP{"data"};
    Engine eng(mesh, plan, opt(), {.grad_clip = clip});
    int clipped = 0;
    for (int s = 0; s < 20; ++s) {
      const int64_t B = 8, b0 = B * di / dp, b1 = B * (di + 1) / dp;
      Tensor x = randint(1000 + s, Shape{B, 16}, cfg.vocab), y = randint(2000 + s, Shape{B, 16}, cfg.vocab);
      Batch global{{{"x", x}, {"y", y}}};
      StepResult a = ref.step(whole, nn::lm_loss, global);
      StepResult b = eng.step(split, nn::lm_loss, global.slice(b0, b1));
      INFO("step " << s << " loss " << a.loss << " vs " << b.loss << ", norm " << a.grad_norm << " vs " << b.grad_norm);
      CHECK(b.loss == Approx(a.loss).epsilon(1e-4));
      CHECK(b.grad_norm == Approx(a.grad_norm).epsilon(1e-4));
      clipped += a.grad_norm > clip;
    }
    CHECK(clipped > 0);  // clipping was active
    // The split parameters are still the whole model's blocks; replicated ones agree across the axis.
    auto specs = split.partition_specs();
    // (The k block of the qkv bias is left out: softmax is shift-invariant, so its exact gradient is 0 and
    // Adam moves it by rounding noise, which differs between any two summation orders.)
    for (const auto& [p, t] : split.parameters()) {
      Tensor a = unshard(t, specs.at(p), mesh), b = whole.parameters().at(p);
      if (p.find("qkv/bias") != std::string::npos) {
        check_rel(a.slice(0, 0, 1), b.slice(0, 0, 1), 1e-4, p + " (q)");
        check_rel(a.slice(0, 2, 3), b.slice(0, 2, 3), 1e-4, p + " (v)");
      } else {
        check_rel(a, b, 1e-4, p);
      }
    }
  }
}

TEST_CASE("LoRA adapters split over TP (and pipeline stages) train as the whole model's", "[mpi][tp][pp][gpt][lora]") {
  // The adapters follow their layer's split (lora_b of qkv / fc by rows, lora_a of proj / out by columns)
  // and their rank-r activations are summed over the axis where a rank holds a part: logits, every
  // gradient and 5 clipped AdamW steps against the whole model on this rank alone, with every base
  // parameter unchanged.
  const int n = world_size();
  std::vector<MeshCase> cases = tp_cases();
  if (n == 2) cases.push_back({{"pipe"}, {2}});  // the model's 2 blocks: at most 2 stages
  if (n == 4) cases.push_back({{"pipe", "model"}, {2, 2}});
  // DP x TP again with the optimizer state (the adapters' moments) sharded over the data axis.
  const size_t sharded_case = n == 4 ? cases.size() : size_t(-1);
  if (n == 4) cases.push_back({{"data", "model"}, {2, 2}});
  // With lora_dropout on {model: n}: the same masks as the whole model (the same keys on every rank of a
  // TP group; a row-parallel rank takes its block of the whole input's mask). Data and pipeline splits
  // draw per shard and microbatch, so their runs are compared without dropout.
  cases.push_back({{"model"}, {n}});
  Mesh solo = MeshSpec{{"data"}, {1}}.build(make_local_communicator());
  auto opt = [] { return optim::adamw(optim::constant(1e-2)); };
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const MeshCase& mc = cases[ci];
    nn::GPTConfig cfg = small(DType::f64);
    cfg.lora_rank = 4;
    cfg.lora_alpha = 8;
    cfg.lora_targets = {"attn/qkv", "attn/proj", "mlp/fc", "mlp/out"};
    cfg.lora_dropout = ci + 1 == cases.size() ? 0.2 : 0.0;
    INFO(mc.name() << ", lora_dropout " << cfg.lora_dropout << (ci == sharded_case ? ", optimizer state sharded" : ""));
    Mesh mesh = MeshSpec{mc.axes, mc.shape}.build(rt());
    nn::GPT whole(cfg);
    {  // every matrix random (lora_b too, so gradients reach lora_a); the same on every rank
      NoGradGuard ng;
      for (auto& [p, t] : whole.parameters())
        if (t.dim() >= 2) copy_(t, randn(std::hash<std::string>{}(p), t.shape(), DType::f64, 0.3));
    }
    nn::GPTConfig c = cfg;
    c.tp_axis = mesh.has_axis("model") ? "model" : "";
    c.pp_axis = mesh.has_axis("pipe") ? "pipe" : "";
    nn::GPT split(c, mesh);
    split.load_global_parameters(whole.parameters());
    const auto specs = split.partition_specs();
    if (mesh.has_axis("model")) {
      const int64_t tp = mesh.axis_size("model");
      const ParamTree ps = split.parameters();
      const std::string b = "blocks/" + std::to_string(split.first_layer()) + "/";
      CHECK(ps.at(b + "attn/qkv/lora_a").shape() == Shape{4, 32});
      CHECK(ps.at(b + "attn/qkv/lora_b").shape() == Shape{3, 32 / tp, 4});
      CHECK(ps.at(b + "mlp/out/lora_a").shape() == Shape{4, 128 / tp});
      CHECK(ps.at(b + "mlp/out/lora_b").shape() == Shape{32, 4});
    }
    for (const auto& [p, t] : split.trainable_parameters()) CHECK(p.find("/lora_") != std::string::npos);
    const Tensor x = randint(31, Shape{8, 16}, cfg.vocab), y = randint(32, Shape{8, 16}, cfg.vocab);
    if (!mesh.has_axis("pipe") && cfg.lora_dropout == 0) {
      check_rel(all_gather(mesh, split(x), "model", -1), whole(x), 1e-11, "logits");
      auto [ls, gs] = value_and_grad([&] { return split.loss(x, y); }, split.trainable_parameters());
      auto [lw, gw] = value_and_grad([&] { return whole.loss(x, y); }, whole.trainable_parameters());
      CHECK(ls.item() == Approx(lw.item()).epsilon(1e-11));
      for (const auto& [p, g] : gs) check_rel(unshard(g, specs.at(p), mesh), gw.at(p), 1e-10, p);
    }
    const ParamTree before = split.parameters().map([](const std::string&, const Tensor& t) { return t.clone(); });
    Engine ref(solo, Plan{}, opt(), {.grad_clip = 0.5});
    Plan plan;
    if (mesh.has_axis("model")) plan.tp = TP{"model"};
    if (mesh.has_axis("pipe")) plan.pp = PP{"pipe", 4};
    if (mesh.has_axis("data")) plan.dp = DP{"data", 1, ci == sharded_case};
    Engine eng(mesh, plan, opt(), {.grad_clip = 0.5});
    const int dp = mesh.has_axis("data") ? mesh.axis_size("data") : 1, di = mesh.has_axis("data") ? mesh.axis_index("data") : 0;
    for (int s = 0; s < 5; ++s) {
      const Batch g{{{"x", randint(300 + s, Shape{8, 16}, cfg.vocab)}, {"y", randint(400 + s, Shape{8, 16}, cfg.vocab)}}};
      const StepResult a = ref.step(whole, nn::lm_loss, g), b = eng.step(split, nn::lm_loss, g.slice(8 * di / dp, 8 * (di + 1) / dp));
      INFO("step " << s << " loss " << a.loss << " vs " << b.loss << ", norm " << a.grad_norm << " vs " << b.grad_norm);
      CHECK(b.loss == Approx(a.loss).epsilon(1e-10));
      CHECK(b.grad_norm == Approx(a.grad_norm).epsilon(1e-9));
    }
    for (const auto& [p, t] : split.parameters()) {
      INFO(p);
      if (p.find("/lora_") == std::string::npos) CHECK(vals(t) == vals(before.at(p)));  // frozen: bitwise
      else check_rel(unshard(t, specs.at(p), mesh), whole.parameters().at(p), 1e-9, p);
    }
    if (mesh.has_axis("data")) {  // freezing more after the first step: refused on every rank before any collective
      split.set_trainable("**/lora_b", false);
      const Batch g{{{"x", randint(500, Shape{8, 16}, cfg.vocab)}, {"y", randint(501, Shape{8, 16}, cfg.vocab)}}};
      CHECK_THAT(testing::catch_error<ValueError>([&] { eng.step(split, nn::lm_loss, g.slice(8 * di / dp, 8 * (di + 1) / dp)); }).what(),
                 Contains("changed after the first step"));
    }
  }
}
