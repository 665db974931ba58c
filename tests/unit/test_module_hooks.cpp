// Forward hooks (engine/nn.h: Module::register_forward_hook, PyTorch's register_forward_hook): called
// after a module's forward with its input and output, inside its module path; they may replace the output
// (differentiably), run once per trace under jit, and are removed by their handle.
#include <catch2/catch.hpp>

#include <titanax/titanax.h>

#include "../op_cases.h"
#include "test_util.h"

using namespace titanax;

namespace {
Tensor rand(uint64_t seed, const Shape& s) { return testing::randn64(RngKey::from_seed(seed), s); }

// outer Sequential -> inner Sequential "0" -> Linear "0" (4 -> 5), Linear "1" (5 -> 3), all f64.
struct TwoLayers {
  std::shared_ptr<nn::Linear> a = std::make_shared<nn::Linear>(4, 5, true, DType::f64);
  std::shared_ptr<nn::Linear> b = std::make_shared<nn::Linear>(5, 3, true, DType::f64);
  nn::Sequential model;
  TwoLayers() {
    auto inner = std::make_shared<nn::Sequential>();
    inner->add(a).add(b);
    model.add(inner);
    model.init_parameters(3);
  }
};
}  // namespace

TEST_CASE("forward hooks see each call's input, output and module path, and change nothing unless asked",
          "[nn][hooks]") {
  TwoLayers m;
  const Tensor x = rand(1, Shape{2, 4});
  const std::vector<double> plain = m.model(x).to_vector<double>();
  std::vector<std::string> seen;
  std::vector<Shape> shapes;
  auto record = [&](nn::Module&, const Tensor& in, const Tensor& out) {
    seen.push_back(current_scope());
    shapes.push_back(in.shape());
    shapes.push_back(out.shape());
    return Tensor();  // keep the output
  };
  nn::HookHandle ha = m.a->register_forward_hook(record), hb = m.b->register_forward_hook(record);
  CHECK(m.model(x).to_vector<double>() == plain);
  CHECK(seen == std::vector<std::string>{"0/0", "0/1"});
  CHECK(shapes == std::vector<Shape>{Shape{2, 4}, Shape{2, 5}, Shape{2, 5}, Shape{2, 3}});
  ha.remove();
  ha.remove();  // idempotent
  seen.clear();
  m.model(x);
  CHECK(seen == std::vector<std::string>{"0/1"});
  hb.remove();
  seen.clear();
  m.model(x);
  CHECK(seen.empty());
  // A handle outliving its module.
  nn::HookHandle orphan;
  {
    nn::Linear l(2, 2);
    orphan = l.register_forward_hook(record);
  }
  CHECK_NOTHROW(orphan.remove());
  CHECK_THROWS_AS(m.a->register_forward_hook(nullptr), ValueError);
}

TEST_CASE("a forward hook may replace the output, differentiably, in registration order", "[nn][hooks]") {
  TwoLayers m;
  const Tensor x = rand(2, Shape{3, 4});
  // Hooks on a: y -> 2y, then y -> y + 1 (in that order: 2y + 1, not 2(y + 1)).
  m.a->register_forward_hook([](nn::Module&, const Tensor&, const Tensor& y) { return y * 2.0; });
  m.a->register_forward_hook([](nn::Module&, const Tensor&, const Tensor& y) { return y + 1.0; });
  const ParamTree p = m.model.parameters();
  for (const auto& [path, t] : p) Tensor(t).set_requires_grad();
  const Tensor got = sum(square(m.model(x)));
  const TensorList g = grad(got, p.tensors());
  // The same function written out with the ops.
  const Tensor wa = p.at("0/0/weight"), ba = p.at("0/0/bias"), wb = p.at("0/1/weight"), bb = p.at("0/1/bias");
  const Tensor want = sum(square(linear(linear(x, wa, ba) * 2.0 + 1.0, wb, bb)));
  const TensorList gw = grad(want, p.tensors());
  CHECK(got.item() == want.item());
  for (size_t i = 0; i < g.size(); ++i) CHECK(g[i].to_vector<double>() == gw[i].to_vector<double>());
  // A hook that removes itself runs once; one returning another shape is a ShapeError.
  int calls = 0;
  auto handle = std::make_shared<nn::HookHandle>();
  *handle = m.b->register_forward_hook([&, handle](nn::Module&, const Tensor&, const Tensor&) {
    ++calls;
    handle->remove();
    return Tensor();
  });
  m.model(x);
  m.model(x);
  CHECK(calls == 1);
  m.b->register_forward_hook([](nn::Module&, const Tensor&, const Tensor& y) { return y.slice(1, 0, 2); });
  CHECK_THROWS_AS(m.model(x), ShapeError);
}

TEST_CASE("forward hooks under jit run once, at the trace; their ops are replayed", "[nn][hooks][jit]") {
  TwoLayers m;
  int calls = 0;
  m.a->register_forward_hook([&](nn::Module&, const Tensor&, const Tensor& y) {
    ++calls;
    return y * 3.0;
  });
  auto f = jit::jit([&](const TensorList& in) { return TensorList{m.model(in[0])}; });
  const Tensor x1 = rand(3, Shape{2, 4}), x2 = rand(4, Shape{2, 4});
  f({x1});
  const std::vector<double> replayed = f({x2})[0].to_vector<double>();
  CHECK(calls == 1);
  CHECK(f.stats().hits == 1);
  CHECK(replayed == m.model(x2).to_vector<double>());  // eager, with the hook
  CHECK(calls == 2);
}

// ------------------------------------------------------------------------------ full backward hooks

TEST_CASE("full backward hooks see each call's grad_input and grad_output, with its module path", "[nn][hooks]") {
  TwoLayers m;
  const Tensor x = rand(5, Shape{2, 4});  // data: no gradient with respect to it
  struct Seen {
    std::string path;
    Tensor grad_input, grad_output;
  };
  std::vector<Seen> seen;
  auto record = [&](const std::string& path, const Tensor& gi, const Tensor& go) {
    seen.push_back({path, gi, go});
    return Tensor();
  };
  nn::HookHandle ha = m.a->register_full_backward_hook(record), hb = m.b->register_full_backward_hook(record);
  const ParamTree p = m.model.parameters();
  auto [loss, g] = value_and_grad([&] { return sum(square(m.model(x))); }, p);
  // Closed forms: y = h Wb^T + bb with h = x Wa^T + ba; dL/dy = 2y, dL/dh = 2y Wb.
  const Tensor wa = p.at("0/0/weight"), ba = p.at("0/0/bias"), wb = p.at("0/1/weight"), bb = p.at("0/1/bias");
  const Tensor h = linear(x, wa, ba), y = linear(h, wb, bb);
  const Tensor dy = y * 2.0, dh = matmul(dy, wb);
  REQUIRE(seen.size() == 2);  // b first: the backward pass reaches it first
  CHECK(seen[0].path == "0/1");
  CHECK(seen[0].grad_output.to_vector<double>() == dy.to_vector<double>());
  REQUIRE(seen[0].grad_input.defined());
  const auto gi = seen[0].grad_input.to_vector<double>(), want = dh.to_vector<double>();
  for (size_t i = 0; i < gi.size(); ++i) CHECK(std::abs(gi[i] - want[i]) <= 1e-14 * std::max(1.0, std::abs(want[i])));
  CHECK(seen[1].path == "0/0");
  CHECK_FALSE(seen[1].grad_input.defined());  // x does not require grad
  CHECK(seen[1].grad_output.to_vector<double>() == seen[0].grad_input.to_vector<double>());
  // The gradients themselves are untouched.
  for (const auto& [path, t] : p) Tensor(t).set_requires_grad();
  const TensorList plain = grad(sum(square(linear(linear(x, wa, ba), wb, bb))), p.tensors());
  for (size_t i = 0; i < p.size(); ++i) CHECK(g.at(p[i].first).to_vector<double>() == plain[i].to_vector<double>());
  for (const auto& [path, t] : p) Tensor(t).set_requires_grad(false);
  ha.remove();
  hb.remove();
  seen.clear();
  (void)value_and_grad([&] { return sum(square(m.model(x))); }, p);
  CHECK(seen.empty());
  CHECK_THROWS_AS(m.a->register_full_backward_hook(nullptr), ValueError);
}

TEST_CASE("a full backward hook may replace grad_input; each call of a module is its own", "[nn][hooks]") {
  TwoLayers m;
  const Tensor x = rand(6, Shape{3, 4});
  const ParamTree p = m.model.parameters();
  // Zeroing what b passes back leaves a's parameters without gradient, b's as they were.
  auto [l0, plain] = value_and_grad([&] { return sum(square(m.model(x))); }, p);
  nn::HookHandle cut = m.b->register_full_backward_hook([](const std::string&, const Tensor& gi, const Tensor&) { return gi * 0.0; });
  auto [l1, g] = value_and_grad([&] { return sum(square(m.model(x))); }, p);
  for (const char* path : {"0/0/weight", "0/0/bias"})
    for (double v : g.at(path).to_vector<double>()) CHECK(v == 0.0);
  for (const char* path : {"0/1/weight", "0/1/bias"}) CHECK(g.at(path).to_vector<double>() == plain.at(path).to_vector<double>());
  cut.remove();
  // A module called twice: one hook call per call, the later call's first, each with its own gradients.
  nn::Linear c(4, 4, true, DType::f64);
  c.init_parameters(7);
  std::vector<std::vector<double>> outs;
  nn::HookHandle hc = c.register_full_backward_hook([&](const std::string&, const Tensor& gi, const Tensor& go) {
    outs.push_back(go.to_vector<double>());
    CHECK(gi.defined() == (outs.size() == 1));  // the first call's input is the data
    return Tensor();
  });
  Tensor mid;
  (void)value_and_grad([&] {
    mid = c(x);
    return sum(square(c(mid)));
  }, c.parameters());
  REQUIRE(outs.size() == 2);
  const Tensor out2 = c(mid.detach());
  CHECK(outs[0] == (out2 * 2.0).to_vector<double>());  // dL/d(second output) = 2 * output
  // dL/d(first output) = dL/d(second output) @ W, the first call's grad_output.
  const auto want_mid = matmul(out2 * 2.0, c.parameters().at("weight")).to_vector<double>();
  REQUIRE(outs[1].size() == want_mid.size());
  for (size_t i = 0; i < want_mid.size(); ++i) CHECK(std::abs(outs[1][i] - want_mid[i]) <= 1e-14 * std::max(1.0, std::abs(want_mid[i])));
  // A replacement of another shape is an AutodiffError naming the module.
  nn::HookHandle bad = m.b->register_full_backward_hook([](const std::string&, const Tensor& gi, const Tensor&) { return sum(gi); });
  Tensor xg = x.clone();
  xg.set_requires_grad();
  auto e = testing::catch_error<AutodiffError>([&] { (void)grad(sum(m.model(xg)), {xg}); });
  CHECK_THAT(e.message(), Catch::Matchers::Contains("backward hook of '0/1'"));
}
