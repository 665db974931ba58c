// jit/control_flow.h: cond, while_loop and scan, eagerly and traced (one node, replayed on inputs that
// take another branch / trip count), captures lifted into node inputs, and the gradients of cond and
// scan; each compared with plain C++ control flow over the same ops.
#include <catch2/catch.hpp>

#include <cmath>

#include "autodiff/autodiff.h"
#include "autodiff/functional.h"
#include "jit/control_flow.h"
#include "jit/vmap.h"
#include "jit_test_util.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;
using Catch::Matchers::Contains;

namespace {
Tensor rnd(uint64_t seed, const Shape& s) { return testing::randn64(RngKey::from_seed(seed), s); }
std::vector<double> vec(const Tensor& t) { return t.contiguous().to_vector<double>(); }
using testing::count_op;
void require_close(const Tensor& got, const Tensor& want, double tol = 1e-12) {
  REQUIRE(got.shape() == want.shape());
  const auto a = vec(got), b = vec(want);
  for (size_t i = 0; i < a.size(); ++i) CHECK(std::abs(a[i] - b[i]) <= tol * (1 + std::abs(b[i])));
}
Tensor positive(const Tensor& s) { return gt(s, scalar_like(0.0, s)); }

// The two branches used below, and the same computation written with a C++ if.
TensorList branch_t(const TensorList& in) { return {tanh(in[0]) * in[1] + 1.0, sum(in[1])}; }
TensorList branch_f(const TensorList& in) { return {exp(in[0]) - in[1], sum(in[0])}; }
TensorList plain(const Tensor& x, const Tensor& y) { return sum(x).item() > 0 ? branch_t({x, y}) : branch_f({x, y}); }
TensorList with_cond(const TensorList& in) { return jit::cond(positive(sum(in[0])), branch_t, branch_f, {in[0], in[1]}); }
}  // namespace

TEST_CASE("cond runs the branch its predicate picks", "[jit]") {
  int taken[2] = {0, 0};
  for (uint64_t seed = 1; seed <= 8; ++seed) {
    const Tensor x = rnd(seed, Shape{3, 2}), y = rnd(100 + seed, Shape{3, 2});
    const TensorList got = with_cond({x, y}), want = plain(x, y);
    REQUIRE(got.size() == 2);
    CHECK(vec(got[0]) == vec(want[0]));
    CHECK(vec(got[1]) == vec(want[1]));
    ++taken[sum(x).item() > 0];
  }
  CHECK(taken[0] > 0);  // the seeds exercise both branches
  CHECK(taken[1] > 0);
  // Any dtype: nonzero is true.
  const Tensor x = rnd(20, Shape{4});
  auto twice = [](const TensorList& in) { return TensorList{in[0] * 2.0}; };
  auto neg = [](const TensorList& in) { return TensorList{-in[0]}; };
  CHECK(vec(jit::cond(scalar(3, DType::i64), twice, neg, {x})[0]) == vec(x * 2.0));
  CHECK(vec(jit::cond(scalar(0, DType::bool_), twice, neg, {x})[0]) == vec(-x));
  CHECK(vec(jit::cond(scalar(0.5, DType::f32), twice, neg, {x})[0]) == vec(x * 2.0));
  // A branch may return an operand unchanged.
  auto same = [](const TensorList& in) { return TensorList{in[0]}; };
  CHECK(vec(jit::cond(scalar(1, DType::u8), same, neg, {x})[0]) == vec(x));
}

TEST_CASE("cond under trace is one node that picks the branch at replay time", "[jit]") {
  const Tensor x = rnd(1, Shape{3, 2}), y = rnd(2, Shape{3, 2});
  jit::Graph g = jit::trace(with_cond, {x, y});
  CHECK(count_op(g, "cond") == 1);
  CHECK(count_op(g, "tanh") == 0);  // the branches live inside the node
  CHECK(count_op(g, "exp") == 0);
  CHECK_THAT(g.str(), Contains("= cond["));
  int taken[2] = {0, 0};
  for (uint64_t seed = 10; seed < 20; ++seed) {
    const Tensor x2 = rnd(seed, Shape{3, 2}), y2 = rnd(50 + seed, Shape{3, 2});
    const TensorList got = g.run({x2, y2}), want = plain(x2, y2);
    CHECK(vec(got[0]) == vec(want[0]));
    CHECK(vec(got[1]) == vec(want[1]));
    ++taken[sum(x2).item() > 0];
  }
  CHECK(taken[0] > 0);
  CHECK(taken[1] > 0);
  // Through jit(): the cached graph replays both branches.
  auto f = jit::jit(with_cond);
  const Tensor p = abs(x), n = -abs(x);
  CHECK(vec(f({p, y})[0]) == vec(plain(p, y)[0]));  // traces
  CHECK(vec(f({n, y})[0]) == vec(plain(n, y)[0]));  // replays, other branch
  CHECK(vec(f({p, y})[0]) == vec(plain(p, y)[0]));
  CHECK(f.stats().misses == 1);
  CHECK(f.stats().hits == 2);
  CHECK(count_op(*f.graph_for({x, y}), "cond") == 1);
}

TEST_CASE("cond branches capture outside tensors as node inputs, traced intermediates included", "[jit]") {
  const Tensor w = rnd(3, Shape{2});  // a weight captured as a constant of the outer graph
  auto f = [&](const TensorList& in) {
    const Tensor h = in[0] * in[1];  // an intermediate of the outer trace, closed over by both branches
    return jit::cond(positive(sum(in[1])), [&](const TensorList& o) { return TensorList{o[0] + h * w}; },
                     [&](const TensorList& o) { return TensorList{o[0] - exp(h)}; }, {in[0]});
  };
  auto want = [&](const Tensor& x, const Tensor& y) { return sum(y).item() > 0 ? x + (x * y) * w : x - exp(x * y); };
  const Tensor x = rnd(4, Shape{3, 2}), y = rnd(5, Shape{3, 2});
  CHECK(vec(f({x, y})[0]) == vec(want(x, y)));
  jit::Graph g = jit::trace(f, {x, y});
  REQUIRE(count_op(g, "cond") == 1);
  for (const auto& n : g.nodes)
    if (std::string(n.op->name()) == "cond") CHECK(n.inputs.size() == 5);  // pred, the operand, h for each branch, w for the true branch
  int taken[2] = {0, 0};
  for (uint64_t seed = 30; seed < 40; ++seed) {
    const Tensor x2 = rnd(seed, Shape{3, 2}), y2 = rnd(60 + seed, Shape{3, 2});
    CHECK(vec(g.run({x2, y2})[0]) == vec(want(x2, y2)));  // h of the replay's inputs, not the trace's
    ++taken[sum(y2).item() > 0];
  }
  CHECK(taken[0] > 0);
  CHECK(taken[1] > 0);
}

TEST_CASE("cond refuses branches whose results differ, and a non-scalar predicate", "[jit]") {
  const Tensor x = rnd(6, Shape{4}), p = scalar(1.0, DType::f64);
  auto ok = [](const TensorList& in) { return TensorList{in[0] * 2.0}; };
  auto shape = [](const TensorList& in) { return TensorList{sum(in[0])}; };
  auto dtype = [](const TensorList& in) { return TensorList{in[0].astype(DType::f32)}; };
  auto two = [](const TensorList& in) { return TensorList{in[0], in[0]}; };
  CHECK_THROWS_WITH(jit::cond(p, ok, shape, {x}), Contains("false_fn result 0 has another shape"));
  CHECK_THROWS_AS(jit::cond(p, ok, shape, {x}), ShapeError);
  CHECK_THROWS_WITH(jit::cond(p, ok, dtype, {x}), Contains("false_fn result 0 has another dtype"));
  CHECK_THROWS_AS(jit::cond(p, ok, dtype, {x}), DTypeError);
  CHECK_THROWS_AS(jit::cond(p, ok, two, {x}), ShapeError);
  CHECK_THROWS_AS(jit::cond(x, ok, ok, {x}), ShapeError);
  // A branch that writes into an outside tensor cannot be replayed.
  Tensor state = zeros(Shape{4}, DType::f64);
  auto writes = [&](const TensorList& in) { copy_(state, in[0]); return TensorList{in[0] * 2.0}; };
  CHECK_THROWS_AS(jit::cond(p, writes, ok, {x}), TraceError);
}

TEST_CASE("cond's gradient is the gradient of the branch taken, eagerly and under trace", "[jit]") {
  // f(x) with w captured: true: sum(tanh(x) * w), false: sum(exp(x) * w * w).
  auto grads_cond = [](const Tensor& pred, const Tensor& x0, const Tensor& w0) {
    Tensor x = x0.detach(), w = w0.detach();
    x.set_requires_grad(true);
    w.set_requires_grad(true);
    const Tensor y = jit::cond(pred, [&](const TensorList& in) { return TensorList{sum(tanh(in[0]) * w)}; },
                               [&](const TensorList& in) { return TensorList{sum(exp(in[0]) * w * w)}; }, {x})[0];
    TensorList g = grad(y, {x, w});
    return TensorList{y.detach(), g[0], g[1]};
  };
  auto want = [](bool p, const Tensor& x, const Tensor& w) {  // the chosen branch, by hand
    if (p) return TensorList{sum(tanh(x) * w), (1.0 - tanh(x) * tanh(x)) * w, tanh(x)};
    return TensorList{sum(exp(x) * w * w), exp(x) * w * w, exp(x) * w * 2.0};
  };
  for (int p = 0; p < 2; ++p) {
    const Tensor x = rnd(7 + uint64_t(p), Shape{5}), w = rnd(9 + uint64_t(p), Shape{5});
    const TensorList got = grads_cond(scalar(p, DType::bool_), x, w), ref = want(p, x, w);
    for (int k = 0; k < 3; ++k) require_close(got[size_t(k)], ref[size_t(k)]);
  }
  // A training-step-like trace: forward and backward in one graph, pred an input.
  auto step = [&](const TensorList& in) { return grads_cond(positive(in[0]), in[1], in[2]); };
  const Tensor x = rnd(11, Shape{5}), w = rnd(12, Shape{5});
  jit::Graph g = jit::trace(step, {scalar(1.0, DType::f64), x, w});
  CHECK(count_op(g, "cond") == 2);  // the forward and its vjp, each one node
  CHECK(count_op(g, "tanh") == 0);
  for (uint64_t seed = 40; seed < 44; ++seed)
    for (int p = 0; p < 2; ++p) {
      const Tensor x2 = rnd(seed, Shape{5}), w2 = rnd(seed + 10, Shape{5});
      const TensorList got = g.run({scalar(p ? 2.0 : -2.0, DType::f64), x2, w2}), ref = want(p, x2, w2);
      for (int k = 0; k < 3; ++k) require_close(got[size_t(k)], ref[size_t(k)]);
    }
  // Against finite differences, both branches, operands and a captured tensor.
  for (int p = 0; p < 2; ++p) {
    const Tensor c = rnd(13, Shape{3});
    auto fn = [&](const TensorList& in) {
      const Tensor a = in[1];
      return jit::cond(scalar(p, DType::bool_), [&](const TensorList& o) { return TensorList{tanh(o[0]) * a}; },
                       [&](const TensorList& o) { return TensorList{o[0] * o[0] * a + c}; }, {in[0]})[0];
    };
    const GradcheckResult r = gradcheck(fn, {rnd(14, Shape{3}), rnd(15, Shape{3})});
    CHECK(r.ok);
    INFO(r.report);
  }
}

TEST_CASE("while_loop repeats the body while cond_fn holds, with trip counts fixed at run time", "[jit]") {
  // Doubling until the sum exceeds 100, counting the steps.
  auto cond_fn = [](const TensorList& c) { return TensorList{le(sum(c[0]), scalar_like(100.0, c[0]))}; };
  auto body_fn = [](const TensorList& c) { return TensorList{c[0] * 2.0, c[1] + 1.0}; };
  auto loop = [&](const TensorList& in) { return jit::while_loop(cond_fn, body_fn, {in[0], zeros(Shape{}, DType::f64)}); };
  auto plain_loop = [](const Tensor& x0) {
    Tensor x = x0;
    double n = 0;
    while (sum(x).item() <= 100) x = x * 2.0, n += 1;
    return std::make_pair(x, n);
  };
  const Tensor x = abs(rnd(16, Shape{3})) + 0.1;
  const TensorList got = loop({x});
  const auto [wx, wn] = plain_loop(x);
  CHECK(vec(got[0]) == vec(wx));
  CHECK(got[1].item() == wn);
  jit::Graph g = jit::trace(loop, {x});
  CHECK(count_op(g, "while_loop") == 1);
  CHECK(count_op(g, "mul") == 0);
  std::vector<double> counts;
  for (double scale : {1e-3, 0.5, 20.0, 500.0}) {  // many trips, a few, one or none
    const Tensor x2 = (abs(rnd(uint64_t(scale * 1000) + 1, Shape{3})) + 0.1) * scale;
    const TensorList r = g.run({x2});
    const auto [w2, n2] = plain_loop(x2);
    CHECK(vec(r[0]) == vec(w2));
    CHECK(r[1].item() == n2);
    counts.push_back(n2);
  }
  CHECK(counts.front() > counts[1]);
  CHECK(counts.back() == 0);
  // Not differentiable; the body must keep the carry's specs.
  Tensor xg = x.detach();
  xg.set_requires_grad(true);
  const Tensor y = jit::while_loop(cond_fn, body_fn, {xg, zeros(Shape{}, DType::f64)})[0];
  CHECK_THROWS_WITH(grad(sum(y), {xg}), Contains("while_loop is not reverse-mode differentiable"));
  CHECK_THROWS_AS(jit::while_loop(cond_fn, [](const TensorList& c) { return TensorList{c[0].astype(DType::f32), c[1]}; },
                                  {x, zeros(Shape{}, DType::f64)}),
                  DTypeError);
  CHECK_THROWS_AS(jit::while_loop([](const TensorList& c) { return TensorList{c[0]}; }, body_fn, {x, zeros(Shape{}, DType::f64)}),
                  ShapeError);
}

TEST_CASE("scan carries state over the leading axis and stacks the outputs", "[jit]") {
  // Cumulative sum.
  auto cumsum = [](const TensorList& in) {
    return jit::scan([](const TensorList& c, const TensorList& x) {
      const Tensor s = c[0] + x[0];
      return std::make_pair(TensorList{s}, TensorList{s});
    }, {zeros(Shape{3}, DType::f64)}, {in[0]});
  };
  auto plain_cumsum = [](const Tensor& xs) {
    std::vector<double> v = vec(xs), out(v.size());
    const size_t T = size_t(xs.shape()[0]), d = size_t(xs.shape()[1]);
    for (size_t j = 0; j < d; ++j)
      for (size_t t = 0; t < T; ++t) out[t * d + j] = (t ? out[(t - 1) * d + j] : 0.0) + v[t * d + j];
    return out;
  };
  const Tensor xs = rnd(17, Shape{6, 3});
  TensorList got = cumsum({xs});
  REQUIRE(got[1].shape() == Shape{6, 3});
  std::vector<double> want = plain_cumsum(xs);
  CHECK(vec(got[1]) == want);  // the same additions in the same order
  CHECK(vec(got[0]) == std::vector<double>(want.end() - 3, want.end()));
  jit::Graph g = jit::trace(cumsum, {xs});
  CHECK(count_op(g, "scan") == 1);
  const Tensor xs2 = rnd(18, Shape{6, 3});
  got = g.run({xs2});
  want = plain_cumsum(xs2);
  CHECK(vec(got[1]) == want);

  // An RNN: h' = tanh(W h + U x_t), y_t = sum(h'); W and U are inputs of the outer function, captured
  // by the body (so a replay reads the new weights).
  auto rnn = [](const TensorList& in) {
    const Tensor W = in[1], U = in[2];
    return jit::scan([&](const TensorList& c, const TensorList& x) {
      const Tensor h = tanh(matmul(W, c[0]) + matmul(U, x[0]));
      return std::make_pair(TensorList{h}, TensorList{sum(h)});
    }, {zeros(Shape{4}, DType::f64)}, {in[0]});
  };
  auto plain_rnn = [](const Tensor& xs, const Tensor& W, const Tensor& U) {
    Tensor h = zeros(Shape{4}, DType::f64);
    std::vector<double> ys;
    for (int64_t t = 0; t < xs.shape()[0]; ++t) {
      h = tanh(matmul(W, h) + matmul(U, xs.slice(0, t, t + 1).squeeze(0)));
      ys.push_back(sum(h).item());
    }
    return std::make_pair(h, ys);
  };
  const Tensor seq = rnd(19, Shape{5, 3}), W = rnd(20, Shape{4, 4}) * 0.5, U = rnd(21, Shape{4, 3});
  const TensorList r = rnn({seq, W, U});
  const auto [h, ys] = plain_rnn(seq, W, U);
  CHECK(vec(r[0]) == vec(h));
  CHECK(vec(r[1]) == ys);
  jit::Graph gr = jit::trace(rnn, {seq, W, U});
  CHECK(count_op(gr, "scan") == 1);
  CHECK(count_op(gr, "tanh") == 0);
  const Tensor seq2 = rnd(22, Shape{5, 3}), W2 = rnd(23, Shape{4, 4}) * 0.5, U2 = rnd(24, Shape{4, 3});
  const TensorList r2 = gr.run({seq2, W2, U2});
  const auto [h2, ys2] = plain_rnn(seq2, W2, U2);
  CHECK(vec(r2[0]) == vec(h2));
  CHECK(vec(r2[1]) == ys2);

  // Zero steps: the carry is init, the ys are empty.
  const TensorList empty = cumsum({zeros(Shape{0, 3}, DType::f64)});
  CHECK(vec(empty[0]) == std::vector<double>(3, 0.0));
  CHECK(empty[1].shape() == Shape{0, 3});
  CHECK_THROWS_AS(jit::scan([](const TensorList& c, const TensorList&) { return std::make_pair(c, c); }, {xs}, {xs, rnd(1, Shape{5})}),
                  ShapeError);
}

namespace {
// An RNN over xs [T, 3] with an integer step counter in the carry: h' = tanh(W h + U x_t) (W, U captured),
// y_t = (h' * h', the counter); returns {final h, ys, final counter, the counter's ys}.
TensorList rnn_scan(const Tensor& h0, const Tensor& xs, const Tensor& W, const Tensor& U, bool reverse) {
  const TensorList r = jit::scan([&](const TensorList& c, const TensorList& x) {
    const Tensor h = tanh(matmul(W, c[0]) + matmul(U, x[0]));
    const Tensor n = c[1] + scalar_like(1.0, c[1]);
    return std::make_pair(TensorList{h, n}, TensorList{h * h, n});
  }, {h0, zeros(Shape{}, DType::i64)}, {xs}, reverse);
  return {r[0], r[2], r[1], r[3]};
}
// The same computation as a C++ loop (the tape records every step).
TensorList rnn_unrolled(const Tensor& h0, const Tensor& xs, const Tensor& W, const Tensor& U, bool reverse) {
  const int64_t T = xs.shape()[0];
  Tensor h = h0;
  TensorList ys(static_cast<size_t>(T));
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    h = tanh(matmul(W, h) + matmul(U, xs.slice(0, t, t + 1).squeeze(0)));
    ys[size_t(t)] = (h * h).unsqueeze(0);
  }
  return {h, T ? concat(ys, 0) : zeros(Shape{0, h0.shape()[0]}, DType::f64)};
}
}  // namespace

TEST_CASE("scan's gradient: finite differences, the unrolled loop, reverse, and under trace", "[jit]") {
  for (bool reverse : {false, true}) {
    INFO("reverse " << reverse);
    // Against finite differences: init, xs and both captured weights (L = <[h_T, ys], v>).
    auto fn = [&](const TensorList& in) {
      const TensorList r = rnn_scan(in[0], in[1], in[2], in[3], reverse);
      return concat({r[0], r[1].flatten()}, 0);
    };
    const TensorList args{rnd(30, Shape{4}), rnd(31, Shape{5, 3}), rnd(32, Shape{4, 4}) * 0.5, rnd(33, Shape{4, 3})};
    const GradcheckResult r = gradcheck(fn, args);
    INFO(r.report);
    CHECK(r.ok);
    CHECK(r.max_abs_error > 0);  // the check compared numbers (not all zeros)

    // Against the unrolled loop: the same values and gradients (to rounding: other summation orders).
    const Tensor wy = rnd(34, Shape{5, 4});
    auto grads_of = [&](bool scanned, const TensorList& in) {
      TensorList leaves;
      for (const Tensor& t : in) {
        Tensor l = t.detach();
        l.set_requires_grad(true);
        leaves.push_back(l);
      }
      const TensorList o = scanned ? rnn_scan(leaves[0], leaves[1], leaves[2], leaves[3], reverse)
                                   : rnn_unrolled(leaves[0], leaves[1], leaves[2], leaves[3], reverse);
      const Tensor loss = sum(o[0] * scalar_like(1.5, o[0])) + sum(o[1] * wy);
      TensorList g = grad(loss, leaves);
      g.insert(g.begin(), loss.detach());
      return g;
    };
    const TensorList a = grads_of(true, args), b = grads_of(false, args);
    for (size_t k = 0; k < a.size(); ++k) require_close(a[k], b[k]);
    // The integer counter carried and stacked: 5 steps.
    const TensorList ints = rnn_scan(args[0], args[1], args[2], args[3], reverse);
    CHECK(ints[2].item() == 5);
    CHECK(vec(ints[3]) == (reverse ? std::vector<double>{5, 4, 3, 2, 1} : std::vector<double>{1, 2, 3, 4, 5}));

    // Under trace: forward and backward in one graph (the forward scan, and the backward's two); a
    // replay on new inputs equals the unrolled loop's gradients.
    jit::Graph g = jit::trace([&](const TensorList& in) { return grads_of(true, in); }, args);
    CHECK(count_op(g, "scan") == 3);
    CHECK(count_op(g, "tanh") == 0);
    const TensorList args2{rnd(40, Shape{4}), rnd(41, Shape{5, 3}), rnd(42, Shape{4, 4}) * 0.5, rnd(43, Shape{4, 3})};
    const TensorList got = g.run(args2), want = grads_of(false, args2);
    REQUIRE(got.size() == want.size());
    for (size_t k = 0; k < got.size(); ++k) require_close(got[k], want[k]);
  }
  // Zero steps: the final carry is init, so its cotangent passes straight through; nothing else moves.
  Tensor h0 = rnd(50, Shape{4}), W = rnd(51, Shape{4, 4}), U = rnd(52, Shape{4, 3}), xs = zeros(Shape{0, 3}, DType::f64);
  for (Tensor* t : {&h0, &W, &U, &xs}) t->set_requires_grad(true);
  const TensorList o = rnn_scan(h0, xs, W, U, false);
  const Tensor c = rnd(53, Shape{4});
  const TensorList g = grad(sum(o[0] * c), {h0, W, U, xs});
  require_close(g[0], c);
  CHECK(vec(g[1]) == std::vector<double>(16, 0.0));
  CHECK(vec(g[2]) == std::vector<double>(12, 0.0));
  CHECK(g[3].shape() == Shape{0, 3});
}

TEST_CASE("a host read of a traced value points to jit::cond", "[jit]") {
  auto branchy = [](const TensorList& in) { return TensorList{sum(in[0]).item() > 0 ? in[0] * 2.0 : in[0]}; };
  CHECK_THROWS_WITH(jit::trace(branchy, {rnd(25, Shape{4})}), Contains("jit::cond") && Contains("where()"));
}

TEST_CASE("a result that passes an operand through, or repeats another, stays a value of its own under trace", "[jit][control_flow]") {
  // Found by the control-flow fuzz: a branch returning its operand (and a loop that runs zero times,
  // or a scan whose carry is a captured tensor) gave back the operand's own storage, which the tracer
  // then took for the operand: a later read of the operand through another handle (detach(), as a
  // gradient's leaves are made) was traced as a read of the result, and a replay taking the other
  // branch computed with the wrong value. Likewise two results that were one tensor (the equal
  // cotangents of b0 + b1 in a cond's vjp): the first was read as the second.
  auto through = [](const TensorList& o) { return TensorList{o[0]}; };
  auto other = [](const TensorList& o) { return TensorList{o[0] * 3.0 + 1.0}; };
  auto with_cond = [&](const TensorList& in) {
    const Tensor y = jit::cond(gt(sum(in[0]), scalar_like(0.0, in[0])), through, other, {in[0]})[0];
    return TensorList{y + in[0].detach() * 2.0};
  };
  auto with_while = [&](const TensorList& in) {  // runs once when sum(x) > 0, else zero times
    const Tensor y = jit::while_loop([](const TensorList& c) { return TensorList{gt(sum(c[0]), scalar_like(0.0, c[0]))}; },
                                     [](const TensorList& c) { return TensorList{c[0] - 100.0}; }, {in[0]})[0];
    return TensorList{y + in[0].detach() * 2.0};
  };
  auto cond_grad = [](const TensorList& in) {  // d/dx of sum(3 x) or of sum(x + 2 x): 3 either way
    const Tensor x = in[0].detach().set_requires_grad();
    auto triple = [](const TensorList& o) { return TensorList{o[0] * 3.0}; };
    auto add = [](const TensorList& o) { return TensorList{o[0] + o[1]}; };
    return grad(sum(jit::cond(gt(sum(in[0]), scalar_like(0.0, in[0])), triple, add, {x, x * 2.0})[0]), {x});
  };
  const Tensor pos = abs(rnd(60, Shape{3})), neg = -abs(rnd(61, Shape{3}));
  for (auto [fn, name] : {std::pair{jit::Fn(with_cond), "cond"}, std::pair{jit::Fn(with_while), "while_loop"},
                          std::pair{jit::Fn(cond_grad), "the gradient of a cond"}}) {
    INFO(name);
    for (bool trace_pos : {true, false}) {  // trace on either branch / trip count, replay on the other
      const jit::Graph g = jit::trace(fn, {trace_pos ? pos : neg});
      const Tensor x = trace_pos ? neg : pos;
      require_close(g.run({x})[0], fn({x})[0]);
    }
  }
  // Eagerly too, a result never shares storage with an operand (an in-place write into it would change
  // the operand): a branch passing its operand through, a loop of zero trips, scans of zero steps and
  // of a carry that is a captured tensor.
  CHECK(jit::cond(scalar(1, DType::bool_), through, other, {pos})[0].storage() != pos.storage());
  auto twice = [](const TensorList& o) { return TensorList{o[0] + 1.0, o[0] + 1.0}; };
  auto once = [](const TensorList& o) {
    const Tensor y = o[0] * 2.0;
    return TensorList{y, y};
  };
  const TensorList two = jit::cond(scalar(0, DType::bool_), twice, once, {pos});
  CHECK(two[0].storage() != two[1].storage());
  CHECK(jit::while_loop([](const TensorList& c) { return TensorList{gt(sum(c[0]), scalar_like(0.0, c[0]))}; },
                        [](const TensorList& c) { return TensorList{c[0] - 100.0}; }, {neg})[0]
            .storage() != neg.storage());
  auto keep = [](const TensorList& c, const TensorList& xt) { return std::pair<TensorList, TensorList>{c, {xt[0]}}; };
  CHECK(jit::scan(keep, {pos}, {zeros(Shape{0, 3}, DType::f64)})[0].storage() != pos.storage());
  auto to_captured = [neg](const TensorList&, const TensorList& xt) { return std::pair<TensorList, TensorList>{{neg}, {xt[0]}}; };
  CHECK(jit::scan(to_captured, {pos}, {rnd(62, Shape{2, 3})})[0].storage() != neg.storage());
}

TEST_CASE("control flow under a trace holds no tensor of the trace: a gradient seed does not become state", "[jit][control_flow]") {
  // Found by the control-flow fuzz: a scan kept the tensors its body captured; its vjp, traced inside
  // grad(), captured the filled seed of the backward pass, so the trace saw a tensor it had filled still
  // alive afterwards, took it for state (as an optimizer's moments made on the first call) and recorded
  // an in-place update: vmap then refused the pure function.
  const Tensor x0 = rnd(70, Shape{3});
  auto per_example = [](const TensorList& in) {
    const Tensor x = in[0].detach().set_requires_grad();
    const Tensor w = x * 2.0;
    auto body = [w](const TensorList& c, const TensorList& xt) {
      return std::pair<TensorList, TensorList>{{tanh(c[0] * w + xt[0])}, {c[0]}};
    };
    return grad(sum(jit::scan(body, {x}, {expand(x, Shape{2, 3})})[0]), {x});
  };
  const jit::Graph g = jit::trace(per_example, {x0});
  CHECK(g.updates.empty());
  const Tensor xs = rnd(71, Shape{4, 3});
  const TensorList got = jit::vmap(per_example)({xs});
  for (int64_t b = 0; b < 4; ++b) require_close(got[0].slice(0, b, b + 1).squeeze(0), per_example({xs.slice(0, b, b + 1).squeeze(0)})[0]);
}

TEST_CASE("scan's second derivative reaches the tensors its body captures", "[jit][control_flow]") {
  // Found by the second-order control-flow fuzz: the backward scan read the captures through its
  // closure, detached them to differentiate, and the trace lifted those detached copies as new leaves:
  // a second derivative with respect to a capture was 0. Here the carry becomes tanh(c) at each step, so
  // h = tanh(c), d sum(h) / dc = 1 - tanh(c)^2, and d/dc <that, w> = -2 w tanh(c) (1 - tanh(c)^2).
  const Tensor c = rnd(80, Shape{3}), w = rnd(81, Shape{3});
  auto gradient_of_c = [&](const Tensor& cap, bool create_graph) {
    auto body = [cap](const TensorList&, const TensorList& xt) { return std::pair<TensorList, TensorList>{{tanh(cap)}, {xt[0]}}; };
    BackwardOptions o;
    o.create_graph = create_graph;
    return grad(sum(jit::scan(body, {zeros_like(cap)}, {rnd(82, Shape{2, 3})})[0]), {cap}, o)[0];
  };
  const Tensor leaf = c.detach().set_requires_grad();
  const Tensor second = grad(sum(gradient_of_c(leaf, true) * w), {leaf})[0];
  const Tensor t = tanh(c);
  require_close(second, w * t * (square(t) - 1.0) * 2.0);
  // And against finite differences, with the carry and xs in play too (init and xs as inputs).
  auto f = [&](const TensorList& in) {
    GradModeGuard on(true);
    const bool outer = in[0].requires_grad();
    TensorList xs = in;
    if (!outer)
      for (auto& x : xs) x = x.detach().set_requires_grad();
    const Tensor cap = xs[2];
    auto body = [cap](const TensorList& h, const TensorList& xt) {
      return std::pair<TensorList, TensorList>{{tanh(h[0] * cap + xt[0])}, {h[0] * xt[0]}};
    };
    const TensorList r = jit::scan(body, {xs[0]}, {xs[1]});
    BackwardOptions o;
    o.create_graph = outer;
    const TensorList g = grad(sum(r[0]) + sum(r[1] * r[1]), xs, o);
    return sum(g[0] * w) + sum(g[1]) + sum(g[2] * g[2]);
  };
  const GradcheckResult r = gradcheck(f, {rnd(83, Shape{3}), rnd(84, Shape{4, 3}), rnd(85, Shape{3})});
  INFO(r.report);
  CHECK(r.ok);
}

TEST_CASE("control flow inside checkpoint(): the forward traces the function's own ops", "[jit][control_flow]") {
  // checkpoint's forward runs its function inside an op; a scan or cond there traces its body with ops
  // nested in that op. The body's ops must still be recorded: a body traced as constants of its example
  // step gave every step of a scan the first step's values (and a while_loop's counter never moved).
  const Tensor p0 = testing::randn64(RngKey::from_seed(61), Shape{3});
  using Fn1 = std::function<Tensor(const Tensor&)>;
  const std::vector<std::pair<const char*, Fn1>> fns{
      {"scan ys", [](const Tensor& p) {
         auto body = [](const TensorList& c, const TensorList& x) {
           return std::pair<TensorList, TensorList>{{c[0] + x[0]}, {tanh(x[0] * c[0])}};
         };
         return jit::scan(body, {sum(p) * 0.5}, {p})[1];
       }},
      {"cond", [](const Tensor& p) {
         return jit::cond(gt(sum(p), scalar_like(100.0, p)), [](const TensorList& a) { return TensorList{a[0]}; },
                          [](const TensorList& a) { return TensorList{exp(a[0]) * a[0]}; }, {p})[0];
       }}};
  for (const auto& [name, f] : fns) {
    INFO(name);
    const Tensor plain = f(p0), ckpt = checkpoint(f, p0.detach().set_requires_grad());
    require_close(ckpt, plain, 0.0);
    // Gradients of a loss whose cotangent depends on the checkpoint's output, to second order.
    auto loss = [&](const TensorList& a, bool c) { return sum(square(c ? checkpoint(f, a[0]) : f(a[0]))); };
    const Tensor v = testing::randn64(RngKey::from_seed(62), Shape{3});
    const Tensor h1 = hvp([&](const TensorList& a) { return loss(a, true); }, {p0}, {v}).second[0];
    const Tensor h0 = hvp([&](const TensorList& a) { return loss(a, false); }, {p0}, {v}).second[0];
    require_close(h1, h0);
  }
}
