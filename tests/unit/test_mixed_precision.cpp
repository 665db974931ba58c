// Mixed precision on the CPU: f16 / bf16 ops (computed in f32, rounded to nearest even), autocast's op
// lists (core/op.h AutocastGuard, after torch.autocast), and the Engine's Precision policy (f32 master
// weights, bf16 / fp16 compute, f32 loss) against f32 training. The CUDA side is checked against these
// in tests/cuda/test_cuda_mixed_precision.cpp.
#include <catch2/catch.hpp>

#include <cmath>

#include <titanax/titanax.h>

#include "engine/engine.h"
#include "parallel/runtime.h"

using namespace titanax;

namespace {

Tensor randn(uint64_t seed, const Shape& s, double scale = 1.0) {
  return random_normal(RngKey::from_seed(seed), s, DType::f64) * scale;
}
std::vector<double> values(const Tensor& t) { return t.astype(DType::f64).to_vector<double>(); }

// Worst |got - want| / max(|want|, floor) elementwise.
double worst_rel(const Tensor& got, const Tensor& want, double floor) {
  const auto g = values(got), w = values(want);
  REQUIRE(g.size() == w.size());
  double worst = 0;
  for (size_t i = 0; i < w.size(); ++i) worst = std::max(worst, std::fabs(g[i] - w[i]) / std::max(std::fabs(w[i]), floor));
  return worst;
}

std::shared_ptr<TensorDataset> synthetic(int64_t n, uint64_t seed) {
  Tensor x = random_normal(RngKey::from_seed(seed), Shape{n, 12});
  const auto xv = x.to_vector<float>();
  std::vector<int64_t> y(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    y[size_t(i)] = int64_t(xv[size_t(i * 12)] + xv[size_t(i * 12 + 1)] > 0) + 2 * int64_t(xv[size_t(i * 12 + 2)] > 0);
  return std::make_shared<TensorDataset>(std::map<std::string, Tensor>{{"x", x}, {"y", from_vector(y, Shape{n})}});
}

Mesh single_mesh() { return MeshSpec{{"data"}, {1}}.build(make_local_communicator()); }

}  // namespace

TEST_CASE("f16 / bf16 elementwise ops: the f64 result rounded once to the 16-bit type", "[mixed]") {
  for (DType t : {DType::bf16, DType::f16}) {
    INFO(dtype_name(t));
    // 2^-8 (bf16) / 2^-11 (f16): half an ulp relative, plus the f32 rounding before it.
    const double half_ulp = t == DType::bf16 ? 1.0 / 256 : 1.0 / 2048;
    const Tensor a = randn(1, Shape{257, 3}).astype(t), b = randn(2, Shape{257, 3}).astype(t);
    const Tensor a64 = a.astype(DType::f64), b64 = b.astype(DType::f64);
    const Tensor bp = (abs(b64) + 0.5).astype(t);  // divisors away from 0
    struct Case {
      const char* name;
      Tensor got, want;
    };
    for (const Case& c : {Case{"add", a + b, a64 + b64}, Case{"mul", a * b, a64 * b64}, Case{"div", a / bp, a64 / bp.astype(DType::f64)},
                          Case{"exp", exp(a), exp(a64)}, Case{"gelu", gelu(a), gelu(a64)}, Case{"relu", relu(a), relu(a64)},
                          Case{"tanh", tanh(a), tanh(a64)},
                          Case{"dropout", dropout(a, 0.3, RngKey::from_seed(5)), dropout(a64, 0.3, RngKey::from_seed(5))}}) {
      INFO(c.name);
      CHECK(c.got.dtype() == t);
      CHECK(worst_rel(c.got, c.want, 1e-3) <= half_ulp * 1.01 + 1e-6);
    }
    // Comparisons give bool; max is exact.
    CHECK(values(gt(a, b)) == values(gt(a64, b64)));
    CHECK(values(max(a, {0})) == values(max(a64, {0})));
  }
}

TEST_CASE("bf16 / f16 matmul, linear and sum accumulate in f32 or wider: within 1e-2 of f64", "[mixed]") {
  for (DType t : {DType::bf16, DType::f16}) {
    INFO(dtype_name(t));
    const Tensor x = randn(3, Shape{33, 64}).astype(t), w = randn(4, Shape{17, 64}, 0.2).astype(t),
                 b = randn(5, Shape{17}).astype(t), m = randn(6, Shape{2, 64, 9}).astype(t);
    auto f64 = [](const Tensor& v) { return v.astype(DType::f64); };
    const Tensor y = linear(x, w, b), p = matmul(x, m), s = sum(x, {1});
    CHECK(y.dtype() == t);
    CHECK(p.dtype() == t);
    CHECK(s.dtype() == t);
    // Scale-relative: the rounding of the 16-bit result against the largest output.
    auto rel = [](const Tensor& got, const Tensor& want) {
      const auto g = values(got), w = values(want);
      double num = 0, den = 1e-30;
      for (size_t i = 0; i < w.size(); ++i) num = std::max(num, std::fabs(g[i] - w[i])), den = std::max(den, std::fabs(w[i]));
      return num / den;
    };
    CHECK(rel(y, linear(f64(x), f64(w), f64(b))) <= 1e-2);
    CHECK(rel(p, matmul(f64(x), f64(m))) <= 1e-2);
    CHECK(rel(s, sum(f64(x), {1})) <= 1e-2);
  }
}

TEST_CASE("autocast: GEMMs lower to bf16, softmax / cross-entropy / sums run in f32, mixed inputs promote", "[mixed]") {
  const Tensor x = randn(7, Shape{8, 16}).astype(DType::f32), w = randn(8, Shape{5, 16}, 0.3).astype(DType::f32),
               b = zeros(Shape{5});
  const Tensor labels = from_vector(std::vector<int64_t>{0, 1, 2, 3, 4, 0, 1, 2}, Shape{8});
  CHECK(autocast_dtype() == DType::f32);
  {
    AutocastGuard ac(DType::bf16);
    CHECK(autocast_dtype() == DType::bf16);
    const Tensor y = linear(x, w, b);
    CHECK(y.dtype() == DType::bf16);
    CHECK(matmul(x, w.T()).dtype() == DType::bf16);
    CHECK(relu(y).dtype() == DType::bf16);                  // single dtype: left alone
    CHECK((y + scalar(1.0)).dtype() == DType::f32);          // bf16 meets f32: promoted
    CHECK(softmax(y, -1).dtype() == DType::f32);
    CHECK(cross_entropy(y, labels).dtype() == DType::f32);
    CHECK(sum(y).dtype() == DType::f32);
    CHECK(max(y, {1}).dtype() == DType::bf16);
    CHECK(matmul(x.astype(DType::f64), w.T().astype(DType::f64)).dtype() == DType::f64);  // only f32 lowers
    {
      AutocastGuard off(DType::f32);  // nested: the innermost wins
      CHECK(linear(x, w, b).dtype() == DType::f32);
    }
    CHECK(linear(x, w, b).dtype() == DType::bf16);
  }
  CHECK(autocast_dtype() == DType::f32);
  CHECK(linear(x, w, b).dtype() == DType::f32);
  CHECK_THROWS_AS(AutocastGuard(DType::i32), DTypeError);

  // Gradients reach the f32 tensors in f32, close to the f32 gradients.
  ParamTree p{{"w", w}, {"b", b}};
  auto loss = [&] { return cross_entropy(linear(x, p.at("w"), p.at("b")), labels); };
  auto [l32, g32] = value_and_grad(loss, p);
  auto [l16, g16] = value_and_grad([&] {
    AutocastGuard ac(DType::bf16);
    return loss();
  }, p);
  CHECK(l16.dtype() == DType::f32);
  CHECK(l16.item() == Approx(l32.item()).epsilon(2e-2));
  for (const char* k : {"w", "b"}) {
    INFO(k);
    CHECK(g16.at(k).dtype() == DType::f32);
    const auto a = values(g16.at(k)), e = values(g32.at(k));
    double num = 0, den = 1e-30;
    for (size_t i = 0; i < e.size(); ++i) num = std::max(num, std::fabs(a[i] - e[i])), den = std::max(den, std::fabs(e[i]));
    CHECK(num / den <= 3e-2);
    CHECK(num > 0);  // the bf16 forward really ran
  }
}

TEST_CASE("cross-entropy of f16 / bf16 logits: an f32 loss, the gradient in their dtype; autocast makes no f32 copy", "[mixed]") {
  std::vector<int64_t> lv{3, -100, 0, 36, 7, 7};
  const Tensor labels = from_vector(lv, Shape{6});
  for (DType dt : {DType::bf16, DType::f16}) {
    INFO(dtype_name(dt));
    const Tensor x = (randn(21, Shape{6, 37}) * 3.0).astype(dt);
    for (Reduction red : {Reduction::mean, Reduction::sum, Reduction::none}) {
      INFO("reduction " << int(red));
      const Tensor ct = red == Reduction::none ? randn(22, Shape{6}).astype(DType::f32) : scalar(0.5, DType::f32);
      auto run = [&](const Tensor& logits) {
        Tensor p = logits.detach();
        p.set_requires_grad();
        const Tensor l = cross_entropy(p, labels, red);
        return TensorList{l.detach(), grad(sum(l * ct), {p})[0]};
      };
      const TensorList got = run(x), want = run(x.astype(DType::f32));  // the f32 copy's loss and gradient
      CHECK(got[0].dtype() == DType::f32);
      CHECK(got[1].dtype() == dt);
      CHECK(values(got[0]) == values(want[0]));
      CHECK(values(got[1]) == values(want[1].astype(dt)));  // rounded once
    }
  }
  // Under autocast the bf16 logits of a lowered linear go to the cross-entropy as they are.
  const Tensor h = randn(23, Shape{6, 16}).astype(DType::f32), w = randn(24, Shape{37, 16}, 0.3).astype(DType::f32);
  auto f = [&](const TensorList& in) {
    AutocastGuard ac(DType::bf16);
    return TensorList{cross_entropy(linear(in[0], w), labels)};
  };
  const jit::Graph g = jit::trace(f, {h});
  int casts = 0;
  for (const auto& n : g.nodes) casts += std::string(n.op->name()) == "astype";
  CHECK(casts == 2);  // h and w lowered to bf16; the logits are not cast up
  CHECK(g.run({h})[0].dtype() == DType::f32);
}

TEST_CASE("Engine precision policy: bf16 and fp16 compute with f32 master weights follow f32 training", "[mixed][engine]") {
  auto data = synthetic(512, 3);
  // fp16 with a dynamic loss scale starting at 1024: no overflowing (skipped) step, so the trajectories
  // stay comparable step by step.
  auto run = [&](Precision prec, bool jit = false) {
    nn::MLP model({12, 64, 4});
    Mesh mesh = single_mesh();
    Engine engine(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-2)),
                  EngineOptions{.precision = prec,
                                .loss_scale = prec.compute == DType::f16 ? LossScaleOptions::dynamic(1024) : LossScaleOptions::none(),
                                .jit = jit});
    DataLoader loader(data, {.batch_size = 64, .shuffle = true, .seed = 5, .prefetch = 0});
    std::vector<double> losses;
    for (int s = 0; s < 30; ++s) losses.push_back(engine.step(model, classification_loss, loader.next()).loss);
    for (const auto& [k, t] : model.parameters()) CHECK(t.dtype() == DType::f32);  // master weights
    return losses;
  };
  const auto f32 = run(Precision::f32());
  for (Precision prec : {Precision::bf16(), Precision::fp16()}) {
    INFO(prec.str());
    const auto low = run(prec);
    double worst = 0;
    for (size_t s = 0; s < f32.size(); ++s) {
      REQUIRE(std::isfinite(low[s]));
      worst = std::max(worst, std::fabs(low[s] - f32[s]) / f32[s]);
    }
    INFO("worst relative loss difference " << worst);
    CHECK(worst <= 5e-2);
    CHECK(worst > 0);  // it did compute in 16 bits
    CHECK(low.back() < 0.6 * low.front());
    // The compiled step traces the same casts and 16-bit ops, fuses them (16-bit registers rounded after
    // every op, as the eager kernels round), and for fp16 takes the loss scaler's decision as ops of the
    // graph: the same losses, bitwise.
    const auto traced = run(prec, true);
    for (size_t s = 0; s < low.size(); ++s) CHECK(traced[s] == low[s]);
  }
  Mesh mesh = single_mesh();
  CHECK_THROWS_AS(Engine(mesh, Plan{.dp = DP{"data", 1}}, optim::adamw(optim::constant(1e-2)),
                         EngineOptions{.precision = Precision{DType::bf16, DType::bf16}}),
                  DTypeError);
}
