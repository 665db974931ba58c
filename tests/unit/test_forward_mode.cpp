// jvp in forward mode (autodiff/functional.h, detail::ForwardMode): every op of the op table against
// directional central differences in f64 (independent of Titanax's derivatives) and against the
// reverse-mode Jacobian contracted with the tangent; which ops take a rule; nesting, forward over
// reverse, and the refusals.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>

#include "test_util.h"

#include "autodiff/functional.h"
#include "engine/gpt.h"
#include "engine/nn.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;
using Catch::Matchers::Contains;
using testing::catch_error;

namespace {

bool floating(const Tensor& t) { return t.defined() && is_floating(t.dtype()); }

// (f(x + h t) - f(x - h t)) / 2h, each input moved along its tangent (none for non-floating inputs).
Tensor directional_fd(const std::function<Tensor(const TensorList&)>& f, const TensorList& x, const TensorList& t,
                      double h = 1e-6) {
  NoGradGuard ng;
  TensorList plus, minus;
  for (size_t i = 0; i < x.size(); ++i) {
    plus.push_back(t[i].defined() ? x[i] + t[i] * h : x[i]);
    minus.push_back(t[i].defined() ? x[i] - t[i] * h : x[i]);
  }
  return (f(plus) - f(minus)) * (0.5 / h);
}

double max_abs(const Tensor& t) { return t.numel() ? max(abs(t.astype(DType::f64))).item() : 0.0; }

// max |a - b| / max(1, max |b|).
double rel_diff(const Tensor& a, const Tensor& b) { return max_abs(a - b) / std::max(1.0, max_abs(b)); }

}  // namespace

TEST_CASE("jvp (forward mode): every op-table case against directional finite differences and the Jacobian (f64)",
          "[autodiff][functional][jvp]") {
  uint64_t seed = 0;
  int checked = 0;
  for (const testing::OpCase& c : testing::op_cases()) {
    // max_pool2d/second_order makes its leaf with detach() unless its input requires grad (gradcheck's
    // idiom); under jvp it does not, and detach() stops the tangent as it stops a gradient.
    if (!c.check_grad || c.name == "max_pool2d/second_order") continue;
    const TensorList x = c.inputs(RngKey::from_seed(7000 + seed));
    TensorList t;
    for (size_t i = 0; i < x.size(); ++i)
      t.push_back(floating(x[i]) ? testing::randn64(RngKey::from_seed(8000 + 10 * seed + i), x[i].shape()) : Tensor());
    ++seed;
    INFO(c.name);
    const auto f = [&](const TensorList& in) { return TensorList{c.fn(in)}; };
    const auto [y, ty] = jvp(f, x, t);
    REQUIRE(ty.size() == 1);
    if (!floating(y[0])) continue;
    REQUIRE(ty[0].shape() == y[0].shape());
    // Independent: central differences along t (error O(h^2) plus rounding / h).
    CHECK(rel_diff(ty[0], directional_fd(c.fn, x, t)) < 1e-6);
    // Reverse mode, the dot-product test: <u, J t> = <J^T u, t> for a random cotangent u.
    const Tensor u = testing::randn64(RngKey::from_seed(9000 + seed), y[0].shape()).astype(y[0].dtype());
    const TensorList jtu = vjp(f, x).pullback({u});
    double lhs = sum(u * ty[0]).item(), rhs = 0, scale = 1;
    for (size_t i = 0; i < x.size(); ++i)
      if (t[i].defined()) rhs += sum(jtu[i] * t[i]).item(), scale += sum(abs(jtu[i] * t[i])).item();
    CHECK(std::abs(lhs - rhs) < 1e-12 * scale);
    ++checked;
  }
  CHECK(checked >= 100);
}

TEST_CASE("jvp (forward mode): an MLP, linear, layer_norm and an attention block take rules, not their vjps", "[autodiff][functional][jvp]") {
  nn::MLP mlp({6, 8, 3}, {.activation = "gelu", .dtype = DType::f64});
  const Tensor x = testing::randn64(RngKey::from_seed(1), Shape{4, 6}), t = testing::randn64(RngKey::from_seed(2), Shape{4, 6});
  detail::reset_jvp_stats();
  const auto [y, ty] = jvp([&](const TensorList& in) { return TensorList{mlp(in[0])}; }, {x}, {t});
  CHECK(detail::jvp_stats().by_rule >= 3);  // linear, gelu, linear
  CHECK(detail::jvp_stats().by_vjp == 0);
  CHECK(rel_diff(ty[0], directional_fd([&](const TensorList& in) { return mlp(in[0]); }, {x}, {t})) < 1e-6);
  // linear's rule with a tangent on some operands only: each of x, w, b alone.
  const Tensor w = testing::randn64(RngKey::from_seed(5), Shape{3, 6}), b = testing::randn64(RngKey::from_seed(6), Shape{3});
  const auto lin = [](const TensorList& in) { return linear(in[0], in[1], in[2]); };
  for (int only = 0; only < 3; ++only) {
    TensorList tl(3);
    tl[size_t(only)] = testing::randn64(RngKey::from_seed(uint64_t(40 + only)), TensorList{x, w, b}[size_t(only)].shape());
    INFO("tangent on operand " << only);
    CHECK(rel_diff(jvp([&](const TensorList& in) { return TensorList{lin(in)}; }, {x, w, b}, tl).second[0],
                   directional_fd(lin, {x, w, b}, tl)) < 1e-6);
  }
  // layer_norm's rule, with a tangent on x, w, b alone and on all three, and without w and b.
  const Tensor lw = testing::randn64(RngKey::from_seed(7), Shape{6}), lb = testing::randn64(RngKey::from_seed(8), Shape{6});
  const auto ln = [](const TensorList& in) { return layer_norm(in[0], in[1], in[2]); };
  for (int only = -1; only < 3; ++only) {
    TensorList tl(3);
    for (int i = 0; i < 3; ++i)
      if (only < 0 || only == i) tl[size_t(i)] = testing::randn64(RngKey::from_seed(uint64_t(50 + i)), TensorList{x, lw, lb}[size_t(i)].shape());
    INFO("layer_norm, tangent on operand " << only << " (-1: all)");
    detail::reset_jvp_stats();
    const Tensor tn = jvp([&](const TensorList& in) { return TensorList{ln(in)}; }, {x, lw, lb}, tl).second[0];
    CHECK(detail::jvp_stats().by_vjp == 0);
    CHECK(rel_diff(tn, directional_fd(ln, {x, lw, lb}, tl)) < 1e-6);
  }
  const auto bare = [](const TensorList& in) { return layer_norm(in[0], Tensor(), Tensor()); };
  CHECK(rel_diff(jvp([&](const TensorList& in) { return TensorList{bare(in)}; }, {x}, {t}).second[0],
                 directional_fd(bare, {x}, {t})) < 1e-6);
  // A pre-LN attention block with its weights as inputs (layer norm, the qkv projection, the packed causal
  // attention, the output projection, the residual add): every op by its rule.
  const int64_t B = 2, T = 5, H = 2, Dh = 3, C = H * Dh;
  const auto block = [&](const TensorList& in) {
    const Tensor h = layer_norm(in[0], in[1], in[2]);
    const Tensor qkv = linear(h, in[3]).reshape(Shape{B, T, 3, H, Dh});
    return in[0] + linear(scaled_dot_product_attention_qkvpacked(qkv, true).reshape(Shape{B, T, C}), in[4]);
  };
  TensorList bx, bt;
  for (const Shape& sh : {Shape{B, T, C}, Shape{C}, Shape{C}, Shape{3 * C, C}, Shape{C, C}}) {
    bx.push_back(testing::randn64(RngKey::from_seed(60 + bx.size()), sh));
    bt.push_back(testing::randn64(RngKey::from_seed(70 + bt.size()), sh));
  }
  detail::reset_jvp_stats();
  const Tensor tb = jvp([&](const TensorList& in) { return TensorList{block(in)}; }, bx, bt).second[0];
  CHECK(detail::jvp_stats().by_vjp == 0);
  CHECK(detail::jvp_stats().by_rule >= 4);  // layer_norm, 2 linear, attention
  CHECK(rel_diff(tb, directional_fd(block, bx, bt)) < 1e-6);
  // cross_entropy has no rule: its tangent comes from its vjp, and is still right.
  const Tensor labels = from_vector(std::vector<int64_t>{0, 5, 2, 3}, Shape{4});
  const auto ce = [&](const TensorList& in) { return cross_entropy(in[0], labels); };
  detail::reset_jvp_stats();
  const auto [s, ts] = jvp([&](const TensorList& in) { return TensorList{ce(in)}; }, {x}, {t});
  CHECK(detail::jvp_stats().by_vjp == 1);
  CHECK(rel_diff(ts[0], directional_fd(ce, {x}, {t})) < 1e-6);
}

TEST_CASE("jvp (forward mode) nests, runs over reverse mode, and refuses in-place writes of tangent-carrying values",
          "[autodiff][functional][jvp]") {
  const Tensor x = testing::randn64(RngKey::from_seed(3), Shape{5}), t = testing::randn64(RngKey::from_seed(4), Shape{5});
  const auto f = [](const Tensor& a) { return sum(tanh(a) * exp(a * 0.5)); };
  // jvp of jvp: t^T H t, against central differences of the first jvp.
  const auto d1 = [&](const TensorList& in) { return TensorList{jvp([&](const TensorList& a) { return TensorList{f(a[0])}; }, {in[0]}, {t}).second[0]}; };
  const Tensor second = jvp(d1, {x}, {t}).second[0];
  CHECK(rel_diff(second, directional_fd([&](const TensorList& in) { return d1(in)[0]; }, {x}, {t})) < 1e-6);
  // Forward over reverse: the jvp of the gradient is the Hessian-vector product.
  const auto g = [&](const TensorList& in) { return TensorList{vjp([&](const TensorList& a) { return TensorList{f(a[0])}; }, {in[0]}, {.create_graph = true}).pullback({scalar(1.0, DType::f64)})[0]}; };
  const Tensor hv = jvp(g, {x}, {t}).second[0];
  CHECK(rel_diff(hv, hvp([&](const TensorList& a) { return f(a[0]); }, {x}, {t}).second[0]) < 1e-10);
  // detach() stops the tangent, as it stops a gradient (jax.lax.stop_gradient).
  const auto stopped = jvp([](const TensorList& in) { return TensorList{in[0] * in[0].detach()}; }, {x}, {t}).second[0];
  CHECK(rel_diff(stopped, x * t) < 1e-15);
  // In-place writes of a value with a tangent are refused, naming the fix.
  const auto err = catch_error<AutodiffError>([&] {
    jvp([](const TensorList& in) {
      Tensor y = in[0] * 2.0;
      copy_(y, in[0]);
      return TensorList{y};
    }, {x}, {t});
  });
  CHECK_THAT(err.what(), Contains("in-place write") && Contains("out of place"));
}

