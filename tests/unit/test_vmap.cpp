// jit/vmap.h: every result is compared with a loop over the batch (fn applied to each example, the
// results stacked) on fresh random f64 inputs. Where the batched ops run the same kernels over the same
// per-example data the comparison is bitwise; where a rule changes the computation (a GEMM over more
// rows, a bias added after the GEMM instead of inside it) a relative tolerance is stated.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>

#include "test_util.h"

#include "autodiff/autodiff.h"
#include "engine/gpt.h"
#include "jit/control_flow.h"
#include "jit/graph.h"
#include "jit/vmap.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;
using Catch::Matchers::Contains;

namespace {

Tensor rnd(uint64_t seed, const Shape& s) { return testing::randn64(RngKey::from_seed(seed), s); }
std::vector<double> vec(const Tensor& t) { return t.contiguous().to_vector<double>(); }

// The reference: fn on each example (index b along its in_axes entry; not_batched inputs shared, each
// example made contiguous), output k stacked along out_axes[k].
TensorList loop(const jit::Fn& fn, const TensorList& args, std::vector<int> in_axes = {}, std::vector<int> out_axes = {}) {
  if (in_axes.empty()) in_axes.assign(args.size(), 0);
  int64_t B = -1;
  for (size_t i = 0; i < args.size(); ++i)
    if (in_axes[i] != jit::not_batched) B = args[i].size(in_axes[i]);
  std::vector<TensorList> per_example;
  for (int64_t b = 0; b < B; ++b) {
    TensorList ex;
    for (size_t i = 0; i < args.size(); ++i)
      ex.push_back(in_axes[i] == jit::not_batched ? args[i] : args[i].slice(in_axes[i], b, b + 1).squeeze(in_axes[i]).contiguous());
    per_example.push_back(fn(ex));
  }
  TensorList res;
  for (size_t k = 0; k < per_example[0].size(); ++k) {
    const int a = out_axes.empty() ? 0 : out_axes[k];
    TensorList parts;
    for (const auto& outs : per_example) parts.push_back(outs[k].unsqueeze(a));
    res.push_back(concat(parts, a));
  }
  return res;
}

// Largest |got - want| / max(|want|, 1) over the elements (shapes must agree).
double max_rel_err(const Tensor& got, const Tensor& want) {
  REQUIRE(got.shape() == want.shape());
  const auto g = vec(got), w = vec(want);
  double e = 0;
  for (size_t i = 0; i < g.size(); ++i) e = std::max(e, std::abs(g[i] - w[i]) / std::max(std::abs(w[i]), 1.0));
  return e;
}

// Largest |got - want| over the largest |want| (shapes must agree): the normwise error, for f32 results
// whose small elements come out of cancellation among large terms.
double max_normwise_err(const Tensor& got, const Tensor& want) {
  REQUIRE(got.shape() == want.shape());
  const auto g = vec(got.astype(DType::f64)), w = vec(want.astype(DType::f64));
  double e = 0, m = 0;
  for (size_t i = 0; i < g.size(); ++i) e = std::max(e, std::abs(g[i] - w[i])), m = std::max(m, std::abs(w[i]));
  return e / std::max(m, 1e-30);
}

// Bitwise equality of every output (shapes and dtypes too).
void check_same(const TensorList& got, const TensorList& want) {
  REQUIRE(got.size() == want.size());
  for (size_t k = 0; k < got.size(); ++k) {
    INFO("output " << k);
    CHECK(got[k].shape() == want[k].shape());
    CHECK(got[k].dtype() == want[k].dtype());
    CHECK(vec(got[k]) == vec(want[k]));
  }
}

bool no_fallback() { return jit::vmap_stats().fallback.empty(); }
int64_t batched_count(const std::string& op) {
  auto it = jit::vmap_stats().batched.find(op);
  return it == jit::vmap_stats().batched.end() ? 0 : it->second;
}

}  // namespace

TEST_CASE("vmap: elementwise ops broadcast against unbatched weights and lower-rank batched operands", "[vmap]") {
  const Tensor w = rnd(1, Shape{3, 4}), c = rnd(2, Shape{4});
  // x [3, 4] and v [4] per example; w and c are constants of the graph.
  auto f = [&](const TensorList& in) {
    const Tensor &x = in[0], &v = in[1];
    return TensorList{tanh(x * w + c) - exp(x) / 2.0, x * v, where(gt(x, v), x, v * 3.0), maximum(v, c)};
  };
  jit::reset_vmap_stats();
  const Tensor x = rnd(3, Shape{5, 3, 4}), v = rnd(4, Shape{5, 4});
  check_same(jit::vmap(f)({x, v}), loop(f, {x, v}));
  CHECK(no_fallback());
  CHECK(batched_count("mul") >= 2);
  CHECK(batched_count("where") == 1);
}

TEST_CASE("vmap: matmul and linear with a batched x and a shared weight", "[vmap]") {
  const Tensor W = rnd(10, Shape{3, 4}), W2 = rnd(11, Shape{6, 3}), b2 = rnd(12, Shape{6});
  auto f = [&](const TensorList& in) {
    const Tensor& x = in[0];  // [5, 3]
    return TensorList{matmul(x, W), linear(x, W2, b2), matmul(x.slice(0, 0, 1).squeeze(0), W), linear(x, W2)};
  };
  jit::reset_vmap_stats();
  const Tensor x = rnd(13, Shape{7, 5, 3});
  // The batch folds into one GEMM over 7x more rows (Eigen in f64), whose vectorised kernel may cover
  // rows the per-example GEMM computes in its remainder path (another FMA pattern): a few ulps.
  const TensorList got = jit::vmap(f)({x}), want = loop(f, {x});
  for (size_t k = 0; k < got.size(); ++k) CHECK(max_rel_err(got[k], want[k]) <= 1e-15);
  CHECK(no_fallback());
  CHECK(batched_count("matmul") == 2);
  CHECK(batched_count("linear") == 2);
}

TEST_CASE("vmap: matmul and linear with both operands batched, and a batched weight with a shared x", "[vmap]") {
  // a [2, 5, 3] @ b [3, 4] per example; b of higher per-example rank than a in the second product.
  auto f = [](const TensorList& in) { return TensorList{matmul(in[0], in[1]), matmul(in[1].T(), in[0].transpose(-1, -2))}; };
  jit::reset_vmap_stats();
  const Tensor a = rnd(20, Shape{6, 2, 5, 3}), b = rnd(21, Shape{6, 3, 4});
  // Per example, matmul folds a's two matrices into one GEMM (b is shared); batched, b varies with the
  // batch, so each matrix is its own GEMM: a few ulps.
  const TensorList got_ab = jit::vmap(f)({a, b}), want_ab = loop(f, {a, b});
  for (size_t k = 0; k < 2; ++k) CHECK(max_rel_err(got_ab[k], want_ab[k]) <= 1e-15);
  // An ensemble: per-member weights and biases, one shared input x.
  auto g = [](const TensorList& in) { return TensorList{linear(in[0], in[1], in[2])}; };
  const Tensor x = rnd(22, Shape{5, 3}), w = rnd(23, Shape{6, 4, 3}), bias = rnd(24, Shape{6, 4});
  const std::vector<int> axes{jit::not_batched, 0, 0};
  // linear adds the bias inside its GEMM (beta = 1), the rule after a matmul: one rounding apart.
  const TensorList got = jit::vmap(g, axes)({x, w, bias}), want = loop(g, {x, w, bias}, axes);
  CHECK(max_rel_err(got[0], want[0]) <= 1e-15);
  // Only the bias batched: the op without it on the shared x, then + b (one rounding, as above).
  const std::vector<int> bias_only{jit::not_batched, jit::not_batched, 0};
  const Tensor w0 = w.slice(0, 0, 1).squeeze(0);
  CHECK(max_rel_err(jit::vmap(g, bias_only)({x, w0, bias})[0], loop(g, {x, w0, bias}, bias_only)[0]) <= 1e-15);
  CHECK(no_fallback());
}

TEST_CASE("vmap: reductions with keepdims and negative axes", "[vmap]") {
  auto f = [](const TensorList& in) {
    const Tensor& x = in[0];  // [3, 4, 5]
    return TensorList{sum(x, {-1}, true), max(x, {0}), mean(x, {0, -1}), min(x), logsumexp(x, {-2}, true),
                      sum(x, {}, true), sum(sum(x), {})};  // the last reduces a 0-d value
  };
  jit::reset_vmap_stats();
  const Tensor x = rnd(30, Shape{4, 3, 4, 5});
  check_same(jit::vmap(f)({x}), loop(f, {x}));
  auto am = [](const TensorList& in) { return TensorList{argmax(in[0], -2, true), argmax(in[0], 0)}; };
  const TensorList got = jit::vmap(am)({x}), want = loop(am, {x});
  for (size_t k = 0; k < 2; ++k) {
    CHECK(got[k].shape() == want[k].shape());
    CHECK(got[k].to_vector<int64_t>() == want[k].to_vector<int64_t>());
  }
  CHECK(no_fallback());
  CHECK(batched_count("sum") >= 5);
  CHECK(batched_count("argmax") == 2);
}

TEST_CASE("vmap: softmax, log_softmax and layer_norm", "[vmap]") {
  const Tensor w = rnd(40, Shape{6}), b = rnd(41, Shape{6});
  auto f = [&](const TensorList& in) {
    const Tensor& x = in[0];  // [4, 6]
    return TensorList{softmax(x, 0), log_softmax(x, -1), layer_norm(x, w, b), layer_norm(x, {}, {}, 1e-3)};
  };
  jit::reset_vmap_stats();
  const Tensor x = rnd(42, Shape{3, 4, 6});
  check_same(jit::vmap(f)({x}), loop(f, {x}));
  // Per-example layer-norm parameters: normalised with w = 1, b = 0, then scaled and shifted by separate
  // ops, where the kernel may contract v * w + b into one FMA (-march=native): one rounding apart.
  auto g = [](const TensorList& in) { return TensorList{layer_norm(in[0], in[1], in[2])}; };
  const Tensor ws = rnd(43, Shape{3, 6}), bs = rnd(44, Shape{3, 6}), x0 = x.slice(0, 0, 1).squeeze(0);
  const std::vector<int> shared_x{jit::not_batched, 0, 0};
  CHECK(max_rel_err(jit::vmap(g)({x, ws, bs})[0], loop(g, {x, ws, bs})[0]) <= 1e-15);
  CHECK(max_rel_err(jit::vmap(g, shared_x)({x0, ws, bs})[0], loop(g, {x0, ws, bs}, shared_x)[0]) <= 1e-15);
  CHECK(no_fallback());
  CHECK(batched_count("layer_norm") == 4);
}

TEST_CASE("vmap: reshape, permute, transpose, slice, concat, expand, take, one_hot, unbind", "[vmap]") {
  const Tensor idx = from_vector(std::vector<int64_t>{2, 0, 2, 1}, Shape{4});
  auto f = [&](const TensorList& in) {
    const Tensor& x = in[0];  // [3, 4]
    return TensorList{x.reshape(Shape{2, 6}), x.permute({1, 0}), x.T().slice(-1, 1, 3), x.slice(0, 0, 3, 2),
                      concat({x, x * 2.0}, -1), x.slice(0, 0, 1).expand(Shape{2, 3, 4}), take(x, idx, 0),
                      take(x, idx.slice(0, 0, 2), -1), pad(x, 1, 1, 2), x.flatten().unsqueeze(0), unbind(x, 1)[2],
                      unbind(x.T(), -1)[0]};
  };
  jit::reset_vmap_stats();
  const Tensor x = rnd(50, Shape{5, 3, 4});
  check_same(jit::vmap(f)({x}), loop(f, {x}));
  // Batched indices into a shared table, and one_hot of batched labels.
  const Tensor table = rnd(51, Shape{5, 3}), ids = testing::randint(RngKey::from_seed(52), Shape{4, 2}, 5);
  auto g = [&](const TensorList& in) {
    return TensorList{embedding(table, in[0]), take(table, in[0], 0), take(table.T(), in[0], 1), one_hot(in[0], 5, DType::f64)};
  };
  check_same(jit::vmap(g)({ids}), loop(g, {ids}));
  // A batched table with shared ids.
  auto h = [&](const TensorList& in) { return TensorList{embedding(in[0], ids)}; };
  const Tensor tables = rnd(53, Shape{3, 5, 2});
  check_same(jit::vmap(h)({tables}), loop(h, {tables}));
  CHECK(no_fallback());
}

TEST_CASE("vmap: conv2d with a shared weight, and per-example gradients through convolutions", "[vmap]") {
  const Tensor w1 = rnd(55, Shape{4, 2, 3, 3}), b1 = rnd(56, Shape{4}), w2 = rnd(57, Shape{3, 4, 3, 3});
  // Per example: x [2, 2, 7, 7] (N = 2 images).
  auto net = [&](const Tensor& x) { return conv2d(relu(conv2d(x, w1, b1, {1, 1}, {1, 1})), w2, {}, {2, 2}); };
  auto f = [&](const TensorList& in) {
    auto [value, g] = value_and_grad([&] { return sum(square(net(in[0]))); }, {{"w1", w1}, {"b1", b1}, {"w2", w2}});
    return TensorList{net(in[0]), value, g.at("w1"), g.at("b1"), g.at("w2")};
  };
  jit::reset_vmap_stats();
  const Tensor x = rnd(58, Shape{3, 2, 2, 7, 7});
  const TensorList got = jit::vmap(f)({x}), want = loop(f, {x});
  // The f64 convolution kernels are direct loops computing each image on its own: bitwise. The weight
  // gradients (outputs 2 and 4) are one GEMM per batch over the patches (Conv2dBackwardWeight::batch),
  // summing the same products in another order: a few ulps of the largest element (the elements that
  // come out of cancellation carry the rounding of the large terms).
  check_same({got[0], got[1], got[3]}, {want[0], want[1], want[3]});
  CHECK(max_normwise_err(got[2], want[2]) <= 1e-15);
  CHECK(max_normwise_err(got[4], want[4]) <= 1e-15);
  CHECK(no_fallback());
  CHECK(batched_count("conv2d") == 4);  // the forward twice (the output, and inside value_and_grad)
  CHECK(batched_count("conv2d_backward_input") == 1);
  CHECK(batched_count("conv2d_backward_weight") == 2);  // with its bias gradient (b1), and without
}

TEST_CASE("vmap: conv2d of an ensemble (per-example weights and biases), and its weight gradients", "[vmap]") {
  // Per member: w [4, 2, 3, 3], b [4]; x [2, 2, 7, 6] shared by the members or their own.
  const Tensor ws = rnd(60, Shape{3, 4, 2, 3, 3}), bs = rnd(61, Shape{3, 4}), x = rnd(62, Shape{2, 2, 7, 6}), xs = rnd(63, Shape{3, 2, 2, 7, 6});
  auto f = [](const TensorList& in) {
    return TensorList{conv2d(in[0], in[1], in[2], {2, 1}, {1, 2}), conv2d(in[0], in[1], {}, {1, 1}, {0, 0})};
  };
  // The members' patches times their weights, one batched GEMM, against oneDNN's / the direct loops'
  // convolution per member: the same products summed in another order.
  for (const std::vector<int>& axes : {std::vector<int>{jit::not_batched, 0, 0}, std::vector<int>{0, 0, 0}, std::vector<int>{0, jit::not_batched, 0}}) {
    const TensorList args{axes[0] == 0 ? xs : x, axes[1] == 0 ? ws : ws.slice(0, 0, 1).squeeze(0), bs};
    jit::reset_vmap_stats();
    const TensorList got = jit::vmap(f, axes)(args), want = loop(f, args, axes);
    for (size_t k = 0; k < got.size(); ++k) CHECK(max_normwise_err(got[k], want[k]) <= 1e-15);
    CHECK(no_fallback());
    CHECK(batched_count("conv2d") == 2);
  }
  // Training an ensemble of two-layer CNNs: each member's gradients with respect to its own weights. The
  // second layer's input gradient (for the first layer's weights) is col2im of dy^T w per member.
  const Tensor w2s = rnd(64, Shape{3, 3, 4, 2, 3});
  auto g = [](const TensorList& in) {
    auto [value, gr] = value_and_grad(
        [&] { return sum(square(relu(conv2d(relu(conv2d(in[0], in[1], in[2], {1, 1}, {1, 1})), in[3], {}, {2, 2}, {1, 0})))); },
        ParamTree{{"w", in[1]}, {"b", in[2]}, {"w2", in[3]}});
    return TensorList{value, gr.at("w"), gr.at("b"), gr.at("w2")};
  };
  const std::vector<int> axes{jit::not_batched, 0, 0, 0};
  jit::reset_vmap_stats();
  const TensorList got = jit::vmap(g, axes)({x, ws, bs, w2s}), want = loop(g, {x, ws, bs, w2s}, axes);
  for (size_t k = 0; k < got.size(); ++k) CHECK(max_normwise_err(got[k], want[k]) <= 1e-15);
  CHECK(no_fallback());
  CHECK(batched_count("conv2d_backward_input") == 1);
  CHECK(batched_count("conv2d_backward_weight") == 2);
}

TEST_CASE("vmap: in_axes 1, negative in_axes and not_batched inputs", "[vmap]") {
  auto f = [](const TensorList& in) { return TensorList{matmul(in[0], in[1]) + in[2]}; };  // x [3, 4], w [4, 2], c [2]
  jit::reset_vmap_stats();
  const Tensor x = rnd(60, Shape{3, 5, 4}), w = rnd(61, Shape{4, 2}), c = rnd(62, Shape{2, 5});
  const std::vector<int> axes{1, jit::not_batched, -1};
  const TensorList got = jit::vmap(f, axes)({x, w, c}), want = loop(f, {x, w, c}, axes);
  CHECK(max_rel_err(got[0], want[0]) <= 1e-15);  // one folded GEMM (see above)
  CHECK(no_fallback());
}

TEST_CASE("vmap: out_axes move the batch axis in each output; unbatched outputs are broadcast", "[vmap]") {
  const Tensor w = rnd(70, Shape{3});
  auto f = [&](const TensorList& in) { return TensorList{in[0] * w, sum(in[0], {0}), w * 2.0}; };  // x [4, 3]
  const Tensor x = rnd(71, Shape{6, 4, 3});
  const std::vector<int> out_axes{1, -1, 1};
  const TensorList got = jit::vmap(f, {}, out_axes)({x}), want = loop(f, {x}, {}, out_axes);
  check_same(got, want);
  CHECK(got[0].shape() == Shape{4, 6, 3});
  CHECK(got[1].shape() == Shape{3, 6});
  CHECK(got[2].shape() == Shape{3, 6});  // does not depend on x: the same row for every example
}

namespace {
// A two-layer MLP on one example: x [T, 8] -> logits [T, 5]; params w1 [16, 8], b1 [16], w2 [5, 16], b2 [5].
struct Mlp {
  Tensor w1 = rnd(80, Shape{16, 8}), b1 = rnd(81, Shape{16}), w2 = rnd(82, Shape{5, 16}), b2 = rnd(83, Shape{5});
  ParamTree params() const { return {{"w1", w1}, {"b1", b1}, {"w2", w2}, {"b2", b2}}; }
  Tensor logits(const Tensor& x) const { return linear(tanh(linear(x, w1, b1)), w2, b2); }
  Tensor ce(const Tensor& x, const Tensor& y) const { return cross_entropy(logits(x), y); }
  Tensor mse(const Tensor& x, const Tensor& t) const { return mean(square(logits(x) - t)); }
};
}  // namespace

TEST_CASE("vmap: an MLP loss per example", "[vmap]") {
  const Mlp m;
  auto f = [&](const TensorList& in) { return TensorList{m.ce(in[0], in[1]), m.mse(in[0], in[2])}; };
  jit::reset_vmap_stats();
  const Tensor x = rnd(84, Shape{6, 3, 8}), y = testing::randint(RngKey::from_seed(85), Shape{6, 3}, 5), t = rnd(86, Shape{6, 3, 5});
  // The linears run one GEMM over the batch's rows (Eigen's vectorised path covers more of them than
  // for one example's 3 rows); the mean cross-entropy is the sum of the unreduced losses over each
  // example's rows divided by the count, as the kernel sums them: a few ulps.
  const TensorList got = jit::vmap(f)({x, y, t}), want = loop(f, {x, y, t});
  for (size_t k = 0; k < 2; ++k) CHECK(max_rel_err(got[k], want[k]) <= 1e-15);
  CHECK(no_fallback());
  CHECK(batched_count("cross_entropy") == 1);
  // Labels set to ignore_index are left out of each example's mean (an example with all of them ignored: 0).
  Tensor y2 = y.clone(), first = y2.slice(0, 0, 1), one = y2.slice(0, 1, 2).slice(1, 0, 1);
  fill_(first, -100);
  fill_(one, -100);
  const TensorList got2 = jit::vmap(f)({x, y2, t}), want2 = loop(f, {x, y2, t});
  CHECK(max_rel_err(got2[0], want2[0]) <= 1e-15);
  CHECK(vec(got2[0])[0] == 0.0);
}

TEST_CASE("vmap: per-example gradients batch the backward ops too", "[vmap]") {
  const Mlp m;
  // Per example: the loss and its gradient with respect to every parameter.
  auto grads_of = [&](std::function<Tensor(const Tensor&, const Tensor&)> loss) {
    return [&m, loss](const TensorList& in) {
      auto [value, g] = value_and_grad([&] { return loss(in[0], in[1]); }, m.params());
      return TensorList{value, g.at("w1"), g.at("b1"), g.at("w2"), g.at("b2")};
    };
  };
  const Tensor x = rnd(90, Shape{5, 3, 8}), t = rnd(91, Shape{5, 3, 5}), y = testing::randint(RngKey::from_seed(92), Shape{5, 3}, 5);
  // The forward and backward GEMMs run over the whole batch (see above), and the errors of the forward
  // pass propagate through the backward one: a few ulps more.
  const double tol = 1e-14;

  SECTION("mean squared error: every forward and backward op has a rule") {
    auto f = grads_of([&](const Tensor& xi, const Tensor& ti) { return m.mse(xi, ti); });
    jit::reset_vmap_stats();
    const TensorList got = jit::vmap(f)({x, t}), want = loop(f, {x, t});
    for (size_t k = 0; k < got.size(); ++k) {
      INFO("output " << k);
      CHECK(max_rel_err(got[k], want[k]) <= tol);
    }
    CHECK(no_fallback());
    CHECK(batched_count("matmul") == 3);  // linear's vjp: dw = g^T @ x for both layers, dx = g @ w for the second
  }
  SECTION("cross-entropy: its backward (reduction mean) runs as reduction none with per-example cotangents") {
    auto f = grads_of([&](const Tensor& xi, const Tensor& yi) { return m.ce(xi, yi); });
    jit::reset_vmap_stats();
    const TensorList got = jit::vmap(f)({x, y}), want = loop(f, {x, y});
    for (size_t k = 0; k < got.size(); ++k) {
      INFO("output " << k);
      CHECK(max_rel_err(got[k], want[k]) <= tol);
    }
    CHECK(no_fallback());
    CHECK(batched_count("cross_entropy_backward") == 1);
  }
  SECTION("layer_norm: its backward's dw and db are sums over each example's rows") {
    const Tensor lw = rnd(93, Shape{8}), lb = rnd(94, Shape{8});
    auto f = [&](const TensorList& in) {
      auto [value, g] = value_and_grad([&] { return sum(square(relu(layer_norm(in[0], lw, lb)))); }, {{"w", lw}, {"b", lb}});
      return TensorList{value, g.at("w"), g.at("b")};
    };
    jit::reset_vmap_stats();
    const TensorList got = jit::vmap(f)({x}), want = loop(f, {x});
    for (size_t k = 0; k < got.size(); ++k) {
      INFO("output " << k);
      CHECK(max_rel_err(got[k], want[k]) <= tol);
    }
    CHECK(no_fallback());
    CHECK(batched_count("layer_norm_backward") == 1);
  }
}

TEST_CASE("vmap: nested vmap matches a double loop", "[vmap]") {
  const Tensor w = rnd(100, Shape{4, 3});
  // Per (i, j): x [4], v [3] -> softmax(x @ w) . v and x * 2.
  auto f = [&](const TensorList& in) { return TensorList{sum(softmax(matmul(in[0], w)) * in[1]), in[0] * 2.0}; };
  const Tensor x = rnd(101, Shape{5, 6, 4}), v = rnd(102, Shape{6, 3});
  // Inner: over x's axis 0 (i) with v shared; outer: over x's axis 1 and v's axis 0 (j).
  auto inner = jit::vmap(f, {0, jit::not_batched});
  auto outer = jit::vmap(inner, {1, 0}, {-1, 0});
  jit::reset_vmap_stats();
  const TensorList got = outer({x, v});
  // The double loop: out[i, j] = f(x[i, j], v[j]) for the first output (batch axes i, j), and
  // [j, i, 4] for the second.
  auto inner_loop = [&](const TensorList& in) { return loop(f, in, {0, jit::not_batched}); };
  const TensorList want = loop(inner_loop, {x, v}, {1, 0}, {-1, 0});
  REQUIRE(got[0].shape() == Shape{5, 6});
  REQUIRE(got[1].shape() == Shape{6, 5, 4});
  // matmul of a [4] row by w: one GEMM per example in the loop, one over all 30 rows batched.
  CHECK(max_rel_err(got[0], want[0]) <= 1e-15);
  CHECK(vec(got[1]) == vec(want[1]));
  CHECK(no_fallback());
}

TEST_CASE("vmap under jit::trace: the traced graph replays on new inputs", "[vmap]") {
  const Tensor w = rnd(110, Shape{4, 3}), c = rnd(111, Shape{3});
  auto f = [&](const TensorList& in) { return TensorList{log_softmax(matmul(in[0], w) + c), max(in[0], {-1})}; };
  auto vf = jit::vmap(f);
  const Tensor x = rnd(112, Shape{6, 2, 4});
  jit::Graph g = jit::trace(vf, {x});
  CHECK_THAT(g.str(), Contains("matmul") && Contains("log_softmax"));
  const Tensor x2 = rnd(113, Shape{6, 2, 4});
  const TensorList got = g.run({x2}), want = loop(f, {x2});
  CHECK(max_rel_err(got[0], want[0]) <= 1e-15);  // one folded GEMM (see above)
  CHECK(vec(got[1]) == vec(want[1]));
  // And through jit(): compiled once, replayed for a new batch of the same shape.
  auto compiled = jit::jit(vf);
  compiled({x});
  const TensorList got2 = compiled({x2});
  CHECK(compiled.stats().misses == 1);
  CHECK(compiled.stats().hits == 1);
  CHECK(vec(got2[1]) == vec(want[1]));
}

TEST_CASE("vmap: gradients flow through a vmapped function", "[vmap]") {
  const Tensor w = rnd(120, Shape{4, 3});
  auto f = [&](const TensorList& in) { return TensorList{tanh(matmul(in[0], w))}; };
  auto vf = jit::vmap(f);
  const Tensor x = rnd(121, Shape{5, 2, 4});
  auto [v1, g1] = value_and_grad([&] { return sum(vf({x})[0]); }, {{"w", w}});
  auto [v2, g2] = value_and_grad([&] { return sum(loop(f, {x})[0]); }, {{"w", w}});
  // The gradient of w sums over the examples in another order (one GEMM over all rows, not a sum of
  // per-example GEMMs): a few ulps.
  CHECK(max_rel_err(v1, v2) <= 1e-14);
  CHECK(max_rel_err(g1.at("w"), g2.at("w")) <= 1e-14);
}

TEST_CASE("vmap: the common ops take their rule; ops without one loop and stay correct", "[vmap]") {
  const Tensor w = rnd(130, Shape{4, 4}), lw = rnd(131, Shape{4});
  auto f = [&](const TensorList& in) {
    const Tensor& x = in[0];  // [3, 4]
    Tensor h = gelu(linear(x, w)) + relu(sum(x, {-1}, true)) * sigmoid(mean(x, {0}));
    Tensor n = layer_norm(h, lw, {});
    Tensor s = softmax(n.reshape(Shape{4, 3}).T(), -1);
    return TensorList{sum(s.slice(0, 1, 3), {0}), sqrt(abs(n)) - square(n) / clamp(exp(n), 0.5, 2.0)};
  };
  jit::reset_vmap_stats();
  const Tensor x = rnd(132, Shape{4, 3, 4});
  const TensorList got = jit::vmap(f)({x}), want = loop(f, {x});
  for (size_t k = 0; k < got.size(); ++k) CHECK(max_rel_err(got[k], want[k]) <= 1e-15);
  CHECK(no_fallback());
  for (const char* op : {"linear", "gelu_tanh", "add", "relu", "sum", "mul", "sigmoid", "layer_norm", "reshape", "permute",
                         "softmax", "slice", "sqrt", "abs", "square", "div", "clamp", "exp", "sub"}) {
    INFO(op);
    CHECK(batched_count(op) >= 1);
  }
  // Attention: the batch is one more leading axis, forward and backward (q batched; k, v shared or batched).
  const Tensor k = rnd(133, Shape{2, 5, 4}), v = rnd(134, Shape{2, 5, 4});
  auto att = [&](const TensorList& in) {
    auto [value, g] = value_and_grad(
        [&] { return sum(square(scaled_dot_product_attention(in[0], in[1], v, true))); }, ParamTree{{"k", in[1]}});
    return TensorList{scaled_dot_product_attention(in[0], k, in[1]), value, g.at("k")};
  };
  const Tensor qb = rnd(135, Shape{3, 2, 5, 4}), kb = rnd(136, Shape{3, 2, 5, 4});
  jit::reset_vmap_stats();
  const TensorList ga = jit::vmap(att)({qb, kb}), wa = loop(att, {qb, kb});
  for (size_t i = 0; i < ga.size(); ++i) CHECK(max_rel_err(ga[i], wa[i]) <= 1e-13);
  CHECK(no_fallback());
  CHECK(batched_count("scaled_dot_product_attention") == 2);
  CHECK(batched_count("scaled_dot_product_attention_backward") == 1);
  // The packed op ([..., T, 3, H, D]) likewise, with its gradient.
  auto packed = [](const TensorList& in) {
    auto [value, g] = value_and_grad([&] { return sum(square(scaled_dot_product_attention_qkvpacked(in[0], true))); },
                                     ParamTree{{"qkv", in[0]}});
    return TensorList{value, g.at("qkv")};
  };
  const Tensor pb = rnd(137, Shape{3, 2, 5, 3, 2, 4});
  jit::reset_vmap_stats();
  const TensorList gp = jit::vmap(packed)({pb}), wp = loop(packed, {pb});
  for (size_t i = 0; i < gp.size(); ++i) CHECK(max_rel_err(gp[i], wp[i]) <= 1e-13);
  CHECK(no_fallback());
  CHECK(batched_count("scaled_dot_product_attention_qkvpacked") == 1);
  CHECK(batched_count("scaled_dot_product_attention_qkvpacked_backward") == 1);
}

// ------------------------------------------------------------------------------------ per-example gradients
// The backward ops whose per-example results sum over the example's rows (a weight gradient, a scatter
// into a table, a reduced loss's cotangent) have rules too (Op::batch), so per-example gradients of whole
// models run batched: no op falls back to a loop over the batch.

TEST_CASE("vmap: cross_entropy_backward for each reduction, with ignored labels", "[vmap]") {
  const Tensor w = rnd(300, Shape{5, 4});
  const Tensor x = rnd(301, Shape{4, 3, 4});
  Tensor y = testing::randint(RngKey::from_seed(302), Shape{4, 3}, 5);
  Tensor y0 = y.slice(0, 0, 1), y21 = y.slice(0, 2, 3).slice(1, 1, 2);
  fill_(y0, -100);  // every label of example 0 ignored (its mean loss and gradient: 0)
  fill_(y21, -100);
  for (Reduction red : {Reduction::sum, Reduction::mean, Reduction::none}) {
    INFO("reduction " << int(red));
    auto f = [&](const TensorList& in) {
      auto [value, g] = value_and_grad([&] { return sum(cross_entropy(linear(in[0], w), in[1], red) * 1.5); }, ParamTree{{"x", in[0]}});
      return TensorList{value, g.at("x")};
    };
    jit::reset_vmap_stats();
    const TensorList got = jit::vmap(f)({x, y}), want = loop(f, {x, y});
    for (size_t k = 0; k < got.size(); ++k) CHECK(max_rel_err(got[k], want[k]) <= 1e-15);
    CHECK(vec(got[1]) == vec(want[1]));  // example 0's gradient is exactly 0 in both
    CHECK(no_fallback());
    CHECK(batched_count("cross_entropy_backward") == 1);
  }
  // One label per example (logits [C], labels []), the class axis alone.
  auto one = [&](const TensorList& in) {
    auto [value, g] = value_and_grad([&] { return cross_entropy(in[0], in[1]); }, ParamTree{{"z", in[0]}});
    return TensorList{g.at("z")};
  };
  const Tensor z = rnd(303, Shape{6, 5}), labels = testing::randint(RngKey::from_seed(304), Shape{6}, 5);
  jit::reset_vmap_stats();
  CHECK(max_rel_err(jit::vmap(one)({z, labels})[0], loop(one, {z, labels})[0]) <= 1e-15);
  CHECK(no_fallback());
}

TEST_CASE("vmap: layer_norm_backward with shared and per-example w and b, rank-1 examples", "[vmap]") {
  const Tensor lb = rnd(310, Shape{6});
  auto f = [&](const TensorList& in) {
    auto [value, g] = value_and_grad([&] { return sum(square(relu(layer_norm(in[0], in[1], lb)) - 0.3)); },
                                     ParamTree{{"x", in[0]}, {"w", in[1]}, {"b", lb}});
    return TensorList{value, g.at("x"), g.at("w"), g.at("b")};
  };
  for (const Shape& per_example : {Shape{3, 2, 6}, Shape{6}}) {
    INFO(per_example.str());
    Shape xs{4};
    for (int64_t d : per_example) xs.push_back(d);
    const Tensor x = rnd(311, xs), ws = rnd(312, Shape{4, 6}), w0 = rnd(313, Shape{6});
    jit::reset_vmap_stats();
    // Per-example w (an ensemble of norms): dx from the op on dy * w, dw and db summed per example.
    TensorList got = jit::vmap(f)({x, ws}), want = loop(f, {x, ws});
    for (size_t k = 0; k < got.size(); ++k) CHECK(max_rel_err(got[k], want[k]) <= 1e-14);
    // A shared w.
    const std::vector<int> axes{0, jit::not_batched};
    got = jit::vmap(f, axes)({x, w0}), want = loop(f, {x, w0}, axes);
    for (size_t k = 0; k < got.size(); ++k) CHECK(max_rel_err(got[k], want[k]) <= 1e-14);
    CHECK(no_fallback());
    CHECK(batched_count("layer_norm_backward") == 2);
  }
}

TEST_CASE("vmap: dropout gives each example the loop's mask; slice_scatter with a step", "[vmap]") {
  for (DType dt : {DType::f64, DType::f32}) {
    INFO(dtype_name(dt));
    Tensor x = rnd(320, Shape{4, 3, 5}).astype(dt);
    // Non-finite values: where dropped, the kernel writes 0 (not 0 * inf).
    Tensor a = x.slice(0, 1, 2).slice(1, 0, 1), b = x.slice(0, 3, 4).slice(2, 2, 3);
    fill_(a, INFINITY);
    fill_(b, NAN);
    const Tensor step = scalar(3.0, DType::i64);
    auto d = [&](const TensorList& in) {
      return TensorList{dropout(in[0], 0.4, RngKey::from_seed(7)), dropout(in[0], 0.25, RngKey::from_seed(8), step)};
    };
    jit::reset_vmap_stats();
    const TensorList got = jit::vmap(d)({x}), want = loop(d, {x});
    REQUIRE(got.size() == 2);
    for (size_t k = 0; k < 2; ++k) {
      const auto g = vec(got[k]), w = vec(want[k]);
      REQUIRE(g.size() == w.size());
      for (size_t i = 0; i < g.size(); ++i) CHECK((g[i] == w[i] || (std::isnan(g[i]) && std::isnan(w[i]))));
    }
    CHECK(no_fallback());
    CHECK(batched_count("dropout") == 2);
  }
  // Gradients through it (its vjp is dropout again), and a 16-bit x, which loops (the kernel scales in f32).
  auto gd = [](const TensorList& in) {
    auto [value, g] = value_and_grad([&] { return sum(square(dropout(in[0], 0.5, RngKey::from_seed(9)))); }, ParamTree{{"x", in[0]}});
    return TensorList{g.at("x")};
  };
  const Tensor x = rnd(321, Shape{3, 8});
  jit::reset_vmap_stats();
  check_same(jit::vmap(gd)({x}), loop(gd, {x}));
  CHECK(no_fallback());
  auto half = [](const TensorList& in) { return TensorList{dropout(in[0], 0.5, RngKey::from_seed(9))}; };
  const Tensor xh = x.astype(DType::bf16);
  jit::reset_vmap_stats();
  check_same(jit::vmap(half)({xh}), loop(half, {xh}));
  CHECK(jit::vmap_stats().fallback == std::map<std::string, int64_t>{{"dropout", 1}});
  // slice with a step: its vjp is a slice_scatter with that step.
  auto sl = [](const TensorList& in) {
    auto [value, g] = value_and_grad([&] { return sum(square(in[0].slice(-1, 1, 7, 2))); }, ParamTree{{"x", in[0]}});
    return TensorList{g.at("x")};
  };
  jit::reset_vmap_stats();
  check_same(jit::vmap(sl)({x}), loop(sl, {x}));
  CHECK(no_fallback());
  CHECK(batched_count("slice_scatter") == 1);
}

TEST_CASE("vmap: take, embedding and their scatter-add gradients with batched indices", "[vmap]") {
  // Per example: a table x [3, 4, 2] (or shared), indices [5] into its axis 1 with repeats, ids [2, 4]
  // into an embedding table [6, 3].
  const Tensor xs = rnd(330, Shape{4, 3, 4, 2}), tables = rnd(331, Shape{4, 6, 3});
  const Tensor idx = testing::randint(RngKey::from_seed(332), Shape{4, 5}, 4), ids = testing::randint(RngKey::from_seed(333), Shape{4, 2, 4}, 6);
  auto f = [](const TensorList& in) {
    auto [value, g] = value_and_grad([&] { return sum(square(take(in[0], in[1], 1))) + sum(square(embedding(in[2], in[3])) * 0.5); },
                                     ParamTree{{"x", in[0]}, {"t", in[2]}});
    return TensorList{take(in[0], in[1], 1), embedding(in[2], in[3]), g.at("x"), g.at("t")};
  };
  // Both operands batched: the examples' tables stacked into one of B * n rows. The scatter sums each
  // row's gradients in the loop's order: bitwise.
  jit::reset_vmap_stats();
  check_same(jit::vmap(f)({xs, idx, tables, ids}), loop(f, {xs, idx, tables, ids}));
  CHECK(no_fallback());
  CHECK(batched_count("take_backward") == 1);
  CHECK(batched_count("embedding_backward") == 1);
  // Shared tables (per-example gradients of one table: batched indices), and shared indices into
  // batched tables.
  const Tensor x0 = xs.slice(0, 0, 1).squeeze(0), t0 = tables.slice(0, 0, 1).squeeze(0);
  const Tensor i0 = idx.slice(0, 0, 1).squeeze(0), d0 = ids.slice(0, 0, 1).squeeze(0);
  for (const std::vector<int>& axes : {std::vector<int>{jit::not_batched, 0, jit::not_batched, 0}, std::vector<int>{0, jit::not_batched, 0, jit::not_batched}}) {
    const TensorList args = axes[0] == 0 ? TensorList{xs, i0, tables, d0} : TensorList{x0, idx, t0, ids};
    jit::reset_vmap_stats();
    check_same(jit::vmap(f, axes)(args), loop(f, args, axes));
    CHECK(no_fallback());
  }
  // An index out of range in one example is that op's error, not a row of the next example's table:
  // also where only the gradient (the scatter) is computed. (Not in example 0, which fn is traced on.)
  Tensor bad = idx.clone(), e2 = bad.slice(0, 2, 3).slice(1, 2, 3);
  fill_(e2, 4);
  auto e = testing::catch_error<ValueError>([&] { jit::vmap(f)({xs, bad, tables, ids}); });
  CHECK_THAT(e.message(), Contains("index out of range"));
  auto only_grad = [](const TensorList& in) {
    return TensorList{value_and_grad([&] { return sum(take(in[0], in[1], 0)); }, ParamTree{{"x", in[0]}}).second.at("x")};
  };
  auto eg = testing::catch_error<ValueError>([&] { jit::vmap(only_grad, {jit::not_batched, 0})({x0, bad.slice(1, 0, 3)}); });
  CHECK_THAT(eg.message(), Contains("index out of range"));
  CHECK_THAT(eg.found(), Contains("index 4"));
}

TEST_CASE("vmap: sum_squares per example, bitwise the loop's; its gradient through the batched op", "[vmap]") {
  // Per example: a [40000] f32 tensor (three of the kernel's 16384-element chunks), a [3, 5] bf16 one.
  const Tensor a = rnd(360, Shape{4, 40000}).astype(DType::f32), h = rnd(361, Shape{4, 3, 5}).astype(DType::bf16);
  auto f = [](const TensorList& in) { return TensorList{sum_squares(in)}; };
  jit::reset_vmap_stats();
  check_same(jit::vmap(f)({a, h}), loop(f, {a, h}));
  CHECK(no_fallback());
  // A shared tensor among them: its sum added once to every example's.
  const Tensor w = rnd(362, Shape{7});
  const std::vector<int> axes{0, jit::not_batched, 0};
  CHECK(max_rel_err(jit::vmap(f, axes)({a, w, h})[0], loop(f, {a, w, h}, axes)[0]) <= 1e-15);
  // The gradient of the per-example sums' total with respect to the batch: 2 x (the rows op's vjp).
  const Tensor x = rnd(363, Shape{3, 4, 2});
  auto [value, g] = value_and_grad([&] { return sum(jit::vmap(f)({x})[0] * from_vector(std::vector<double>{1, 2, 3}, Shape{3})); },
                                   ParamTree{{"x", x}});
  const Tensor scale = from_vector(std::vector<double>{2, 4, 6}, Shape{3, 1, 1});
  check_same({g.at("x")}, {x * scale});
}

namespace {
// A small CNN on one [1, 12, 12] image: conv, relu, max_pool (2, 3), conv, relu, max_pool (3, stride 2,
// padding 1), linear, and the loss against one label, with its gradient for every parameter.
struct Cnn {
  explicit Cnn(DType dt)
      : w1(rnd(340, Shape{4, 1, 3, 3}).astype(dt)), b1(rnd(341, Shape{4}).astype(dt)), w2(rnd(342, Shape{6, 4, 3, 3}).astype(dt)),
        w3(rnd(343, Shape{5, 12}).astype(dt)) {}
  TensorList operator()(const TensorList& in) const {
    const ParamTree p{{"w1", w1}, {"b1", b1}, {"w2", w2}, {"w3", w3}};
    auto [value, g] = value_and_grad(
        [&] {
          Tensor h = max_pool2d(relu(conv2d(in[0].unsqueeze(0), w1, b1, {1, 1}, {1, 1})), {2, 3});
          h = max_pool2d(relu(conv2d(h, w2)), {3, 3}, {2, 2}, {1, 1});
          return cross_entropy(linear(h.reshape(Shape{1, 12}), w3), in[1].unsqueeze(0));
        },
        p);
    // DP-SGD's per-example clipping factor (Abadi et al. 2016): min(1, C / |g|) over every gradient.
    const Tensor norm = sqrt(sum_squares(g.tensors()));
    return TensorList{value, g.at("w1"), g.at("b1"), g.at("w2"), g.at("w3"), minimum(scalar_like(1.0, norm), 3.0 / norm)};
  }
  Tensor w1, b1, w2, w3;
};
}  // namespace

TEST_CASE("vmap: per-example gradients of a CNN with max pooling (f64 loops, f32 oneDNN)", "[vmap]") {
  // f64: direct-loop kernels; f32: oneDNN's, with its own max-pool workspace layout, over B * N images
  // where the loop gives them N, and the weight gradients summed by a GEMM: f32 roundings in sums of a
  // few hundred terms, measured against the output's largest element.
  for (auto [dt, tol] : {std::pair{DType::f64, 1e-14}, std::pair{DType::f32, 2e-6}}) {
    INFO(dtype_name(dt));
    const Cnn net(dt);
    auto f = [&net](const TensorList& in) { return net(in); };
    const Tensor x = rnd(344, Shape{5, 1, 12, 12}).astype(dt), y = testing::randint(RngKey::from_seed(345), Shape{5}, 5);
    jit::reset_vmap_stats();
    const TensorList got = jit::vmap(f)({x, y}), want = loop(f, {x, y});
    for (size_t k = 0; k < got.size(); ++k) {
      INFO("output " << k);
      CHECK(max_normwise_err(got[k], want[k]) <= tol);
    }
    CHECK(no_fallback());
    CHECK(batched_count("max_pool2d") == 2);
    CHECK(batched_count("max_pool2d_backward") == 2);
    CHECK(batched_count("conv2d_backward_weight") == 2);
    CHECK(batched_count("sum_squares") == 1);
  }
  // The pooling's winners (max_pool2d_indices, what its second derivative gathers at).
  auto idx = [](const TensorList& in) { return TensorList{max_pool2d_indices(in[0], {3, 2}, {2, 2}, {1, 1})}; };
  const Tensor x = rnd(346, Shape{3, 2, 4, 7, 6});
  jit::reset_vmap_stats();
  check_same(jit::vmap(idx)({x}), loop(idx, {x}));
  CHECK(no_fallback());
}

TEST_CASE("vmap: per-example gradients of a GPT, every op by its rule", "[vmap][gpt]") {
  nn::GPTConfig c;
  c.vocab = 13;
  c.layers = 2;
  c.heads = 2;
  c.dim = 8;
  c.seq_len = 5;
  c.dtype = DType::f64;
  nn::GPT m(c);
  for (auto& [path, t] : m.parameters()) copy_(t, testing::randn64(RngKey::from_seed(std::hash<std::string>{}(path)), t.shape(), 0.5));
  const ParamTree params = m.parameters();
  // Per example: one sequence of ids [T] and its targets [T] -> the loss and every parameter's gradient.
  auto f = [&](const TensorList& in) {
    auto [value, g] = value_and_grad([&] { return m.loss(in[0].unsqueeze(0), in[1].unsqueeze(0)); }, params);
    TensorList out{value};
    for (const auto& [path, t] : params) out.push_back(g.at(path));
    return out;
  };
  const Tensor ids = testing::randint(RngKey::from_seed(350), Shape{4, 5}, 13), targets = testing::randint(RngKey::from_seed(351), Shape{4, 5}, 13);
  jit::reset_vmap_stats();
  const TensorList got = jit::vmap(f)({ids, targets}), want = loop(f, {ids, targets});
  REQUIRE(got.size() == params.size() + 1);
  // The linears are GEMMs over the batch's rows (other blockings than one example's): an ulp or so.
  for (size_t k = 0; k < got.size(); ++k) {
    INFO("output " << k << (k ? " " + params[k - 1].first : std::string(" loss")));
    CHECK(max_rel_err(got[k], want[k]) <= 1e-15);
  }
  CHECK(no_fallback());
  for (const char* op : {"embedding", "embedding_backward", "layer_norm_backward", "cross_entropy_backward",
                         "scaled_dot_product_attention_qkvpacked_backward"}) {
    INFO(op);
    CHECK(batched_count(op) >= 1);
  }
}

TEST_CASE("vmap: errors", "[vmap]") {
  auto f = [](const TensorList& in) { return TensorList{in[0] + in.back()}; };
  const Tensor x = rnd(140, Shape{4, 3}), y = rnd(141, Shape{5, 3});
  auto e1 = testing::catch_error<ValueError>([&] { jit::vmap(f, {0})({x, x}); });
  CHECK_THAT(e1.message(), Contains("in_axes"));
  CHECK(e1.expected() == "2 entries (or none)");
  auto e2 = testing::catch_error<ShapeError>([&] { jit::vmap(f, {2, 0})({x, x}); });
  CHECK_THAT(e2.message(), Contains("in_axes[0] is out of range"));
  CHECK_THAT(e2.found(), Contains("[4, 3]"));
  testing::catch_error<ShapeError>([&] { jit::vmap(f, {-3, 0})({x, x}); });
  auto e3 = testing::catch_error<ShapeError>([&] { jit::vmap(f, {0, jit::not_batched})({scalar(1.0, DType::f64), x}); });
  CHECK_THAT(e3.expected(), Contains("0-d"));
  auto e4 = testing::catch_error<ShapeError>([&] { jit::vmap(f)({x, y}); });
  CHECK_THAT(e4.message(), Contains("different batch sizes"));
  CHECK_THAT(e4.expected(), Contains("4 (input 0"));
  CHECK_THAT(e4.found(), Contains("5 (input 1"));
  auto e5 = testing::catch_error<ValueError>([&] { jit::vmap(f, {jit::not_batched, jit::not_batched})({x, x}); });
  CHECK_THAT(e5.message(), Contains("no input is batched"));
  auto e6 = testing::catch_error<ValueError>([&] { jit::vmap(f, {}, {0, 1})({x, x}); });
  CHECK_THAT(e6.message(), Contains("out_axes"));
  CHECK(e6.expected() == "1 entries (or none)");
  auto e7 = testing::catch_error<ShapeError>([&] { jit::vmap(f, {}, {2})({x, x}); });
  CHECK_THAT(e7.message(), Contains("out_axes[0] is out of range"));
  testing::catch_error<ValueError>([&] { jit::vmap(f)({x, Tensor()}); });
  testing::catch_error<ValueError>([&] { jit::vmap(f)({x.slice(0, 0, 0), x.slice(0, 0, 0)}); });
  testing::catch_error<ValueError>([&] { jit::vmap(jit::Fn()); });
  // fn's own errors surface from the trace on one example.
  auto bad = [](const TensorList& in) { return TensorList{matmul(in[0], in[0])}; };  // [3] @ [3]: fine; [2, 3] @ [2, 3]: not
  testing::catch_error<ShapeError>([&] { jit::vmap(bad)({rnd(142, Shape{4, 2, 3})}); });
}

// ------------------------------------------------------------------------------------ control flow

namespace {
// How many examples (entries of a [B] predicate) are nonzero.
int64_t count_true(const Tensor& p) {
  int64_t n = 0;
  for (double v : vec(p.astype(DType::f64))) n += v != 0.0;
  return n;
}
}  // namespace

TEST_CASE("vmap of cond: a shared predicate keeps one cond, a per-example one selects per example", "[vmap][control_flow]") {
  const Tensor w = rnd(200, Shape{3});
  // Per example: x [3], s [] -> branches reading w (a capture) and a batched intermediate u.
  auto f = [&](const TensorList& in) {
    const Tensor u = exp(in[0]);
    auto t = [&](const TensorList& a) { return TensorList{a[0] * w + u, sum(a[0])}; };
    auto e = [&](const TensorList& a) { return TensorList{a[0] - u, max(a[0], {0})}; };
    return jit::cond(gt(in[1], scalar(0.0, DType::f64)), t, e, {in[0]});
  };
  const Tensor x = rnd(201, Shape{6, 3});
  SECTION("the predicate is shared by the batch (s not batched): one cond over the batched branches") {
    for (double sv : {1.0, -1.0}) {
      const Tensor s = scalar(sv, DType::f64);
      jit::reset_vmap_stats();
      check_same(jit::vmap(f, {0, jit::not_batched})({x, s}), loop(f, {x, s}, {0, jit::not_batched}));
      CHECK(batched_count("cond") == 1);
      CHECK(no_fallback());
    }
  }
  SECTION("a predicate per example: both branches on the batch, then where") {
    const Tensor s = rnd(202, Shape{6});
    REQUIRE(count_true(gt(s, scalar(0.0, DType::f64))) > 0);  // both branches are taken in the batch
    REQUIRE(count_true(le(s, scalar(0.0, DType::f64))) > 0);
    jit::reset_vmap_stats();
    check_same(jit::vmap(f)({x, s}), loop(f, {x, s}));
    CHECK(batched_count("cond") == 1);
    CHECK(no_fallback());
  }
}

TEST_CASE("vmap of while_loop: shared and per-example trip counts", "[vmap][control_flow]") {
  SECTION("a shared predicate: a carry made batched by the body is batched from the start") {
    // carry (i, acc): i counts to n (shared), acc starts as a shared zero and adds x each step.
    auto f = [&](const TensorList& in) {
      const Tensor x = in[0], n = in[1];
      const TensorList out = jit::while_loop([&](const TensorList& c) { return TensorList{lt(c[0], n)}; },
                                             [&](const TensorList& c) { return TensorList{c[0] + 1.0, c[1] * 0.5 + x}; },
                                             {scalar(0.0, DType::f64), zeros(Shape{3}, DType::f64)});
      return TensorList{out[0], out[1]};
    };
    const Tensor x = rnd(210, Shape{5, 3}), n = scalar(4.0, DType::f64);
    jit::reset_vmap_stats();
    check_same(jit::vmap(f, {0, jit::not_batched})({x, n}), loop(f, {x, n}, {0, jit::not_batched}));
    CHECK(batched_count("while_loop") == 1);
    CHECK(no_fallback());
  }
  SECTION("a per-example predicate: each example stops at its own step") {
    // Halve x until it is at most 1, counting the steps (a shared zero at first).
    auto f = [&](const TensorList& in) {
      const TensorList out = jit::while_loop([&](const TensorList& c) { return TensorList{gt(c[0], scalar(1.0, DType::f64))}; },
                                             [&](const TensorList& c) { return TensorList{c[0] * 0.5, c[1] + 1.0}; },
                                             {in[0], scalar(0.0, DType::f64)});
      return TensorList{out[0], out[1]};
    };
    const Tensor x = abs(rnd(211, Shape{8})) * 20.0;
    jit::reset_vmap_stats();
    const TensorList got = jit::vmap(f)({x}), want = loop(f, {x});
    check_same(got, want);
    std::vector<double> steps = vec(want[1]);
    std::sort(steps.begin(), steps.end());
    REQUIRE(steps.front() < steps.back());  // the examples really stop at different steps
    CHECK(batched_count("while_loop") == 1);
    CHECK(no_fallback());
  }
}

TEST_CASE("vmap of scan: batched and shared sequences, batched carries, reverse", "[vmap][control_flow]") {
  const Tensor a = rnd(220, Shape{4});
  // Per example: xs [T, 4] (batched), zs [T] (shared); h starts as a shared zero.
  auto f = [&](bool reverse) {
    return [&a, reverse](const TensorList& in) {
      auto step = [&](const TensorList& c, const TensorList& x) {
        const Tensor h = tanh(c[0] * a + x[0] + x[1]);
        return std::make_pair(TensorList{h}, TensorList{h * 2.0, x[1] * 3.0});
      };
      return jit::scan(step, {zeros(Shape{4}, DType::f64)}, {in[0], in[1]}, reverse);
    };
  };
  const Tensor xs = rnd(221, Shape{3, 5, 4}), zs = rnd(222, Shape{5});
  for (bool reverse : {false, true}) {
    INFO("reverse " << reverse);
    jit::reset_vmap_stats();
    const TensorList got = jit::vmap(f(reverse), {0, jit::not_batched})({xs, zs});
    check_same(got, loop(f(reverse), {xs, zs}, {0, jit::not_batched}));
    CHECK(got[2].shape() == Shape{3, 5});  // the shared y, broadcast to the batch
    CHECK(batched_count("scan") == 1);
    CHECK(no_fallback());
  }
  SECTION("in_axes 1 on the sequence: the batch behind the scanned axis") {
    const Tensor xt = rnd(223, Shape{5, 3, 4});  // [T, B, 4]
    check_same(jit::vmap(f(false), {1, jit::not_batched})({xt, zs}), loop(f(false), {xt, zs}, {1, jit::not_batched}));
  }
}

TEST_CASE("vmap of control flow: per-example gradients through scan and cond, nested vmap, under jit", "[vmap][control_flow]") {
  const Tensor a = rnd(230, Shape{4});
  // loss(x [T, 4], s []) = sum of a scan's ys, through a cond on s; its gradient with respect to a.
  auto loss = [&](const Tensor& x, const Tensor& s) {
    auto step = [&](const TensorList& c, const TensorList& xt) {
      const Tensor h = tanh(c[0] * a + xt[0]);
      return std::make_pair(TensorList{h}, TensorList{square(h)});
    };
    const Tensor ys = jit::scan(step, {zeros(Shape{4}, DType::f64)}, {x})[1];
    return jit::cond(gt(s, scalar(0.0, DType::f64)), [](const TensorList& v) { return TensorList{sum(v[0])}; },
                     [](const TensorList& v) { return TensorList{sum(v[0] * 3.0)}; }, {ys})[0];
  };
  auto grad_fn = [&](const TensorList& in) {
    auto [v, g] = value_and_grad([&] { return loss(in[0], in[1]); }, {{"a", a}});
    return TensorList{v, g.at("a")};
  };
  const Tensor xs = rnd(231, Shape{6, 5, 4}), s = rnd(232, Shape{6});
  REQUIRE(count_true(gt(s, scalar(0.0, DType::f64))) % 6 != 0);  // both branches in the batch

  SECTION("per-example gradients (the backward scans and conds batched too)") {
    jit::reset_vmap_stats();
    const TensorList got = jit::vmap(grad_fn)({xs, s}), want = loop(grad_fn, {xs, s});
    // sum() of a batched [B, T, 4] reduces each example's elements in the same order, but the
    // gradient's reductions of a's cotangent run over a [B, ...] operand: a few ulps.
    for (size_t k = 0; k < got.size(); ++k) {
      INFO("output " << k);
      CHECK(max_rel_err(got[k], want[k]) <= 1e-14);
    }
    CHECK(batched_count("scan") >= 3);  // the forward scan and the vjp's two
    CHECK(batched_count("cond") >= 2);  // the forward cond and the vjp's
    CHECK(no_fallback());
  }
  SECTION("nested vmap: a per-example predicate at both levels") {
    auto f = [&](const TensorList& in) { return TensorList{loss(in[0], in[1])}; };
    const Tensor x2 = rnd(233, Shape{2, 6, 5, 4}), s2 = rnd(234, Shape{2, 6});
    jit::reset_vmap_stats();
    const TensorList got = jit::vmap(jit::vmap(f))({x2, s2});
    const TensorList want = loop([&](const TensorList& in) { return loop(f, in); }, {x2, s2});
    CHECK(max_rel_err(got[0], want[0]) <= 1e-14);
    CHECK(no_fallback());
  }
  SECTION("under jit(): the per-example choice is made at replay time") {
    auto f = [&](const TensorList& in) { return TensorList{loss(in[0], in[1])}; };
    auto compiled = jit::jit(jit::vmap(f));
    compiled({xs, s});
    const Tensor s2 = -s;  // every example takes the other branch
    const TensorList got = compiled({xs, s2}), want = loop(f, {xs, s2});
    CHECK(compiled.stats().hits == 1);
    CHECK(max_rel_err(got[0], want[0]) <= 1e-14);
  }
}
