// Forward hooks (engine/nn.h: Module::register_forward_hook, PyTorch's register_forward_hook): called
// after a module's forward with its input and output, inside its module path; they may replace the output
// (differentiably), run once per trace under jit, and are removed by their handle.
#include <catch2/catch.hpp>

#include <titanax/titanax.h>

#include "../op_cases.h"

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
