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
