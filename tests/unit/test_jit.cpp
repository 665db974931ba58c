// jit/graph.h: tracing into the SSA IR, replay on fresh inputs against eager execution, the text and
// DOT forms, and the passes (dead code, common subexpressions, constant folding) on small graphs.
#include <catch2/catch.hpp>

#include "test_util.h"

#include "jit/graph.h"
#include "jit_test_util.h"
#include "op_cases.h"
#include "ops/ops.h"
#include "parallel/collectives.h"
#include "parallel/mesh.h"
#include "parallel/tp.h"

using namespace titanax;
using Catch::Matchers::Contains;

namespace {
Tensor rnd(uint64_t seed, const Shape& s) { return testing::randn64(RngKey::from_seed(seed), s); }
std::vector<double> vec(const Tensor& t) { return t.contiguous().to_vector<double>(); }
using testing::count_op;
}  // namespace

TEST_CASE("jit: a trace replays the function on fresh inputs") {
  const Tensor w = rnd(1, Shape{3, 5});
  auto f = [&](const TensorList& in) { return TensorList{tanh(matmul(in[0], w)) + exp(in[1]) * 2.0, sum(in[1])}; };
  const Tensor x = rnd(2, Shape{4, 3}), y = rnd(3, Shape{4, 5});
  jit::Graph g = jit::trace(f, {x, y});
  REQUIRE(g.inputs.size() == 2);
  REQUIRE(g.outputs.size() == 2);
  const Tensor x2 = rnd(4, Shape{4, 3}), y2 = rnd(5, Shape{4, 5});
  TensorList got = g.run({x2, y2}), want = f({x2, y2});
  CHECK(vec(got[0]) == vec(want[0]));  // the same ops and kernels: bitwise
  CHECK(vec(got[1]) == vec(want[1]));
  // w and the scalar 2 are constants of the graph.
  int consts = 0;
  for (const auto& v : g.values) consts += v.kind == jit::Value::Kind::constant;
  CHECK(consts >= 2);
  CHECK_THAT(g.str(), Contains("graph(%0: f64[4, 3], %1: f64[4, 5])") && Contains("= matmul(%0, %") && Contains("return"));
  CHECK_THAT(g.dot(), Contains("digraph jit") && Contains("shape=box") && Contains("-> out0"));
  // The signature is fixed at trace time.
  CHECK_THROWS_AS(g.run({rnd(6, Shape{2, 3}), y2}), ShapeError);
  CHECK_THROWS_AS(g.run({x2.astype(DType::f32), y2}), DTypeError);
  CHECK_THROWS_AS(g.run({x2}), ValueError);
}

TEST_CASE("jit passes: dead code, common subexpressions, constant folding") {
  const Tensor c = rnd(7, Shape{4});
  auto f = [&](const TensorList& in) {
    Tensor unused = log(exp(in[0]));                  // dead
    Tensor a = exp(in[0]) + exp(in[0]);               // exp twice: one after CSE
    Tensor k = exp(c) * 3.0;                          // constants only: folded
    return TensorList{a * k};
  };
  const Tensor x = rnd(8, Shape{4});
  jit::Graph g = jit::trace(f, {x});
  const TensorList want = f({x});
  CHECK(count_op(g, "exp") == 4);
  CHECK(jit::eliminate_dead_code(g) == 2);  // log and its exp
  CHECK(count_op(g, "log") == 0);
  CHECK(jit::eliminate_common_subexpressions(g) == 1);
  CHECK(count_op(g, "exp") == 2);  // exp(x) and exp(c)
  CHECK(jit::fold_constants(g) == 2);  // exp(c), then * 3
  CHECK(count_op(g, "exp") == 1);
  CHECK(jit::eliminate_dead_code(g) == 0);
  CHECK(g.num_nodes() == 3);  // exp(x), add, mul
  CHECK(vec(g.run({x})[0]) == vec(want[0]));
  const Tensor x2 = rnd(9, Shape{4});
  CHECK(vec(g.run({x2})[0]) == vec(f({x2})[0]));

  // Equal constants made separately merge, so nodes reading them merge too.
  auto h = [](const TensorList& in) { return TensorList{in[0] * 2.0 + in[0] * 2.0}; };
  jit::Graph g2 = jit::trace(h, {x});
  CHECK(jit::eliminate_common_subexpressions(g2) == 1);
  CHECK(vec(g2.run({x2})[0]) == vec(h({x2})[0]));
}

TEST_CASE("jit(): one compile per input signature, hits replay the cached graph") {
  int traced = 0;
  auto f = jit::jit([&](const TensorList& in) {
    ++traced;
    return TensorList{exp(in[0]) + exp(in[0]) * 2.0};
  });
  const Tensor a = rnd(1, Shape{4, 3}), b = rnd(2, Shape{4, 3}), c = rnd(3, Shape{8, 3});
  CHECK(vec(f({a})[0]) == vec(exp(a) + exp(a) * 2.0));
  CHECK(vec(f({b})[0]) == vec(exp(b) + exp(b) * 2.0));  // same signature: no new trace
  CHECK(traced == 1);
  CHECK(f.stats().hits == 1);
  CHECK(f.stats().misses == 1);
  f({c});                                               // a new shape compiles again
  f({a.astype(DType::f32)});                            // and a new dtype
  CHECK(traced == 3);
  CHECK(f.stats().misses == 3);
  CHECK(f.stats().compile_seconds > 0);
  // The cached graph was optimised: exp(x) once (CSE), then exp, * and + fused into one node.
  const jit::Graph* g = f.graph_for({a});
  REQUIRE(g != nullptr);
  CHECK(count_op(*g, "exp") == 0);
  CHECK(g->num_nodes() == 1);
  CHECK_THAT(g->nodes[0].op->attrs(), Contains("exp"));
  CHECK(f.graph_for({rnd(4, Shape{2, 2})}) == nullptr);
}

TEST_CASE("jit CSE keeps ops that differ only in their attributes") {
  auto f = [](const TensorList& in) {
    return TensorList{in[0].permute({1, 0, 2}) + in[0].permute({0, 2, 1}).reshape(Shape{3, 2, 4}),
                      sum(concat({in[0], in[0]}, 0)) + sum(concat({in[0], in[0]}, 1))};
  };
  const Tensor x = rnd(11, Shape{2, 3, 4});
  jit::Graph g = jit::trace(f, {x});
  jit::eliminate_common_subexpressions(g);
  CHECK(count_op(g, "permute") == 2);
  CHECK(count_op(g, "concat") == 2);
  const Tensor x2 = rnd(12, Shape{2, 3, 4});
  const TensorList got = g.run({x2}), want = f({x2});
  CHECK(vec(got[0]) == vec(want[0]));
  CHECK(vec(got[1]) == vec(want[1]));

  // Floating-point attributes print exactly: clamps 1e-7 apart stay two ops.
  auto h = [](const TensorList& in) { return TensorList{clamp(in[0], 0.0, 1.0000001) + clamp(in[0], 0.0, 1.0000002)}; };
  jit::Graph g2 = jit::trace(h, {x});
  jit::eliminate_common_subexpressions(g2);
  CHECK(count_op(g2, "clamp") == 2);
  const Tensor x3 = rnd(13, Shape{2, 3, 4}) * 4.0;
  CHECK(vec(g2.run({x3})[0]) == vec(h({x3})[0]));
}

TEST_CASE("jit algebraic simplification: x*1, x+0, x-0, x/1, permute undone") {
  const Tensor ones4 = ones(Shape{4}, DType::f64), zeros4 = zeros(Shape{4}, DType::f64);
  auto f = [&](const TensorList& in) {
    Tensor x = in[0];
    Tensor y = ((x * 1.0 + 0.0) - zeros4) / ones4;           // all four bypassed
    Tensor z = ones4 * exp(x);                                 // 1 * e -> e
    Tensor t = in[1].permute({2, 0, 1}).permute({1, 2, 0});    // undone
    Tensor u = in[1].permute({1, 0, 2}).permute({1, 0, 2});    // undone
    Tensor v = in[1].permute({1, 2, 0}).permute({1, 2, 0});    // not undone: a 3-cycle applied twice
    return TensorList{y + z, t + u, v};
  };
  const Tensor x = rnd(13, Shape{4}), w = rnd(14, Shape{2, 3, 3});
  jit::Graph g = jit::trace(f, {x, w});
  CHECK(jit::simplify_algebra(g) == 7);
  jit::eliminate_dead_code(g);
  CHECK(count_op(g, "mul") == 0);
  CHECK(count_op(g, "div") == 0);
  CHECK(count_op(g, "sub") == 0);
  CHECK(count_op(g, "add") == 2);     // y + z and t + u remain
  CHECK(count_op(g, "permute") == 2);  // only v's
  const Tensor x2 = rnd(15, Shape{4}), w2 = rnd(16, Shape{2, 3, 3});
  const TensorList got = g.run({x2, w2}), want = f({x2, w2});
  for (size_t k = 0; k < 3; ++k) CHECK(vec(got[k]) == vec(want[k]));

  // A broadcasting multiply by ones changes the shape: kept.
  auto h = [](const TensorList& in) { return TensorList{in[0] * ones(Shape{2, 4}, DType::f64)}; };
  jit::Graph g2 = jit::trace(h, {x});
  CHECK(jit::simplify_algebra(g2) == 0);
}

TEST_CASE("CSE keeps apart ops that differ in a parameter: sample dtype, vocab-parallel loss reduction, mesh", "[jit]") {
  // Found by auditing every op's attrs() (the CSE key): these left a parameter out, so two calls that
  // differ only there were merged into one node.
  auto optimized = [](const std::function<TensorList(const TensorList&)>& fn, const TensorList& in) {
    jit::Graph g = jit::trace(fn, in);
    jit::optimize(g);
    return g;
  };
  const RngKey key = RngKey::from_seed(4);
  auto samples = [&](const TensorList&) {
    return TensorList{random_normal(key, Shape{3}, DType::f32), random_normal(key, Shape{3}, DType::f64)};
  };
  const TensorList s = optimized(samples, {}).run({});
  CHECK(s[0].dtype() == DType::f32);
  CHECK(s[1].dtype() == DType::f64);

  Mesh mesh = MeshSpec{{"data", "model"}, {1, 1}}.build(make_local_communicator());
  Mesh other = MeshSpec{{"model", "data"}, {1, 1}}.build(make_local_communicator());
  const Tensor logits = testing::randn64(fold_in(key, 1), Shape{4, 6});
  const Tensor labels = from_vector(std::vector<int64_t>{0, 5, 3, 2}, Shape{4});  // the third loss ignores class 0
  auto losses = [&](const TensorList& in) {
    return TensorList{vocab_parallel_cross_entropy(mesh, in[0], labels, "model", Reduction::mean),
                      vocab_parallel_cross_entropy(mesh, in[0], labels, "model", Reduction::sum),
                      vocab_parallel_cross_entropy(mesh, in[0], labels, "model", Reduction::sum, 0)};
  };
  const TensorList got = optimized(losses, {logits}).run({logits}), want = losses({logits});
  for (size_t k = 0; k < got.size(); ++k) CHECK(got[k].item() == Approx(want[k].item()).epsilon(1e-12));
  CHECK(want[0].item() != Approx(want[1].item()));  // the three differ
  CHECK(want[1].item() != Approx(want[2].item()));

  // Collectives over the same axis name of two meshes (other groups in general) stay two nodes.
  auto sums = [&](const TensorList& in) { return TensorList{psum(mesh, in[0], "model"), psum(other, in[0], "model")}; };
  CHECK(testing::count_op(optimized(sums, {logits}), "psum") == 2);
  auto same = [&](const TensorList& in) { return TensorList{psum(mesh, in[0], "model"), psum(mesh, in[0], "model")}; };
  CHECK(testing::count_op(optimized(same, {logits}), "psum") == 1);  // the same collective twice is one
}

TEST_CASE("jit(): results of a call whose input requires grad carry gradients, as without jit", "[jit]") {
  // A replay is not recorded on the tape: such a call used to return results without gradients, so
  // grad() through them gave zeros. Now fn runs eagerly for it (JAX's jit is transparent to grad).
  auto f = jit::jit([](const TensorList& in) { return TensorList{tanh(in[0]) * in[1]}; });
  const Tensor a = rnd(61, Shape{4}), b = rnd(62, Shape{4});
  for (int call = 0; call < 2; ++call) {
    const Tensor x = a.detach().set_requires_grad();
    const TensorList g = grad(sum(f({x, b})[0]), {x});
    const Tensor t = tanh(a);
    const auto got = vec(g[0]), want = vec((1.0 - t * t) * b);
    for (size_t i = 0; i < want.size(); ++i) CHECK(got[i] == Approx(want[i]).epsilon(1e-12));
  }
  CHECK(f.stats().eager_for_grad == 2);
  CHECK(f.stats().misses == 0);
  // Without an input that requires grad, or without grad mode, calls compile and replay as before.
  f({a, b});
  {
    NoGradGuard ng;
    f({a.detach().set_requires_grad(), b});
  }
  CHECK(f.stats().misses == 1);
  CHECK(f.stats().hits == 1);
}
