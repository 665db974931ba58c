// Gradient hooks (core/tensor.h: Tensor::register_hook, PyTorch's Tensor.register_hook): a hook sees the
// gradient with respect to its tensor once per backward pass, before it is used; what it returns replaces
// the gradient downstream (propagated, returned, accumulated, or fed to the optimizer); it is removed by
// its handle; under create_graph its ops are differentiated; under jit it runs at the trace. The
// gradients hooks observe are compared with grad() of the same function without hooks, and replaced ones
// with closed forms.
#include <catch2/catch.hpp>

#include <cmath>

#include <titanax/titanax.h>

#include "../op_cases.h"
#include "test_util.h"

using namespace titanax;
using Catch::Matchers::Contains;

namespace {
Tensor rnd(uint64_t seed, const Shape& s) { return testing::randn64(RngKey::from_seed(seed), s); }
std::vector<double> vec(const Tensor& t) { return t.contiguous().to_vector<double>(); }

// A leaf x [3, 4] used twice: loss = sum(h^2) + sum(h * c) + sum(x * c), h = tanh(x * w).
struct Problem {
  Tensor x = rnd(1, Shape{3, 4}), w = rnd(2, Shape{4}), c = rnd(3, Shape{3, 4});
  Problem() { x.set_requires_grad(); }
  Tensor h() const { return tanh(x * w); }
  Tensor loss(const Tensor& h) const { return sum(square(h)) + sum(h * c) + sum(x * c); }
};
}  // namespace

TEST_CASE("gradient hooks see each tensor's gradient once, and change nothing when they return Tensor()", "[autodiff][hooks]") {
  Problem p;
  // Without hooks: the gradients with respect to h and to x.
  const Tensor h0 = p.h();
  const TensorList want = grad(p.loss(h0), {h0, p.x});
  std::vector<Tensor> seen_h, seen_x;
  const Tensor h = p.h();
  HookHandle hh = h.register_hook([&](const Tensor& g) {
    seen_h.push_back(g);
    return Tensor();
  });
  HookHandle hx = p.x.register_hook([&](const Tensor& g) {
    seen_x.push_back(g);
    return Tensor();
  });
  const Tensor gx = grad(p.loss(h), {p.x})[0];
  REQUIRE(seen_h.size() == 1);
  REQUIRE(seen_x.size() == 1);  // the leaf's total over its two uses, once
  CHECK(vec(seen_h[0]) == vec(want[0]));
  CHECK(vec(seen_x[0]) == vec(want[1]));
  CHECK(vec(gx) == vec(want[1]));
  // backward() runs them too, and accumulates what they let through.
  p.loss(h).backward();
  CHECK(seen_h.size() == 2);
  CHECK(seen_x.size() == 2);
  CHECK(vec(p.x.grad()) == vec(want[1]));
  // Removed: never called again (and removing twice is harmless).
  hh.remove();
  hx.remove();
  hx.remove();
  (void)grad(p.loss(h), {p.x});
  CHECK(seen_h.size() == 2);
  CHECK(seen_x.size() == 2);
}

TEST_CASE("a hook's replacement is the gradient downstream: propagated, returned, accumulated, in order", "[autodiff][hooks]") {
  Problem p;
  const Tensor h0 = p.h();
  const Tensor dx_via_h = grad(sum(square(h0)), {p.x})[0];  // the only path through h
  // Doubling the gradient at h doubles what reaches x through it (exactly: a power of two).
  {
    const Tensor h = p.h();
    HookHandle d = h.register_hook([](const Tensor& g) { return g * 2.0; });
    CHECK(vec(grad(sum(square(h)), {p.x})[0]) == vec(dx_via_h * 2.0));
  }
  // On the leaf, hooks compose in registration order: (g * 2) + 1, not (g + 1) * 2.
  const Tensor plain = grad(p.loss(p.h()), {p.x})[0];
  HookHandle a = p.x.register_hook([](const Tensor& g) { return g * 2.0; });
  HookHandle b = p.x.register_hook([](const Tensor& g) { return g + 1.0; });
  CHECK(vec(grad(p.loss(p.h()), {p.x})[0]) == vec(plain * 2.0 + 1.0));
  p.loss(p.h()).backward();
  CHECK(vec(p.x.grad()) == vec(plain * 2.0 + 1.0));
  auto [value, g] = value_and_grad([&] { return p.loss(p.h()); }, ParamTree{{"x", p.x}});
  CHECK(vec(g.at("x")) == vec(plain * 2.0 + 1.0));
  a.remove();
  CHECK(vec(grad(p.loss(p.h()), {p.x})[0]) == vec(plain + 1.0));
  b.remove();
  // A hook that removes itself runs once.
  int calls = 0;
  auto self = std::make_shared<HookHandle>();
  *self = p.x.register_hook([&calls, self](const Tensor&) {
    ++calls;
    self->remove();
    return Tensor();
  });
  (void)grad(p.loss(p.h()), {p.x});
  (void)grad(p.loss(p.h()), {p.x});
  CHECK(calls == 1);
}

TEST_CASE("hooks run only where a gradient arrives; a multi-output op's outputs have their own", "[autodiff][hooks]") {
  Tensor x = rnd(10, Shape{3, 2});
  x.set_requires_grad();
  const TensorList parts = unbind(x, 0);
  int calls0 = 0, calls1 = 0;
  HookHandle h0 = parts[0].register_hook([&](const Tensor& g) {
    ++calls0;
    CHECK(g.shape() == Shape{2});
    return g * 4.0;
  });
  HookHandle h1 = parts[1].register_hook([&](const Tensor&) {
    ++calls1;
    return Tensor();
  });
  const Tensor g = grad(sum(exp(parts[0])) + sum(parts[2]), {x})[0];
  CHECK(calls0 == 1);
  CHECK(calls1 == 0);  // parts[1] does not reach the loss
  const std::vector<double> xv = vec(x), gv = vec(g);
  for (int j = 0; j < 2; ++j) {
    CHECK(gv[size_t(j)] == 4.0 * std::exp(xv[size_t(j)]));
    CHECK(gv[size_t(2 + j)] == 0.0);
    CHECK(gv[size_t(4 + j)] == 1.0);
  }
}

TEST_CASE("under create_graph a hook's ops are differentiated too", "[autodiff][hooks]") {
  // loss = sum(h), h = tanh(x); the hook replaces dL/dh = 1 by h, so the gradient is h (1 - h^2) = h - h^3,
  // and the gradient of its sum is (1 - 3 h^2)(1 - h^2).
  Tensor x = rnd(20, Shape{5});
  x.set_requires_grad();
  const Tensor h = tanh(x);
  HookHandle hk = h.register_hook([&h](const Tensor& g) { return g * h; });
  BackwardOptions o;
  o.create_graph = true;
  const Tensor g = grad(sum(h), {x}, o)[0];
  hk.remove();  // (else it would run again in the second pass, where a gradient reaches h too, as in PyTorch)
  const Tensor gg = grad(sum(g), {x})[0];
  const std::vector<double> xv = vec(x), gv = vec(g), ggv = vec(gg);
  for (size_t i = 0; i < xv.size(); ++i) {
    const double t = std::tanh(xv[i]);
    CHECK(std::abs(gv[i] - (t - t * t * t)) <= 1e-15);
    CHECK(std::abs(ggv[i] - (1 - 3 * t * t) * (1 - t * t)) <= 1e-14);
  }
}

TEST_CASE("gradient hooks: errors", "[autodiff][hooks]") {
  Problem p;
  const Tensor h = p.h();
  HookHandle bad = h.register_hook([](const Tensor& g) { return sum(g); });
  auto e = testing::catch_error<AutodiffError>([&] { (void)grad(p.loss(h), {p.x}); });
  CHECK_THAT(e.message(), Contains("gradient hook of output 0 of op 'tanh'"));
  CHECK(e.expected() == "f64[3, 4]");
  CHECK(e.found() == "f64[]");
  bad.remove();
  auto d = testing::catch_error<AutodiffError>([&] { (void)p.x.register_hook([](const Tensor& g) { return g.astype(DType::f32); }); grad(p.loss(p.h()), {p.x}); });
  CHECK(d.found() == "f32[3, 4]");
  testing::catch_error<AutodiffError>([] { (void)arange(0, 3).register_hook([](const Tensor& g) { return g; }); });
  testing::catch_error<ValueError>([&] { (void)p.x.register_hook(GradHook()); });
}

TEST_CASE("gradient hooks under jit run at the trace; the replays compute what they returned", "[autodiff][hooks][jit]") {
  const Tensor w = rnd(30, Shape{4});
  int calls = 0;
  // Per call: the gradient with respect to w of sum(h^2), h = tanh(x * w), with the gradient at h doubled.
  auto step = [&](const TensorList& in) {
    auto [value, g] = value_and_grad(
        [&] {
          const Tensor h = tanh(in[0] * w);
          (void)h.register_hook([&calls](const Tensor& gh) {
            ++calls;
            return gh * 2.0;
          });
          return sum(square(h));
        },
        ParamTree{{"w", w}});
    return TensorList{g.at("w")};
  };
  jit::Compiled compiled = jit::jit(step);
  const Tensor x1 = rnd(31, Shape{3, 4}), x2 = rnd(32, Shape{3, 4});
  (void)compiled({x1});  // the trace: the hook runs
  CHECK(calls == 1);
  const TensorList got = compiled({x2});
  CHECK(calls == 1);  // a replay does not call it
  const TensorList want = step({x2});  // eager, with the hook
  CHECK(calls == 2);
  CHECK(vec(got[0]) == vec(want[0]));
}

TEST_CASE("a hook on a parameter changes what the Engine's optimizer applies", "[autodiff][hooks][engine]") {
  nn::MLP model({6, 8, 3});
  const Tensor x = rnd(40, Shape{16, 6}).astype(DType::f32), y = testing::randint(RngKey::from_seed(41), Shape{16}, 3);
  Batch batch;
  batch.items = {{"x", x}, {"y", y}};
  const ParamTree params = model.parameters();
  const std::vector<float> w0 = params.at("layers/0/weight").to_vector<float>(), b0 = params.at("layers/0/bias").to_vector<float>();
  int calls = 0;
  // Zero the first layer's weight gradient: SGD leaves that weight alone and moves the rest.
  HookHandle frozen = params.at("layers/0/weight").register_hook([&calls](const Tensor& g) {
    ++calls;
    return zeros_like(g);
  });
  Mesh mesh = MeshSpec{{"data"}, {1}}.build(make_local_communicator());
  Engine engine(mesh, Plan{.dp = DP{"data", 2}}, optim::sgd(optim::constant(0.1)));
  engine.step(model, classification_loss, batch);
  CHECK(calls == 2);  // once per microbatch's backward pass
  CHECK(params.at("layers/0/weight").to_vector<float>() == w0);
  CHECK(params.at("layers/0/bias").to_vector<float>() != b0);
}
