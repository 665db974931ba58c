// jit/fusion.h: elementwise fusion, GEMM epilogues, reduction prologues and kernel_launches. Every check
// runs the fused graph against the unfused graph (or eager execution) on fresh random inputs; the fused
// kernels use the same scalar math, GEMM and summation order, so the results must be bitwise equal.
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iostream>
#include <random>

#include <omp.h>

#include "test_util.h"

#include "autodiff/autodiff.h"
#include "engine/nn.h"
#include "engine/optim.h"
#include "jit/fusion.h"
#include "jit/memory_plan.h"
#include "jit_test_util.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;

namespace {
Tensor rnd(uint64_t seed, const Shape& s, DType t = DType::f64) {
  return testing::randn64(RngKey::from_seed(seed), s).astype(t);
}
using testing::count_op;
const jit::Node& first_op(const jit::Graph& g, const std::string& name) {
  for (const auto& node : g.nodes)
    if (name == node.op->name()) return node;
  FAIL("no node " << name);
  throw std::logic_error("unreachable");
}
double max_diff(const Tensor& a, const Tensor& b) {
  const auto x = a.contiguous().to_vector<double>(), y = b.contiguous().to_vector<double>();
  double d = 0;
  for (size_t i = 0; i < x.size(); ++i) d = std::max(d, std::abs(x[i] - y[i]));
  return d;
}
// Same shape, dtype and bytes.
void check_bitwise(const TensorList& got, const TensorList& want) {
  REQUIRE(got.size() == want.size());
  for (size_t k = 0; k < got.size(); ++k) {
    INFO("output " << k << ": " << got[k].str() << " vs " << want[k].str());
    REQUIRE(got[k].shape() == want[k].shape());
    REQUIRE(got[k].dtype() == want[k].dtype());
    const Tensor a = got[k].contiguous(), b = want[k].contiguous();
    INFO("max |diff| " << max_diff(a, b));
    CHECK(std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0);
  }
}
// Traces f on `args`, fuses a copy with `pass`, and checks the fused graph against the unfused one on
// `fresh` inputs. Returns the fused graph.
jit::Graph fused_vs_unfused(const std::function<TensorList(const TensorList&)>& f, const TensorList& args,
                            const TensorList& fresh, const std::function<int(jit::Graph&)>& pass) {
  const jit::Graph g = jit::trace(f, args);
  jit::Graph fg = g;
  const int removed = pass(fg);
  CHECK(removed > 0);
  CHECK(fg.num_nodes() == g.num_nodes() - size_t(removed));
  check_bitwise(fg.run(fresh), g.run(fresh));
  return fg;
}
}  // namespace

TEST_CASE("jit fusion: a gelu / tanh chain with a broadcast bias becomes one node, bitwise", "[jit][fusion]") {
  auto f = [](const TensorList& in) {
    const Tensor& x = in[0];
    Tensor h = x + in[1];                       // bias [N] onto [B, N]
    Tensor t = tanh(h) * 0.5 + sigmoid(h);      // scalars broadcast too
    Tensor y = gelu(t, true) - exp(neg(square(x))) / (abs(h) + 1.0);
    return TensorList{gelu(y, false) + clamp(y, -0.25, 0.75)};
  };
  for (DType t : {DType::f32, DType::f64, DType::bf16, DType::f16}) {
    INFO(dtype_name(t));
    // 300 x 257: chunks straddle rows, the bias is gathered, and the chunks run on several threads.
    const Shape s{300, 257}, sb{257};
    jit::Graph fg = fused_vs_unfused(f, {rnd(1, s, t), rnd(2, sb, t)}, {rnd(3, s, t), rnd(4, sb, t)}, jit::fuse_elementwise);
    CHECK(fg.num_nodes() == 1);
    CHECK(count_op(fg, "fused") == 1);
    CHECK(first_op(fg, "fused").outputs.size() == 1);
    CHECK(jit::kernel_launches(fg) == 1);
  }
}

TEST_CASE("jit fusion: strided and broadcast inputs, comparisons, where and casts", "[jit][fusion]") {
  auto f = [](const TensorList& in) {
    Tensor xt = in[0].T();                                 // a strided view feeds the group
    Tensor m = gt(xt, in[1]);                              // [N, B] vs column [N, 1]: bool
    Tensor y = where(m, exp(xt), xt * in[1]);
    Tensor z = y + m.astype(in[0].dtype()) * maximum(xt, in[1]) + pow(abs(xt) + 1.0, in[1]);
    Tensor u = tanh(exp(xt.clone()).astype(DType::f32)).astype(DType::f64) * xt.astype(DType::f64);  // copy, casts
    return TensorList{minimum(z, relu(xt)) + relu_backward(z, xt) + gelu_backward(z, xt, true), u};
  };
  for (DType t : {DType::f32, DType::f64, DType::bf16}) {
    INFO(dtype_name(t));
    const Shape s{64, 33}, sc{33, 1};
    jit::Graph fg = fused_vs_unfused(f, {rnd(5, s, t), rnd(6, sc, t)}, {rnd(7, s, t), rnd(8, sc, t)}, jit::fuse_elementwise);
    CHECK(count_op(fg, "fused") == 2);  // the two outputs share only inputs: two groups
    CHECK(count_op(fg, "permute") == 1);  // the view stays outside
    CHECK(jit::kernel_launches(fg) == 2);
  }
}

TEST_CASE("jit fusion: an intermediate used outside the group is an extra output of the fused node", "[jit][fusion]") {
  const Tensor w = rnd(9, Shape{40, 24});
  auto f = [&](const TensorList& in) {
    Tensor e = exp(in[0]) * 0.5;      // used by the group and by the matmul
    Tensor z = tanh(e) + in[0];
    return TensorList{z * z, matmul(e, w), e};  // e is also a graph output
  };
  jit::Graph fg = fused_vs_unfused(f, {rnd(10, Shape{30, 40})}, {rnd(11, Shape{30, 40})}, jit::fuse_elementwise);
  REQUIRE(count_op(fg, "fused") == 1);
  const jit::Node& fused = first_op(fg, "fused");
  CHECK(fused.outputs.size() == 2);  // e (read by matmul and returned) and z * z
  CHECK(count_op(fg, "matmul") == 1);
  // The fused node runs before the matmul reading its output.
  CHECK(fg.values[size_t(first_op(fg, "matmul").inputs[0])].producer < fg.values[size_t(first_op(fg, "matmul").outputs[0])].producer);
}

TEST_CASE("jit fusion: adds far apart (a gradient's contributions) stay apart, so each contribution dies early", "[jit][fusion][memory]") {
  // acc = c1 + c2 + c3 + c4 with each contribution a GEMM's output made just before its add, as a traced
  // backward accumulates a weight's gradient. One fused group for the adds would run at the last add and
  // keep all four contributions alive until then; fused or not, the planned peak must be that of the
  // unfused graph, while adjacent elementwise ops (tanh then * 2) still fuse.
  const TensorList ws{rnd(30, Shape{96, 128}), rnd(31, Shape{96, 128}), rnd(32, Shape{96, 128}), rnd(33, Shape{96, 128})};
  auto f = [&](const TensorList& in) {
    Tensor acc = tanh(in[0]) * 2.0;
    for (const Tensor& w : ws) acc = acc + matmul(in[1], w);
    return TensorList{sum(acc)};
  };
  const TensorList args{rnd(34, Shape{64, 128}), rnd(35, Shape{64, 96})};
  jit::Graph fg = fused_vs_unfused(f, args, {rnd(36, Shape{64, 128}), rnd(37, Shape{64, 96})}, jit::fuse_elementwise);
  // tanh, * 2 and the first two adds (a GEMM apart: each keeps alive as many bytes as it spares); the
  // later adds would keep two contributions alive across a GEMM to spare one, and stay apart.
  CHECK(count_op(fg, "fused") == 1);
  CHECK(count_op(fg, "add") == 2);
  jit::Graph g = jit::trace(f, args);
  const size_t unfused_peak = jit::plan_memory_pass(g).peak_live_bytes, fused_peak = jit::plan_memory_pass(fg).peak_live_bytes;
  INFO("planned peak: unfused " << unfused_peak << " B, fused " << fused_peak << " B");
  CHECK(fused_peak <= unfused_peak);
}

TEST_CASE("jit fusion: a non-elementwise op between elementwise nodes stops the group", "[jit][fusion]") {
  auto f = [](const TensorList& in) {
    Tensor a = tanh(in[0]) + 1.0;
    Tensor s = sum(a, {1}, true);      // [B, 1] from a
    Tensor b = exp(a * s);             // a * s reads a and s: joining a's group would need s inside it
    Tensor c = matmul(b, in[1]);       // [B, M]
    return TensorList{sigmoid(c) * c, b};
  };
  jit::Graph fg = fused_vs_unfused(f, {rnd(12, Shape{16, 20}), rnd(13, Shape{20, 12})},
                                   {rnd(14, Shape{16, 20}), rnd(15, Shape{20, 12})}, jit::fuse_elementwise);
  CHECK(count_op(fg, "fused") == 3);  // tanh + 1 | * s, exp | sigmoid, *
  CHECK(count_op(fg, "sum") == 1);
  CHECK(count_op(fg, "matmul") == 1);
  // Topological order: every input of a node is produced before it.
  for (size_t i = 0; i < fg.nodes.size(); ++i)
    for (int v : fg.nodes[i].inputs)
      CHECK(fg.values[size_t(v)].producer < int(i));

  // where() reads three groups; joining all three would put the sum inside: it joins those it can.
  auto w = [](const TensorList& in) {
    Tensor a = tanh(in[0]);                        // group A
    Tensor c = gt(a, sum(a, {1}, true));           // depends on A through the sum: group C
    Tensor b = exp(in[1]);                         // group B
    return TensorList{where(c, a, b) * 2.0};       // joins C and B, not A
  };
  jit::Graph fw = fused_vs_unfused(w, {rnd(16, Shape{8, 9}), rnd(17, Shape{8, 9})}, {rnd(18, Shape{8, 9}), rnd(19, Shape{8, 9})},
                                   jit::fuse_elementwise);
  CHECK(count_op(fw, "fused") == 1);  // gt, exp, where, * 2
  CHECK(count_op(fw, "tanh") == 1);
  CHECK(count_op(fw, "exp") == 0);
  CHECK(fw.num_nodes() == 3);
}

TEST_CASE("jit fusion: an MLP training step traced through value_and_grad, f32 and f64", "[jit][fusion]") {
  // Ops whose vjp reads their saved output (sigmoid, tanh, exp, relu) are left out: the tape saves
  // detached aliases, which jit::trace captures as constants, so such a graph would only match eager
  // execution at the traced inputs. value_and_grad returns a detached loss for the same reason; the
  // traced loss is taken from inside.
  auto step = [](const TensorList& in) {
    ParamTree p{{"w1", in[2]}, {"b1", in[3]}, {"w2", in[4]}, {"b2", in[5]}};
    Tensor loss;
    auto g = value_and_grad(
                 [&] {
                   Tensor h = gelu(linear(in[0], p.at("w1"), p.at("b1")), true);
                   Tensor o = linear(h, p.at("w2"), p.at("b2"));
                   return loss = mean(square(o - in[1]));
                 },
                 p)
                 .second;
    return TensorList{loss, g.at("w1"), g.at("b1"), g.at("w2"), g.at("b2")};
  };
  for (DType t : {DType::f32, DType::f64}) {
    auto args = [&](uint64_t s) {
      return TensorList{rnd(s, Shape{128, 64}, t),  rnd(s + 1, Shape{128, 16}, t), rnd(s + 2, Shape{256, 64}, t),
                        rnd(s + 3, Shape{256}, t), rnd(s + 4, Shape{16, 256}, t), rnd(s + 5, Shape{16}, t)};
    };
    jit::Graph g = jit::trace(step, args(20));
    for (int changed = 1; changed > 0;)
      changed = jit::fold_constants(g) + jit::simplify_algebra(g) + jit::eliminate_common_subexpressions(g) + jit::eliminate_dead_code(g);
    jit::Graph fg = g;
    const int before = jit::kernel_launches(g);
    const int removed = jit::fuse(fg);
    const int after = jit::kernel_launches(fg);
    INFO("kernel launches " << before << " -> " << after << "\n" << fg.str());
    CHECK(removed > 0);
    CHECK(after == before - removed);  // fusion removes only nodes that launch kernels
    CHECK(after < before);
    CHECK(count_op(fg, "fused") + count_op(fg, "fused_matmul") + count_op(fg, "fused_sum") > 0);
    check_bitwise(fg.run(args(30)), g.run(args(30)));
    check_bitwise(fg.run(args(40)), step(args(40)));  // and eager
  }
}

TEST_CASE("jit fusion: a whole training step with AdamW updates of live state replays bitwise after fusion", "[jit][fusion]") {
  nn::MLP model({32, 64, 64, 10});
  ParamTree params = model.parameters();
  auto opt = optim::adamw(optim::constant(1e-3));
  auto step = [&](const TensorList& in) {
    auto [loss, grads] = value_and_grad([&] { return cross_entropy(model.forward(in[0]), in[1]); }, params);
    Tensor norm = optim::clip_grad_norm_tensor(grads, 0.5);
    opt->step(params, grads);
    return TensorList{loss, norm};
  };
  auto batch = [](uint64_t s) {
    const RngKey k = RngKey::from_seed(s);
    return TensorList{random_normal(k, Shape{16, 32}),
                      (random_uniform(fold_in(k, 1), Shape{16}, DType::f64) * 10.0).astype(DType::i64)};
  };
  jit::Graph g = jit::trace(step, batch(1));
  jit::optimize(g);
  jit::Graph fg = g;
  CHECK(jit::fuse(fg) > 0);
  CHECK(jit::kernel_launches(fg) < jit::kernel_launches(g));
  CHECK(fg.updates.size() == g.updates.size());
  // Both graphs read and write the same state tensors (parameters, moments, step count): each replay
  // starts from the same saved state.
  TensorList state, saved;
  for (const auto& v : g.values)
    if (v.kind == jit::Value::Kind::state) {
      state.push_back(v.constant);
      saved.push_back(v.constant.clone());
    }
  REQUIRE(!state.empty());
  auto restore = [&] {
    for (size_t i = 0; i < state.size(); ++i) copy_(state[i], saved[i]);
  };
  auto snapshot = [&] {
    TensorList s;
    for (const Tensor& t : state) s.push_back(t.clone());
    return s;
  };
  for (uint64_t s = 2; s < 5; ++s) {
    restore();
    const TensorList want = g.run(batch(s)), want_state = snapshot();
    restore();
    const TensorList got = fg.run(batch(s)), got_state = snapshot();
    check_bitwise(got, want);
    check_bitwise(got_state, want_state);
  }
}

TEST_CASE("jit fusion: linear + gelu becomes a GEMM with an epilogue, bitwise", "[jit][fusion]") {
  auto f = [](const TensorList& in) { return TensorList{gelu(linear(in[0], in[1], in[2]), true) * 1.5}; };
  for (DType t : {DType::f32, DType::f64, DType::bf16}) {
    INFO(dtype_name(t));
    auto args = [&](uint64_t s) { return TensorList{rnd(s, Shape{96, 48}, t), rnd(s + 1, Shape{80, 48}, t), rnd(s + 2, Shape{80}, t)}; };
    jit::Graph fg = fused_vs_unfused(f, args(50), args(60), jit::fuse);
    CHECK(fg.num_nodes() == 1);
    CHECK(count_op(fg, "fused_matmul") == 1);
    CHECK(first_op(fg, "fused_matmul").outputs.size() == 1);
  }
  // matmul + bias add + relu, the matmul's result also returned: it becomes output 0 of the fused node.
  auto h = [](const TensorList& in) {
    Tensor m = matmul(in[0], in[1]);
    return TensorList{relu(m + in[2]), m};
  };
  auto args = [&](uint64_t s) { return TensorList{rnd(s, Shape{4, 30, 20}), rnd(s + 1, Shape{20, 50}), rnd(s + 2, Shape{50})}; };
  jit::Graph fg = fused_vs_unfused(h, args(70), args(80), jit::fuse);
  CHECK(fg.num_nodes() == 1);
  const jit::Node& n = first_op(fg, "fused_matmul");
  CHECK(n.outputs.size() == 2);
  CHECK(n.outputs[0] == fg.outputs[1]);
  // A single elementwise consumer (no fused node) is an epilogue too.
  auto r = [](const TensorList& in) { return TensorList{relu(linear(in[0], in[1]))}; };
  jit::Graph fr = fused_vs_unfused(r, {rnd(90, Shape{8, 6}), rnd(91, Shape{5, 6})}, {rnd(92, Shape{8, 6}), rnd(93, Shape{5, 6})},
                                   jit::fuse_matmul_epilogues);
  CHECK(count_op(fr, "fused_matmul") == 1);
  // Only a bool result: the GEMM writes into a buffer of its own.
  auto b = [](const TensorList& in) { return TensorList{gt(linear(in[0], in[1]), in[2])}; };
  jit::Graph fb = fused_vs_unfused(b, {rnd(94, Shape{8, 6}), rnd(95, Shape{5, 6}), rnd(96, Shape{5})},
                                   {rnd(97, Shape{8, 6}), rnd(98, Shape{5, 6}), rnd(99, Shape{5})}, jit::fuse_matmul_epilogues);
  CHECK(count_op(fb, "fused_matmul") == 1);
  // A one-element GEMM result (its registers are scalars) whose epilogue writes output 0, where the GEMM
  // wrote, before it reads the result: the fuzzer's case of a [1, 1, 1] batched matmul in a backward.
  auto one = [](const TensorList& in) {
    Tensor s = sigmoid(in[2]);
    return TensorList{s * 0.5, (matmul(in[0], in[1]) * 0.5) * (s * (1.0 - s))};
  };
  for (const Shape& a : {Shape{1, 1, 1}, Shape{1, 4}}) {
    INFO("a " << a.str());
    const Shape b = a.rank() == 3 ? Shape{1, 1, 1} : Shape{4, 1}, c = a.rank() == 3 ? Shape{1, 1, 1} : Shape{1, 1};
    jit::Graph fo = fused_vs_unfused(one, {rnd(100, a), rnd(101, b), rnd(102, c)}, {rnd(103, a), rnd(104, b), rnd(105, c)},
                                     jit::fuse);
    CHECK(count_op(fo, "fused_matmul") == 1);
  }
}

TEST_CASE("jit fusion: sum and mean over elementwise prologues are never materialised, bitwise", "[jit][fusion]") {
  // 300 x 7 x 37: the full sum splits over threads; each axis choice takes another path of the sum kernel.
  const Shape s{300, 7, 37};
  for (DType t : {DType::f32, DType::f64}) {
    auto full = [](const TensorList& in) { return TensorList{sum(in[0] * in[1])}; };
    jit::Graph fg = fused_vs_unfused(full, {rnd(100, s, t), rnd(101, s, t)}, {rnd(102, s, t), rnd(103, s, t)}, jit::fuse);
    CHECK(fg.num_nodes() == 1);
    CHECK(count_op(fg, "fused_sum") == 1);
    CHECK(count_op(fg, "mul") == 0);
    for (const std::vector<int>& axes : std::vector<std::vector<int>>{{2}, {0}, {1}, {0, 2}, {-1, 0}, {0, 1, 2}})
      for (bool keep : {false, true}) {
        INFO("axes " << axes.size() << " first " << axes[0] << " keepdims " << keep);
        auto m = [&](const TensorList& in) { return TensorList{mean(exp(in[0]), axes, keep)}; };
        jit::Graph fm = fused_vs_unfused(m, {rnd(104, s, t)}, {rnd(105, s, t)}, jit::fuse);
        CHECK(count_op(fm, "fused_sum") == 1);
        CHECK(count_op(fm, "exp") == 0);
      }
  }
  // Column sums of rows wider than one block of columns (1300: blocks of 512, 512, 276), under 3 outer rows.
  auto wide = [](const TensorList& in) { return TensorList{sum(in[0] * in[1], {1})}; };
  const Shape ws{3, 20, 1300};
  fused_vs_unfused(wide, {rnd(109, ws), rnd(110, ws)}, {rnd(111, ws), rnd(112, ws)}, jit::fuse);
  // Reducing only an axis of size 1: one element per sum.
  auto one = [](const TensorList& in) { return TensorList{sum(in[0] * in[0] - 1.0, {1})}; };
  fused_vs_unfused(one, {rnd(107, Shape{300, 1, 37})}, {rnd(108, Shape{300, 1, 37})}, jit::fuse);
  // A prologue whose result is also used elsewhere stays materialised.
  auto shared = [](const TensorList& in) {
    Tensor e = exp(in[0]);
    return TensorList{sum(e, {1}), e};
  };
  jit::Graph g = jit::trace(shared, {rnd(106, Shape{5, 6})});
  CHECK(jit::fuse_reduction_prologues(g) == 0);
}

TEST_CASE("jit fusion: empty tensors, integer nodes, and programs that differ only in a constant", "[jit][fusion]") {
  // Empty tensors: no chunk to run, and sums of nothing are 0.
  auto e = [](const TensorList& in) {
    Tensor y = exp(in[0]) * 2.0;
    return TensorList{tanh(y) + 1.0, sum(exp(in[0]) + 1.0, {0}), sum(exp(in[1]) + 1.0, {1}), sum(exp(in[1]) * 3.0, {0})};
  };
  fused_vs_unfused(e, {rnd(170, Shape{0, 5}), rnd(171, Shape{5, 0})}, {rnd(172, Shape{0, 5}), rnd(173, Shape{5, 0})}, jit::fuse);
  // A program of one element: every register is a scalar.
  auto one = [](const TensorList& in) { return TensorList{exp(sum(in[0])) * 2.0 + 1.0}; };
  fused_vs_unfused(one, {rnd(178, Shape{3})}, {rnd(179, Shape{3})}, jit::fuse_elementwise);
  fused_vs_unfused(one, {rnd(178, Shape{3}, DType::bf16)}, {rnd(179, Shape{3}, DType::bf16)}, jit::fuse_elementwise);
  // Integer arithmetic is not fused.
  auto i = [](const TensorList& in) {
    Tensor k = in[1] + in[1];
    return TensorList{exp(in[0]) * 2.0, k * k};
  };
  jit::Graph gi = jit::trace(i, {rnd(174, Shape{4}), testing::randint(RngKey::from_seed(175), Shape{4}, 9)});
  CHECK(jit::fuse_elementwise(gi) == 1);
  CHECK(count_op(gi, "add") == 1);
  CHECK(count_op(gi, "mul") == 1);
  // The program text holds clamp's bounds exactly: CSE keeps programs apart that differ below 1e-6.
  auto c = [](const TensorList& in) { return TensorList{exp(clamp(in[0], 1e-7, 1.0)), exp(clamp(in[0], 2e-7, 1.0))}; };
  const Tensor x = testing::uniform64(RngKey::from_seed(176), Shape{64}, 0, 3e-7), x2 = testing::uniform64(RngKey::from_seed(177), Shape{64}, 0, 3e-7);
  jit::Graph gc = jit::trace(c, {x});
  CHECK(jit::fuse_elementwise(gc) == 2);
  CHECK(jit::eliminate_common_subexpressions(gc) == 0);
  check_bitwise(gc.run({x2}), c({x2}));
}

TEST_CASE("jit fusion: random elementwise graphs with broadcasting match the unfused graph bitwise", "[jit][fusion]") {
  std::mt19937 rng(2024);
  // f64, f32, bf16, f16 in turn (16-bit: computed in f32, rounded after every op as the eager kernels
  // round), casts through another of them.
  const DType dts[] = {DType::f64, DType::f32, DType::bf16, DType::f16};
  for (int trial = 0; trial < 48; ++trial) {
    const DType t = dts[trial % 4], other = dts[(trial + 1) % 4];
    const Shape full{int64_t(1 + rng() % 20), int64_t(1 + rng() % 30), int64_t(1 + rng() % 70)};
    std::vector<Shape> shapes;
    for (int i = 0; i < 3; ++i) {
      Shape s;
      for (int d = int(rng() % 3); d < 3; ++d) s.push_back(rng() % 3 == 0 ? 1 : full[size_t(d)]);  // some axes broadcast
      shapes.push_back(s);
    }
    shapes[0] = full;
    const uint32_t seed = rng();
    // The same ops on every call: the choices come from `seed`.
    auto f = [&, seed](const TensorList& in) {
      std::mt19937 r(seed);
      std::vector<Tensor> pool(in.begin(), in.end());
      auto pick = [&] { return pool[r() % pool.size()]; };
      auto pos = [](const Tensor& x) { return abs(x) + 0.5; };
      for (int k = 0; k < 14; ++k) {
        const Tensor a = pick(), b = pick();
        Tensor y;
        switch (r() % 24) {
          case 0: y = neg(a); break;
          case 1: y = exp(clamp(a, -5, 5)); break;
          case 2: y = log(pos(a)); break;
          case 3: y = sqrt(abs(a)); break;
          case 4: y = rsqrt(pos(a)); break;
          case 5: y = tanh(a); break;
          case 6: y = sigmoid(a); break;
          case 7: y = square(a); break;
          case 8: y = reciprocal(pos(a)); break;
          case 9: y = relu(a); break;
          case 10: y = gelu(a, true); break;
          case 11: y = gelu(a, false); break;
          case 12: y = a + b; break;
          case 13: y = a - b; break;
          case 14: y = a * b; break;
          case 15: y = a / pos(b); break;
          case 16: y = maximum(a, b); break;
          case 17: y = minimum(a, b); break;
          case 18: y = pow(pos(a), clamp(b, -2, 2)); break;
          case 19: y = where(gt(a, b), a, b * 0.5); break;
          case 20: y = relu_backward(a, b); break;
          case 21: y = gelu_backward(a, b, r() % 2 == 0); break;
          case 22: y = a.astype(other).astype(a.dtype()) * 3.0; break;
          default: y = where(le(a, scalar_like(0.0, a)), exp(clamp(b, -5, 5)), a); break;
        }
        pool.push_back(y);
      }
      return TensorList{pool.back(), pool[pool.size() - 4], sum(pool[pool.size() - 2], {-1})};
    };
    auto args = [&](uint64_t s) {
      TensorList in;
      for (size_t i = 0; i < shapes.size(); ++i) in.push_back(rnd(s + i, shapes[i], t));
      return in;
    };
    INFO("trial " << trial << " shape " << full.str());
    fused_vs_unfused(f, args(200 + uint64_t(trial) * 10), args(205 + uint64_t(trial) * 10), jit::fuse);
  }
}

TEST_CASE("jit fusion: kernel_launches counts kernels, not views", "[jit][fusion]") {
  auto f = [](const TensorList& in) {
    Tensor x = in[0];                                  // [4, 6]
    Tensor a = x.reshape(Shape{6, 4});                  // view of contiguous data
    Tensor b = x.T().reshape(Shape{24});                // permute (view) then reshape of strided data: a copy
    Tensor c = x.slice(0, 1, 3).expand(Shape{2, 2, 6}); // views
    Tensor d = c.reshape(Shape{24});                    // expand made it strided: a copy
    return TensorList{exp(a), b + d};
  };
  jit::Graph g = jit::trace(f, {rnd(110, Shape{4, 6})});
  jit::eliminate_dead_code(g);
  CHECK(count_op(g, "reshape") == 3);
  CHECK(jit::kernel_launches(g) == 4);  // the two copying reshapes, exp, add
}

TEST_CASE("jit fusion: CSE, DCE and constant folding work on fused nodes", "[jit][fusion]") {
  const Tensor c = rnd(120, Shape{6});
  auto f = [&](const TensorList& in) {
    Tensor x = in[0];
    return TensorList{tanh(x) + 1.0, tanh(x) + 1.0,   // the same program twice: merged
                      tanh(x) + x, tanh(x) - x,       // same inputs, other programs: kept apart
                      x + exp(c) * 2.0};              // exp(c) * 2: a fused node of constants
  };
  const Tensor x = rnd(121, Shape{3, 6}), x2 = rnd(122, Shape{3, 6});
  const jit::Graph g = jit::trace(f, {x});
  jit::Graph fg = g;
  REQUIRE(jit::fuse_elementwise(fg) > 0);
  CHECK(count_op(fg, "fused") == 5);
  CHECK(jit::eliminate_common_subexpressions(fg) == 1);  // after the constants 1.0 merged
  CHECK(count_op(fg, "fused") == 4);
  CHECK(jit::fold_constants(fg) == 1);
  CHECK(count_op(fg, "fused") == 3);
  check_bitwise(fg.run({x2}), g.run({x2}));
  // An output dropped: its fused node (tanh(x) - x) is dead.
  fg.outputs.erase(fg.outputs.begin() + 3);
  CHECK(jit::eliminate_dead_code(fg) == 1);
  CHECK(count_op(fg, "fused") == 2);
  const TensorList want = g.run({x2});
  check_bitwise(fg.run({x2}), {want[0], want[1], want[2], want[4]});
}

namespace {
// The graph inputs feeding node n, in n's input order (each input of n must be a graph input).
TensorList inputs_of(const jit::Graph& g, const jit::Node& n, const TensorList& args) {
  TensorList in;
  for (int v : n.inputs) {
    const auto at = std::find(g.inputs.begin(), g.inputs.end(), v);
    REQUIRE(at != g.inputs.end());
    in.push_back(args[size_t(at - g.inputs.begin())]);
  }
  return in;
}
}  // namespace

TEST_CASE("jit fusion: fused ops check their inputs and differentiate", "[jit][fusion]") {
  auto f = [](const TensorList& in) {
    Tensor y = gelu(in[0] * in[1] + in[2], true) * sigmoid(in[0]);
    return TensorList{y, exp(y) - in[0]};
  };
  auto args = [](uint64_t s) { return TensorList{rnd(s, Shape{5, 4}), rnd(s + 1, Shape{5, 4}), rnd(s + 2, Shape{4})}; };
  jit::Graph g = jit::trace(f, args(130));
  REQUIRE(jit::fuse_elementwise(g) > 0);
  REQUIRE(g.num_nodes() == 1);
  const jit::Node& node = first_op(g, "fused");
  REQUIRE(node.outputs.size() == 2);
  const OpPtr fused = node.op;

  const TensorList a = args(131), in = inputs_of(g, node, a);
  CHECK_THROWS_AS(fused->forward({in[0], in[1]}), ValueError);
  CHECK_THROWS_AS(fused->forward({in[0], in[1], in[2].astype(DType::f32)}), DTypeError);
  const auto err = testing::catch_error<ShapeError>([&] { fused->forward({in[0], in[1], rnd(1, Shape{5})}); });
  CHECK(err.expected() == in[2].shape().str());
  CHECK(err.found() == "[5]");

  // The vjp re-runs the program with the ops it came from and applies their vjps in reverse: the
  // gradients of the unfused function, up to the order in which the contributions to a register read
  // twice are summed (the tape sums them in its own order), hence a tolerance of a few ulps.
  const Tensor c0 = rnd(132, Shape{5, 4}), c1 = rnd(133, Shape{5, 4});
  auto loss = [&](const TensorList& outs) { return sum(outs[0] * c0) + sum(outs[1] * c1); };
  ParamTree p{{"a", in[0]}, {"b", in[1]}, {"c", in[2]}};
  auto [lf, gf] = value_and_grad([&] { return loss(apply(fused, {p.at("a"), p.at("b"), p.at("c")})); }, p);
  // Graph input order and program input order may differ: map the eager call through the same tensors.
  auto eager = [&] {
    TensorList ga(3);
    for (size_t k = 0; k < 3; ++k)
      ga[size_t(std::find(g.inputs.begin(), g.inputs.end(), node.inputs[k]) - g.inputs.begin())] = p.at(std::string(1, char('a' + k)));
    return loss(f(ga));
  };
  auto [le, ge] = value_and_grad(eager, p);
  CHECK(max_diff(lf, le) == 0);
  for (const char* k : {"a", "b", "c"}) {
    INFO("input " << k);
    const auto want = ge.at(k).contiguous().to_vector<double>();
    double scale = 1;
    for (double w : want) scale = std::max(scale, std::abs(w));
    CHECK(max_diff(gf.at(k), ge.at(k)) <= 4 * 2.2e-16 * scale);
  }
  const GradcheckResult gc = gradcheck([&](const TensorList& x) { return loss(apply(fused, x)); }, in);
  INFO(gc.report);
  CHECK(gc.ok);

  // The fused reduction's vjp: sum's vjp after the program's.
  auto h = [](const TensorList& x) { return TensorList{sum(exp(x[0]) * x[1], {1})}; };
  const TensorList b{rnd(134, Shape{6, 3}), rnd(135, Shape{6, 3})};
  jit::Graph gh = jit::trace(h, b);
  REQUIRE(jit::fuse(gh) > 0);
  const jit::Node& fs = first_op(gh, "fused_sum");
  const GradcheckResult gs = gradcheck([&](const TensorList& x) { return sum(square(apply(fs.op, x)[0])); }, inputs_of(gh, fs, b));
  INFO(gs.report);
  CHECK(gs.ok);
}

TEST_CASE("jit fusion: GEMM epilogue vjp matches finite differences", "[jit][fusion]") {
  auto f = [](const TensorList& in) { return TensorList{tanh(linear(in[0], in[1], in[2])) * in[3]}; };
  const TensorList a{rnd(150, Shape{3, 4}), rnd(151, Shape{5, 4}), rnd(152, Shape{5}), rnd(153, Shape{3, 5})};
  jit::Graph g = jit::trace(f, a);
  REQUIRE(jit::fuse(g) > 0);
  REQUIRE(count_op(g, "fused_matmul") == 1);
  const OpPtr op = first_op(g, "fused_matmul").op;
  const GradcheckResult gc = gradcheck([&](const TensorList& x) { return sum(square(apply(op, x)[0])); },
                                       inputs_of(g, first_op(g, "fused_matmul"), a));
  INFO(gc.report);
  CHECK(gc.ok);
}

TEST_CASE("jit fusion bench: replay of 1M-element chains of 8 elementwise ops, fused vs unfused", "[.bench]") {
  // Arithmetic only (memory-bound unfused) and with exp / tanh / sigmoid (compute-bound).
  auto arith = [](const TensorList& in) {
    const Tensor &x = in[0], &y = in[1];
    Tensor h = maximum(x * y + x - y * 0.5, x);  // mul, add, mul, sub, maximum
    return TensorList{h / (y * y + 2.0)};         // mul, add, div
  };
  auto transcendental = [](const TensorList& in) {
    const Tensor &x = in[0], &y = in[1];
    Tensor h = x * y + 1.0;                          // mul, add
    return TensorList{tanh(h) * sigmoid(x) - exp(y * 0.1)};  // tanh, sigmoid, mul, mul, exp, sub
  };
  for (const auto& [name, f] : {std::pair<const char*, std::function<TensorList(const TensorList&)>>{"arith", arith},
                                {"transcendental", transcendental}})
    for (DType t : {DType::f32, DType::f64}) {
      const TensorList in{rnd(160, Shape{1024, 1024}, t), rnd(161, Shape{1024, 1024}, t)};
      const jit::Graph g = jit::trace(f, in);
      jit::Graph fg = g;
      jit::fuse(fg);
      auto time = [&](const jit::Graph& gr) {  // {fastest, median} of 50 replays after one warm-up, in ms
        gr.run(in);
        std::vector<double> ms;
        for (int r = 0; r < 50; ++r) {
          const auto t0 = std::chrono::steady_clock::now();
          gr.run(in);
          ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        }
        std::sort(ms.begin(), ms.end());
        return std::pair{ms.front(), ms[ms.size() / 2]};
      };
      // Interleaved, so both see the same machine load.
      const auto [u_min, u_med] = time(g);
      const auto [f_min, f_med] = time(fg);
      std::cout << "fusion_bench chain=" << name << " dtype=" << dtype_name(t) << " elements=" << in[0].numel()
                << " nodes=" << g.num_nodes() << " fused_nodes=" << fg.num_nodes() << " unfused_min_ms=" << u_min
                << " fused_min_ms=" << f_min << " unfused_median_ms=" << u_med << " fused_median_ms=" << f_med
                << " speedup_min=" << u_min / f_min << " speedup_median=" << u_med / f_med
                << " threads=" << omp_get_max_threads() << "\n";
    }
}

TEST_CASE("jit fusion: cross-entropy and its backward become one node, bitwise, unless the cotangent comes from the loss",
          "[jit][fusion]") {
  // logits [6, 5] (rows 1 and 4 ignored), labels i64 or i32; the gradient with respect to the logits.
  auto labels = [](DType t, uint64_t s) {
    std::vector<int64_t> v{int64_t(s % 5), -100, 3, int64_t((s + 2) % 5), -100, 0};
    return from_vector(v, Shape{6}, t);
  };
  for (DType t : {DType::f32, DType::f64})
    for (DType lt : {DType::i64, DType::i32})
      for (Reduction red : {Reduction::mean, Reduction::sum, Reduction::none}) {
        INFO(dtype_name(t) << " labels " << dtype_name(lt) << " reduction " << int(red));
        // none: the losses weighted by in[2] (the cotangent is the weights, computed after the forward
        // in the traced order but not from the loss).
        auto step = [red](const TensorList& in) {
          ParamTree p{{"x", in[0]}};
          Tensor loss;
          auto g = value_and_grad(
                       [&] {
                         loss = cross_entropy(p.at("x"), in[1], red);
                         return red == Reduction::none ? sum(loss * in[2]) : loss;
                       },
                       p)
                       .second;
          return TensorList{loss, g.at("x")};
        };
        auto args = [&](uint64_t s) { return TensorList{rnd(s, Shape{6, 5}, t), labels(lt, s), rnd(s + 1, Shape{6}, t)}; };
        const jit::Graph fg = fused_vs_unfused(step, args(1), args(7), jit::fuse_cross_entropy);
        CHECK(count_op(fg, "cross_entropy_with_grad") == 1);
        CHECK(count_op(fg, "cross_entropy") == 0);
        CHECK(count_op(fg, "cross_entropy_backward") == 0);
        check_bitwise(fg.run(args(9)), step(args(9)));  // and eager
      }
  SECTION("a cotangent computed from the loss keeps the two nodes") {
    auto step = [](const TensorList& in) {
      ParamTree p{{"x", in[0]}};
      auto g = value_and_grad([&] { return square(cross_entropy(p.at("x"), in[1])); }, p).second;
      return TensorList{g.at("x")};
    };
    jit::Graph g = jit::trace(step, {rnd(3, Shape{6, 5}), labels(DType::i64, 3)});
    CHECK(jit::fuse_cross_entropy(g) == 0);
    CHECK(count_op(g, "cross_entropy_backward") == 1);
  }
  SECTION("a bad label is the same error as unfused") {
    auto step = [](const TensorList& in) {
      ParamTree p{{"x", in[0]}};
      auto [l, g] = value_and_grad([&] { return cross_entropy(p.at("x"), in[1]); }, p);
      return TensorList{g.at("x")};
    };
    jit::Graph g = jit::trace(step, {rnd(3, Shape{6, 5}), labels(DType::i64, 3)});
    REQUIRE(jit::fuse_cross_entropy(g) == 1);
    const Tensor bad = from_vector(std::vector<int64_t>{0, 1, 7, 2, 3, 4}, Shape{6});
    CHECK_THROWS_WITH(g.run({rnd(4, Shape{6, 5}), bad}), Catch::Matchers::Contains("label 7 at position [2]"));
  }
}

TEST_CASE("jit fusion: a layer-norm backward's dx and the skip connection's gradient are summed in the norm's "
          "node, bitwise", "[jit][fusion]") {
  // A pre-LN residual block: y = x + tanh(layer_norm(x) * w2); x's gradient is the skip connection's plus the
  // norm's dx: one add, fused; the forward's add (not of a norm's dx) is left alone.
  for (DType t : {DType::f32, DType::f64}) {
    INFO(dtype_name(t));
    auto step = [](const TensorList& in) {
      ParamTree p{{"x", in[0]}, {"w", in[1]}, {"b", in[2]}};
      auto g = value_and_grad(
                   [&] {
                     const Tensor y = p.at("x") + tanh(layer_norm(p.at("x"), p.at("w"), p.at("b")) * in[3]);
                     return sum(y * in[4]);
                   },
                   p)
                   .second;
      return TensorList{g.at("x"), g.at("w"), g.at("b")};
    };
    const Shape s{6, 10}, d{10};
    auto args = [&](uint64_t k) { return TensorList{rnd(k, s, t), rnd(k + 1, d, t), rnd(k + 2, d, t), rnd(k + 3, s, t), rnd(k + 4, s, t)}; };
    const jit::Graph g = jit::trace(step, args(1));
    const int adds = count_op(g, "add");
    const jit::Graph fg = fused_vs_unfused(step, args(1), args(11), jit::fuse_layer_norm_backward_add);
    CHECK(count_op(fg, "add") == adds - 1);
    CHECK(first_op(fg, "layer_norm_backward").op->attrs().find("residual=1") != std::string::npos);
    check_bitwise(fg.run(args(21)), step(args(21)));  // and eager
  }
  SECTION("no fusion when dx has another reader, is an output, or meets a broadcast addend") {
    for (int use = 0; use < 3; ++use) {
      INFO("case " << use);
      auto step = [use](const TensorList& in) {
        ParamTree p{{"x", in[0]}};
        auto g = value_and_grad([&] { return sum(layer_norm(p.at("x"), Tensor(), Tensor()) * in[1]); }, p).second;
        const Tensor dx = g.at("x");
        if (use == 0) return TensorList{dx + in[2], dx * in[2]};
        if (use == 1) return TensorList{dx + in[2], dx};
        return TensorList{dx + in[3]};  // in[3]: one row, broadcast
      };
      jit::Graph g = jit::trace(step, {rnd(1, Shape{4, 8}), rnd(2, Shape{4, 8}), rnd(3, Shape{4, 8}), rnd(4, Shape{8})});
      CHECK(jit::fuse_layer_norm_backward_add(g) == 0);
    }
  }
}
