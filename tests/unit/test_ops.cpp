// Forward values of the core ops against naive reference loops written here, on random inputs.
#include <catch2/catch.hpp>

#include <cmath>

#include <titanax/titanax.h>

#include "op_cases.h"

using namespace titanax;
using testing::randn64;

namespace {

// Row-major index helpers for the naive references.
double at3(const std::vector<double>& v, const Shape& s, int64_t i, int64_t j, int64_t k) {
  return v[size_t((i * s[1] + j) * s[2] + k)];
}

void check_close(const std::vector<double>& got, const std::vector<double>& want, double tol = 1e-12) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    INFO("element " << i);
    REQUIRE(got[i] == Approx(want[i]).margin(tol).epsilon(tol));
  }
}

}  // namespace

TEST_CASE("binary ops broadcast like NumPy", "[ops][elementwise]") {
  RngKey key = RngKey::from_seed(11);
  Tensor a = randn64(fold_in(key, 0), Shape{2, 3, 4});
  Tensor b = randn64(fold_in(key, 1), Shape{3, 1});
  auto av = a.to_vector<double>(), bv = b.to_vector<double>();
  std::vector<double> want;
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 4; ++k) want.push_back(at3(av, a.shape(), i, j, k) * bv[size_t(j)]);
  check_close((a * b).to_vector<double>(), want);
  // Strided operand (transposed view) and a scalar.
  Tensor m = randn64(fold_in(key, 2), Shape{4, 3});
  auto mv = m.to_vector<double>();
  std::vector<double> want2;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) want2.push_back(mv[size_t(j * 3 + i)] - 2.0);
  check_close((m.T() - 2.0).to_vector<double>(), want2);
  CHECK_THROWS_AS(a + randn64(key, Shape{5}), ShapeError);
  CHECK_THROWS_AS(a + a.astype(DType::f32), DTypeError);
}

TEST_CASE("unary ops match the C library", "[ops][elementwise]") {
  Tensor x = testing::uniform64(RngKey::from_seed(3), Shape{64}, 0.1, 3.0);
  auto xv = x.to_vector<double>();
  auto run = [&](Tensor y, double (*f)(double)) {
    std::vector<double> want;
    for (double v : xv) want.push_back(f(v));
    check_close(y.to_vector<double>(), want);
  };
  run(exp(x), [](double v) { return std::exp(v); });
  run(log(x), [](double v) { return std::log(v); });
  run(sqrt(x), [](double v) { return std::sqrt(v); });
  run(tanh(x), [](double v) { return std::tanh(v); });
  run(sigmoid(neg(x)), [](double v) { return 1.0 / (1.0 + std::exp(v)); });
  run(gelu(x, false), [](double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); });
  run(gelu(x, true), [](double v) {
    return 0.5 * v * (1 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
  });
}

TEST_CASE("reductions over every axis set match naive loops", "[ops][reduce]") {
  Tensor x = randn64(RngKey::from_seed(5), Shape{3, 4, 5});
  auto xv = x.to_vector<double>();
  for (int mask = 0; mask < 8; ++mask) {
    std::vector<int> axes;
    for (int d = 0; d < 3; ++d)
      if (mask & (1 << d)) axes.push_back(d);
    if (axes.empty()) continue;
    int64_t n0 = (mask & 1) ? 1 : 3, n1 = (mask & 2) ? 1 : 4, n2 = (mask & 4) ? 1 : 5;
    std::vector<double> s(size_t(n0 * n1 * n2), 0.0), mx(s.size(), -INFINITY);
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 4; ++j)
        for (int k = 0; k < 5; ++k) {
          size_t o = size_t(((mask & 1 ? 0 : i) * n1 + (mask & 2 ? 0 : j)) * n2 + (mask & 4 ? 0 : k));
          s[o] += at3(xv, x.shape(), i, j, k);
          mx[o] = std::max(mx[o], at3(xv, x.shape(), i, j, k));
        }
    INFO("mask " << mask);
    check_close(sum(x, axes, true).to_vector<double>(), s);
    check_close(max(x, axes, true).to_vector<double>(), mx);
    // Also over a transposed (strided) view of the same data.
    Tensor xt = x.permute({2, 1, 0}).contiguous().permute({2, 1, 0});
    check_close(sum(xt, axes, true).to_vector<double>(), s);
  }
  CHECK(sum(x).item() == Approx([&] { double t = 0; for (double v : xv) t += v; return t; }()).epsilon(1e-12));
  // Column sums of wide rows split into blocks of columns (over threads): each output still adds its rows
  // in order, in double, so a naive loop in that order gives the same bits (outer axis of 3, 1300 columns:
  // blocks of 512, 512 and 276).
  for (DType t : {DType::f64, DType::f32}) {
    const Tensor w = randn64(RngKey::from_seed(6), Shape{3, 50, 1300}).astype(t);
    const auto wv = w.to_vector<double>();
    std::vector<double> cs(3 * 1300, 0.0);
    for (int64_t i = 0; i < 3; ++i)
      for (int64_t r = 0; r < 50; ++r)
        for (int64_t j = 0; j < 1300; ++j) cs[size_t(i * 1300 + j)] += wv[size_t((i * 50 + r) * 1300 + j)];
    std::vector<double> want;
    for (double v : cs) want.push_back(t == DType::f32 ? double(float(v)) : v);
    CHECK(sum(w, {1}).to_vector<double>() == want);
  }
  // Large reductions take the multithreaded paths.
  Tensor big = ones(Shape{300, 1000});
  CHECK(sum(big).item() == 300000.0);
  CHECK(sum(big, {0}).to_vector<float>() == std::vector<float>(1000, 300.0f));
  CHECK(sum(big, {1}).to_vector<float>() == std::vector<float>(300, 1000.0f));
}

TEST_CASE("argmax picks the first maximum", "[ops][reduce]") {
  Tensor x = from_vector(std::vector<float>{1, 5, 5, 0, 7, 2}, Shape{2, 3});
  CHECK(argmax(x, 1).to_vector<int64_t>() == std::vector<int64_t>{1, 1});
  CHECK(argmax(x, 0).to_vector<int64_t>() == std::vector<int64_t>{0, 1, 0});
}

TEST_CASE("matmul matches a naive triple loop (f32 and f64, batched, transposed)", "[ops][matmul]") {
  RngKey key = RngKey::from_seed(9);
  for (DType dt : {DType::f64, DType::f32}) {
    Tensor a = randn64(fold_in(key, 1), Shape{2, 7, 13}).astype(dt);
    Tensor b = randn64(fold_in(key, 2), Shape{13, 9}).astype(dt);
    auto av = a.to_vector<double>(), bv = b.to_vector<double>();
    std::vector<double> want(2 * 7 * 9, 0.0);
    for (int bt = 0; bt < 2; ++bt)
      for (int i = 0; i < 7; ++i)
        for (int j = 0; j < 9; ++j)
          for (int k = 0; k < 13; ++k) want[size_t((bt * 7 + i) * 9 + j)] += av[size_t((bt * 7 + i) * 13 + k)] * bv[size_t(k * 9 + j)];
    double tol = dt == DType::f32 ? 1e-5 : 1e-12;
    check_close(matmul(a, b).to_vector<double>(), want, tol);
    // The same product through transposed views of transposed copies.
    Tensor at = a.transpose(-2, -1).contiguous().transpose(-2, -1);
    Tensor bt = b.T().contiguous().T();
    check_close(matmul(at, bt).to_vector<double>(), want, tol);
  }
  CHECK_THROWS_AS(matmul(ones(Shape{2, 3}), ones(Shape{4, 5})), ShapeError);
}

TEST_CASE("linear is x @ w^T + b", "[ops][matmul]") {
  RngKey key = RngKey::from_seed(10);
  Tensor x = randn64(fold_in(key, 1), Shape{6, 5}), w = randn64(fold_in(key, 2), Shape{4, 5}), b = randn64(fold_in(key, 3), Shape{4});
  check_close(linear(x, w, b).to_vector<double>(), (matmul(x, w.T()) + b).to_vector<double>(), 1e-12);
  CHECK_THROWS_AS(linear(x, ones(Shape{4, 6}, DType::f64)), ShapeError);
}

TEST_CASE("where, concat, slice, pad, one_hot", "[ops][shape]") {
  Tensor a = from_vector(std::vector<float>{1, 2, 3, 4}, Shape{2, 2});
  Tensor b = from_vector(std::vector<float>{10, 20}, Shape{2});
  Tensor c = gt(a, scalar(2.5));
  CHECK(where(c, a, b).to_vector<float>() == std::vector<float>{10, 20, 3, 4});
  CHECK(concat({a, a}, 0).shape() == Shape{4, 2});
  CHECK(concat({a, b.reshape(Shape{2, 1})}, 1).to_vector<float>() == std::vector<float>{1, 2, 10, 3, 4, 20});
  CHECK(pad(b, 0, 1, 2).to_vector<float>() == std::vector<float>{0, 10, 20, 0, 0});
  CHECK(one_hot(from_vector(std::vector<int64_t>{2, 0}, Shape{2}), 3).to_vector<float>() == std::vector<float>{0, 0, 1, 1, 0, 0});
  CHECK_THROWS_AS(one_hot(from_vector(std::vector<int64_t>{3}, Shape{1}), 3), ValueError);
  CHECK_THROWS_AS(concat({a, ones(Shape{3, 3})}, 0), ShapeError);
}

TEST_CASE("unbind: views of each slice; the gradient is one concat", "[ops][shape]") {
  const Tensor x = from_vector(std::vector<float>{1, 2, 3, 4, 5, 6}, Shape{2, 3});
  const TensorList cols = unbind(x, -1);
  REQUIRE(cols.size() == 3);
  CHECK(cols[1].shape() == Shape{2});
  CHECK(cols[1].to_vector<float>() == std::vector<float>{2, 5});
  CHECK(cols[2].raw_data() == static_cast<const float*>(x.raw_data()) + 2);  // a view, no copy
  CHECK(unbind(x, 0)[1].to_vector<float>() == std::vector<float>{4, 5, 6});
  CHECK(unbind(zeros(Shape{0, 4}), 0).empty());
  CHECK_THROWS_AS(unbind(scalar(1.0), 0), ShapeError);
  CHECK_THROWS_AS(unbind(x, 2), ShapeError);
  // The gradient of every slice is one node (a concat), not a scatter per slice and their sum.
  auto f = [](const TensorList& in) {
    Tensor w = in[0].detach();
    w.set_requires_grad();
    const TensorList p = unbind(w, 1);
    return TensorList{grad(sum(p[0] * 3.0 + p[2]), {w})[0]};
  };
  const jit::Graph g = jit::trace(f, {x});
  int concats = 0, scatters = 0;
  for (const auto& n : g.nodes) {
    concats += std::string(n.op->name()) == "concat";
    scatters += std::string(n.op->name()) == "slice_scatter";
  }
  CHECK(concats == 1);
  CHECK(scatters == 0);
  CHECK(g.run({x})[0].to_vector<float>() == std::vector<float>{3, 0, 1, 3, 0, 1});
}

TEST_CASE("unbind: the gradient of a permuted view of one buffer has the view's strides", "[ops][shape]") {
  // The unpacked attention's cut (GPT's before the packed op): [B, T, 3, H, D] permuted to [3, B, H, T, D]
  // and unbound into q, k, v. The gradient laid out as the view is, permuted back, is a contiguous
  // [B, T, 3, H, D]: its reshape to the projection's
  // [B, T, 3 H D] is then a view, not a copy.
  const RngKey key = RngKey::from_seed(31);
  const Shape s{2, 4, 3, 2, 5};
  Tensor x = testing::randn64(fold_in(key, 0), s).permute({2, 0, 3, 1, 4});
  x.set_requires_grad();
  const TensorList parts = unbind(x, 0);
  TensorList cts, rows;
  Tensor loss = scalar(0.0, DType::f64);
  for (uint64_t i = 0; i < 3; ++i) {
    cts.push_back(testing::randn64(fold_in(key, 1 + i), parts[0].shape()));
    loss = loss + sum(parts[size_t(i)] * cts.back());
    rows.push_back(cts.back().unsqueeze(0));
  }
  const Tensor g = grad(loss, {x})[0];
  CHECK(g.strides() == x.strides());
  CHECK(g.permute({1, 3, 0, 2, 4}).is_contiguous());
  CHECK(g.contiguous().to_vector<double>() == concat(rows, 0).to_vector<double>());  // d sum(p c) / dp = c, exactly
  // A contiguous input keeps the plain concat; a view with gaps (a slice of a transpose) too, with the same
  // values.
  for (const Tensor& y0 : {testing::randn64(fold_in(key, 5), Shape{3, 4}), testing::randn64(fold_in(key, 6), Shape{4, 6}).T().slice(0, 0, 3)}) {
    Tensor y = y0.detach();
    y.set_requires_grad();
    const TensorList p = unbind(y, 1);
    const Tensor gy = grad(sum(p[1] * 2.0), {y})[0];
    CHECK(gy.is_contiguous());
    CHECK(gy.to_vector<double>() == std::vector<double>{0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0});
  }
}
