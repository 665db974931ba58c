// autodiff/: backward accumulation, value_and_grad, no_grad, higher order, in-place detection.
#include <catch2/catch.hpp>

#include "op_cases.h"

using namespace titanax;

TEST_CASE("backward accumulates into leaf grads", "[autodiff]") {
  Tensor x = from_vector(std::vector<double>{1, 2, 3}, Shape{3}).set_requires_grad();
  Tensor y = sum(x * x);  // dy/dx = 2x
  y.backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>{2, 4, 6});
  sum(x * 3.0).backward();  // accumulates: + 3
  CHECK(x.grad().to_vector<double>() == std::vector<double>{5, 7, 9});
  x.zero_grad();
  CHECK_FALSE(x.grad().defined());
}

TEST_CASE("value_and_grad over a parameter tree", "[autodiff]") {
  ParamTree p{{"w", from_vector(std::vector<double>{1, -2}, Shape{2})}, {"b", scalar(0.5, DType::f64)}};
  Tensor xin = from_vector(std::vector<double>{3, 4}, Shape{2});
  auto [v, g] = value_and_grad([&] { return square(sum(p.at("w") * xin) + p.at("b")); }, p);
  // f = (w.x + b)^2 = (3 - 8 + 0.5)^2 = 20.25; df/dw = 2 (w.x + b) x; df/db = 2 (w.x + b)
  CHECK(v.item() == Approx(20.25));
  CHECK(g.at("w").to_vector<double>() == std::vector<double>{-27, -36});
  CHECK(g.at("b").item() == Approx(-9));
  CHECK_FALSE(p.at("w").requires_grad());  // flags restored
}

TEST_CASE("gradients are zero for unused parameters and not recorded under no_grad", "[autodiff]") {
  ParamTree p{{"used", ones(Shape{2}, DType::f64)}, {"unused", ones(Shape{3}, DType::f64)}};
  auto [v, g] = value_and_grad([&] { return sum(p.at("used")); }, p);
  CHECK(g.at("unused").to_vector<double>() == std::vector<double>{0, 0, 0});
  Tensor x = ones(Shape{2}).set_requires_grad();
  {
    NoGradGuard ng;
    Tensor y = x * 2.0;
    CHECK_FALSE(y.requires_grad());
  }
  CHECK((x * 2.0).requires_grad());
}

TEST_CASE("second derivative through create_graph", "[autodiff]") {
  Tensor x = from_vector(std::vector<double>{1.5, -2}, Shape{2}).set_requires_grad();
  Tensor y = sum(x * x * x);
  BackwardOptions o;
  o.create_graph = true;
  Tensor dx = grad(y, {x}, o)[0];  // 3x^2
  CHECK(dx.to_vector<double>() == std::vector<double>{6.75, 12});
  Tensor d2 = grad(sum(dx), {x})[0];  // 6x
  CHECK(d2.to_vector<double>() == std::vector<double>{9, -12});
}

TEST_CASE("gradient with respect to an intermediate tensor", "[autodiff]") {
  Tensor x = from_vector(std::vector<double>{1, 2}, Shape{2}).set_requires_grad();
  Tensor h = x * 3.0;
  Tensor y = sum(h * h);
  auto g = grad(y, {h, x});
  CHECK(g[0].to_vector<double>() == std::vector<double>{6, 12});   // 2h
  CHECK(g[1].to_vector<double>() == std::vector<double>{18, 36});  // 18x
}

TEST_CASE("autodiff errors are clear", "[autodiff][errors]") {
  Tensor x = ones(Shape{3}).set_requires_grad();
  Tensor y = x * 2.0;
  CHECK_THROWS_AS(y.backward(), AutodiffError);  // non-scalar without a seed
  Tensor s = sum(exp(x));
  Tensor xd = x.detach();
  fill_(xd, 5.0);  // modifies the storage saved by exp's node
  CHECK_THROWS_AS(s.backward(), AutodiffError);
  CHECK_THROWS_AS(arange(0, 3).set_requires_grad(), AutodiffError);
  CHECK_THROWS_AS(y.set_requires_grad(), AutodiffError);
}

TEST_CASE("on_grad_ready fires once per parameter, before backward returns", "[autodiff]") {
  ParamTree p{{"a", ones(Shape{2}, DType::f64)}, {"b", ones(Shape{2}, DType::f64)}, {"c", ones(Shape{2}, DType::f64)}};
  std::vector<size_t> order;
  BackwardOptions o;
  o.on_grad_ready = [&](size_t i, const Tensor& g) {
    CHECK(g.defined());
    order.push_back(i);
  };
  auto [v, g] = value_and_grad([&] { return sum(p.at("a") * p.at("b")) + sum(p.at("a")); }, p, o);
  std::sort(order.begin(), order.end());
  CHECK(order == std::vector<size_t>{0, 1, 2});
  CHECK(g.at("a").to_vector<double>() == std::vector<double>{2, 2});
}

TEST_CASE("release_reported: backward lets go of each gradient once on_grad_ready has it", "[autodiff][memory]") {
  const Tensor a = random_normal(RngKey::from_seed(3), Shape{4}).set_requires_grad();
  const Tensor b = random_normal(RngKey::from_seed(4), Shape{4}).set_requires_grad();
  const Tensor unused = ones(Shape{2}).set_requires_grad();
  const Tensor mid = tanh(a * b);  // an intermediate wrt tensor
  const Tensor root = sum(mid * a) + sum(exp(a));  // a's gradient accumulates over three uses
  const TensorList wrt{a, b, mid, unused, a};       // a twice
  const TensorList want = grad(root, wrt, {.create_graph = false});
  for (bool release : {false, true}) {
    INFO("release_reported " << release);
    std::vector<std::weak_ptr<Storage>> storages(wrt.size());
    std::vector<bool> freed_before_last;  // at the last report (`unused`: not reached, reported at the end)
    TensorList seen(wrt.size());
    BackwardOptions o;
    o.on_grad_ready = [&](size_t i, const Tensor& g) {
      if (i == 3)
        for (const auto& w : storages) freed_before_last.push_back(w.expired());
      storages[i] = g.storage();
      seen[i] = g.clone();
    };
    o.release_reported = release;
    const TensorList got = grad(root, wrt, o);
    REQUIRE(freed_before_last.size() == wrt.size());
    for (size_t i = 0; i < wrt.size(); ++i) {
      INFO("wrt " << i);
      CHECK(seen[i].to_vector<double>() == want[i].to_vector<double>());
      CHECK(got[i].defined() == !release);
      // Released: freed while the pass still ran (nobody held it after the callback).
      if (i != 3) CHECK(freed_before_last[i] == release);
    }
  }
}

namespace {

// y = x * w elementwise; its vjp records which cotangents it was asked for.
struct RecordingMul final : Op {
  std::vector<std::vector<bool>>* calls;
  explicit RecordingMul(std::vector<std::vector<bool>>* c) : calls(c) {}
  const char* name() const override { return "recording_mul"; }
  std::vector<TensorSpec> infer(const TensorList& in) const override { return {{in[0].shape(), in[0].dtype(), in[0].device()}}; }
  void cpu(const TensorList& in, TensorList& out) const override {
    NoGradGuard ng;
    copy_(out[0], in[0] * in[1]);
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    calls->push_back(needs);
    return {needs[0] ? ct[0] * in[1] : Tensor(), needs[1] ? ct[0] * in[0] : Tensor()};
  }
};

}  // namespace

TEST_CASE("grad runs only the graph between the root and wrt, asking each vjp for what leads there", "[autodiff]") {
  std::vector<std::vector<bool>> calls;
  auto rmul = [&](const Tensor& a, const Tensor& b) { return apply1(std::make_shared<RecordingMul>(&calls), {a, b}); };
  const Tensor x = from_vector(std::vector<double>{1, 2}, Shape{2}).set_requires_grad();
  const Tensor w = from_vector(std::vector<double>{3, 4}, Shape{2}).set_requires_grad();
  const Tensor v = from_vector(std::vector<double>{5, 6}, Shape{2}).set_requires_grad();
  const Tensor h = rmul(x, w);       // the history behind h
  const Tensor y = sum(rmul(h, v));  // dy/dh = v, dy/dv = h = x w, dy/dw = v x

  CHECK(grad(y, {h})[0].to_vector<double>() == std::vector<double>{5, 6});
  CHECK(calls == std::vector<std::vector<bool>>{{true, false}});  // h's producer never ran, v not asked
  calls.clear();
  CHECK(grad(y, {v})[0].to_vector<double>() == std::vector<double>{3, 8});
  CHECK(calls == std::vector<std::vector<bool>>{{false, true}});
  calls.clear();
  CHECK(grad(y, {w})[0].to_vector<double>() == std::vector<double>{5, 12});
  CHECK(calls == std::vector<std::vector<bool>>{{true, false}, {false, true}});
  calls.clear();
  // Both an intermediate and a leaf behind it: the history runs for the leaf, and h's gradient is
  // still only the part through v.
  const TensorList g = grad(y, {h, x});
  CHECK(g[0].to_vector<double>() == std::vector<double>{5, 6});
  CHECK(g[1].to_vector<double>() == std::vector<double>{15, 24});
  CHECK(calls == std::vector<std::vector<bool>>{{true, false}, {true, false}});
  calls.clear();
  y.backward();  // every leaf
  CHECK(calls == std::vector<std::vector<bool>>{{true, true}, {true, true}});
  CHECK(w.grad().to_vector<double>() == std::vector<double>{5, 12});
  // In-place changes off that part do not matter: x's storage is saved by h's producer only.
  calls.clear();
  Tensor xd = x.detach();
  fill_(xd, 7.0);
  CHECK(grad(y, {v})[0].to_vector<double>() == std::vector<double>{3, 8});
  CHECK_THROWS_AS(grad(y, {w}), AutodiffError);
}

TEST_CASE("the tape keeps no value of a cast's operand: autocast's f32 activations are freed, gradients unchanged",
          "[autodiff][memory]") {
  // Autocast casts an f32 activation to bf16 for a GEMM that keeps the bf16 copy; the f32 value itself is
  // then read by nobody's vjp (astype's casts the cotangent back by dtype alone) and must not be held.
  Tensor x = testing::randn64(RngKey::from_seed(5), Shape{3, 4}).set_requires_grad();
  Tensor w = testing::randn64(RngKey::from_seed(6), Shape{4, 2});
  std::weak_ptr<Storage> f64_value;
  Tensor loss;
  {
    Tensor h = mul(x, x);  // f64, held by the cast's node only
    f64_value = h.storage();
    loss = sum(matmul(h.astype(DType::f32), w.astype(DType::f32)));  // matmul keeps the f32 copies
  }
  CHECK(f64_value.expired());
  loss.backward();
  // d/dx sum((x^2) w) = 2 x * (row sums of w), in f32 through the casts
  const auto gx = x.grad().to_vector<double>(), xv = x.to_vector<double>(), wv = w.to_vector<double>();
  for (size_t i = 0; i < gx.size(); ++i) {
    const size_t c = i % 4;
    CHECK(gx[i] == Approx(2 * xv[i] * (wv[c * 2] + wv[c * 2 + 1])).epsilon(1e-5));
  }
  CHECK(x.grad().dtype() == DType::f64);
}

TEST_CASE("the tape keeps no value an op's vjp does not read: add's operands are freed, gradients unchanged", "[autodiff][memory]") {
  // y = exp(x) + exp(2 x): add's vjp reads only shapes, so once the forward drops its handles the two
  // exp outputs are held by nobody (exp saves its output for its own vjp: the add node must not hold
  // another reference to it, nor to any other operand that is not a leaf).
  Tensor x = testing::randn64(RngKey::from_seed(1), Shape{3, 4}).set_requires_grad();
  Tensor w = testing::randn64(RngKey::from_seed(2), Shape{4});  // a constant operand, broadcast
  std::weak_ptr<Storage> big;
  Tensor loss;
  {
    Tensor h = mul(x, x);  // mul saves its inputs (x, a leaf): h is held by the add node only
    big = h.storage();
    loss = sum(add(add(h, w), x));
  }
  CHECK(big.expired());  // freed before backward
  ParamTree px;
  px.insert("x", x);
  auto [value, g] = value_and_grad([&] { return sum(add(add(mul(x, x), w), x)); }, px);
  loss.backward();
  // d/dx sum(x^2 + w + x) = 2 x + 1, through the tape that kept only shapes of add's operands
  const auto gx = x.grad().to_vector<double>(), xv = x.to_vector<double>();
  for (size_t i = 0; i < gx.size(); ++i) CHECK(gx[i] == Approx(2 * xv[i] + 1).epsilon(1e-12));
  CHECK(g.at("x").to_vector<double>() == gx);
  // Writing in place into an operand add no longer reads is allowed; into one mul reads, refused.
  Tensor a = testing::randn64(RngKey::from_seed(3), Shape{4}).set_requires_grad();
  Tensor e = exp(a), s = sum(add(e, w));
  {
    NoGradGuard ng;
    fill_(w, 0.0);
  }
  s.backward();
  CHECK(a.grad().to_vector<double>() == exp(a).detach().to_vector<double>());
  Tensor b = testing::randn64(RngKey::from_seed(4), Shape{4}).set_requires_grad(), c = b.detach().clone();
  Tensor m = sum(mul(b, c));
  {
    NoGradGuard ng;
    fill_(c, 1.0);
  }
  CHECK_THROWS_AS(m.backward(), AutodiffError);
}
