// jit/memory_plan.h: liveness intervals and arena offsets on a hand-checkable chain, planned replays
// against unplanned replays of the same graph (bitwise) for an MLP's forward and backward and for a whole
// AdamW training step, views that share a planned value's storage, and a plan gone stale.
#include <catch2/catch.hpp>

#include <titanax/titanax.h>

#include "jit/graph.h"
#include "jit/memory_plan.h"

using namespace titanax;

namespace {
Tensor rnd(uint64_t seed, const Shape& s) { return random_normal(RngKey::from_seed(seed), s); }
std::vector<double> vec(const Tensor& t) { return t.contiguous().to_vector<double>(); }

// Runs g without and with a plan on the same arguments; the outputs must agree bitwise.
void check_planned_equals_unplanned(jit::Graph& g, const TensorList& args) {
  const auto plan = g.plan;
  g.plan = nullptr;
  const TensorList want = g.run(args);
  g.plan = plan;
  const TensorList got = g.run(args);
  REQUIRE(got.size() == want.size());
  for (size_t k = 0; k < got.size(); ++k) {
    INFO("output " << k);
    CHECK(vec(got[k]) == vec(want[k]));
  }
}

// Every two planned values live at the same node occupy disjoint byte ranges of the arena.
void check_no_overlap(const jit::MemoryPlan& plan) {
  for (size_t a = 0; a < plan.planned.size(); ++a)
    for (size_t b = a + 1; b < plan.planned.size(); ++b) {
      const jit::PlannedValue &p = plan.planned[a], &q = plan.planned[b];
      const bool same_time = p.first <= q.last && q.first <= p.last;
      const bool same_bytes = p.offset < q.offset + q.bytes && q.offset < p.offset + p.bytes;
      INFO("%" << p.value << " [" << p.first << ", " << p.last << "] at " << p.offset << " and %" << q.value << " ["
               << q.first << ", " << q.last << "] at " << q.offset);
      CHECK(!(same_time && same_bytes));
    }
  for (const auto& p : plan.planned) {
    CHECK(p.offset % jit::MemoryPlan::alignment == 0);
    CHECK(p.offset + p.bytes <= plan.arena_bytes);
  }
}

const jit::PlannedValue& planned(const jit::MemoryPlan& plan, int value) {
  REQUIRE(plan.slot[size_t(value)] >= 0);
  return plan.planned[size_t(plan.slot[size_t(value)])];
}
}  // namespace

TEST_CASE("jit memory plan: intervals and offsets of a chain of four elementwise ops", "[jit]") {
  auto f = [](const TensorList& in) { return TensorList{tanh(exp(tanh(exp(in[0]))))}; };
  jit::Graph g = jit::trace(f, {rnd(1, Shape{1024})});
  REQUIRE(g.nodes.size() == 4);
  const jit::MemoryPlan& plan = jit::plan_memory_pass(g);
  // %a = exp(x) at node 0, %b = tanh(a) at 1, %c = exp(b) at 2; the output tanh(c) is not planned.
  REQUIRE(plan.planned.size() == 3);
  CHECK(plan.slot[size_t(g.nodes[3].outputs[0])] == -1);
  for (int i = 0; i < 3; ++i) {
    const jit::PlannedValue& p = planned(plan, g.nodes[size_t(i)].outputs[0]);
    CHECK(p.first == i);
    CHECK(p.last == i + 1);
    CHECK(p.bytes == 4096);
  }
  // a and c are never live together: c takes a's place, two buffers instead of three.
  CHECK(planned(plan, g.nodes[0].outputs[0]).offset == planned(plan, g.nodes[2].outputs[0]).offset);
  CHECK(plan.total_bytes == 3 * 4096);
  CHECK(plan.peak_live_bytes == 2 * 4096);
  CHECK(plan.arena_bytes == 2 * 4096);
  check_no_overlap(plan);
  UNSCOPED_INFO("chain: " << plan.str());

  // The planned run writes into one arena: fewer allocations than one per value.
  Allocator& cpu = allocator_for(Device::cpu());
  const Tensor x = rnd(2, Shape{1024});
  const auto p = g.plan;
  g.plan = nullptr;
  int64_t before = cpu.stats().num_allocs;
  const TensorList want = g.run({x});
  const int64_t unplanned_allocs = cpu.stats().num_allocs - before;
  g.plan = p;
  before = cpu.stats().num_allocs;
  const TensorList got = g.run({x});
  const int64_t planned_allocs = cpu.stats().num_allocs - before;
  CHECK(planned_allocs == unplanned_allocs - 2);  // three values, one arena
  CHECK(vec(got[0]) == vec(want[0]));
}

TEST_CASE("jit memory plan: an MLP's forward and backward replay bitwise with the plan", "[jit]") {
  nn::MLP model({32, 64, 64, 10});
  const ParamTree params = model.parameters();
  auto f = [&](const TensorList& in) {
    auto [loss, grads] = value_and_grad([&] { return cross_entropy(model.forward(in[0]), in[1]); }, params);
    TensorList out{loss};
    for (const auto& [path, gr] : grads) out.push_back(gr);
    return out;
  };
  auto labels = [](uint64_t seed) {
    return (random_uniform(RngKey::from_seed(seed), Shape{16}, DType::f64) * 10.0).astype(DType::i64);
  };
  jit::Graph g = jit::trace(f, {rnd(3, Shape{16, 32}), labels(4)});
  const jit::MemoryPlan& plan = jit::plan_memory_pass(g);
  REQUIRE(plan.planned.size() > 5);
  CHECK(plan.arena_bytes < plan.total_bytes);
  CHECK(plan.arena_bytes >= plan.peak_live_bytes);
  check_no_overlap(plan);
  UNSCOPED_INFO("MLP forward+backward, " << g.nodes.size() << " nodes: " << plan.str());
  for (uint64_t s = 10; s < 13; ++s) check_planned_equals_unplanned(g, {rnd(s, Shape{16, 32}), labels(s + 100)});
}

TEST_CASE("jit memory plan: a whole AdamW training step replays bitwise with the plan", "[jit]") {
  nn::MLP model({784, 64, 10});
  ParamTree params = model.parameters();
  auto opt = optim::adamw(optim::warmup_cosine(1e-2, 3, 20));
  auto step = [&](const TensorList& in) {
    auto [loss, grads] = value_and_grad([&] { return cross_entropy(model.forward(in[0]), in[1]); }, params);
    Tensor norm = optim::clip_grad_norm_tensor(grads, 0.5);
    opt->step(params, grads);
    return TensorList{loss, norm};
  };
  auto batch = [](uint64_t seed) {
    const RngKey k = RngKey::from_seed(seed);
    return TensorList{random_normal(k, Shape{32, 784}),
                      (random_uniform(fold_in(k, 1), Shape{32}, DType::f64) * 10.0).astype(DType::i64)};
  };
  jit::Graph g = jit::trace(step, batch(1));
  const jit::MemoryPlan& plan = jit::plan_memory_pass(g);
  CHECK(plan.arena_bytes < plan.total_bytes);
  CHECK(plan.arena_bytes >= plan.peak_live_bytes);
  check_no_overlap(plan);
  UNSCOPED_INFO("MLP 784-64-10 AdamW step, batch 32, " << g.nodes.size() << " nodes: " << plan.str() << "; arena "
                << plan.arena_bytes << " B, no-reuse sum " << plan.total_bytes << " B, peak live " << plan.peak_live_bytes << " B");

  // Each step from the same state without and with the plan: the same outputs and the same state after.
  const auto planned_ptr = g.plan;
  for (uint64_t s = 2; s < 5; ++s) {
    TensorList before, after;
    for (const auto& u : g.updates) before.push_back(u.target.detach().clone());
    g.plan = nullptr;
    const TensorList want = g.run(batch(s));
    for (const auto& u : g.updates) after.push_back(u.target.detach().clone());
    for (size_t k = 0; k < g.updates.size(); ++k) {
      Tensor t = g.updates[k].target;
      copy_(t, before[k]);
    }
    g.plan = planned_ptr;
    const TensorList got = g.run(batch(s));
    INFO("step " << s);
    CHECK(vec(got[0]) == vec(want[0]));
    CHECK(vec(got[1]) == vec(want[1]));
    for (size_t k = 0; k < g.updates.size(); ++k) {
      INFO("update " << k);
      CHECK(vec(g.updates[k].target) == vec(after[k]));
    }
  }
}

TEST_CASE("jit memory plan: views keep their base live and are never planned", "[jit]") {
  // a is read through reshape -> permute -> slice by the last node, after e and h (the same size as a)
  // were made: a's buffer must not be reused before that read.
  auto f = [](const TensorList& in) {
    Tensor a = exp(in[0]);                                       // node 0
    Tensor s = a.reshape(Shape{6, 4}).permute({1, 0}).slice(0, 1, 3);  // nodes 1-3: views of a
    Tensor e = tanh(in[0]);                                      // node 4
    Tensor h = exp(e);                                           // node 5
    Tensor out = tanh(s);                                        // node 6
    Tensor v = exp(h).reshape(Shape{24});                        // nodes 7-8: an output that is a view
    return TensorList{out, v};
  };
  jit::Graph g = jit::trace(f, {rnd(5, Shape{4, 6})});
  REQUIRE(g.nodes.size() == 9);
  REQUIRE(std::string(g.nodes[6].op->name()) == "tanh");
  const jit::MemoryPlan& plan = jit::plan_memory_pass(g);
  CHECK(planned(plan, g.nodes[0].outputs[0]).last == 6);  // a lives through its views' last use
  for (int i : {1, 2, 3, 8}) CHECK(plan.slot[size_t(g.nodes[size_t(i)].outputs[0])] == -1);  // views
  CHECK(plan.slot[size_t(g.nodes[7].outputs[0])] == -1);  // exp(h): a graph output's storage
  CHECK(planned(plan, g.nodes[4].outputs[0]).last == 5);
  check_no_overlap(plan);
  for (uint64_t s = 20; s < 23; ++s) check_planned_equals_unplanned(g, {rnd(s, Shape{4, 6})});
}

TEST_CASE("jit memory plan: kernels write planned outputs at their offset in the arena", "[jit]") {
  // one_hot and the axis reduction are placed after exp(x), which is still live: at nonzero offsets.
  auto f = [](const TensorList& in) {
    Tensor a = exp(in[0]);
    Tensor c = a * one_hot(in[1], 5);
    return TensorList{exp(sum(c, {0})) + sum(sum(a, {1}))};
  };
  auto labels = [](uint64_t seed) { return (random_uniform(RngKey::from_seed(seed), Shape{8}, DType::f64) * 5.0).astype(DType::i64); };
  jit::Graph g = jit::trace(f, {rnd(8, Shape{8, 5}), labels(9)});
  const jit::MemoryPlan& plan = jit::plan_memory_pass(g);
  int at_offset = 0;
  for (const auto& node : g.nodes)
    if ((std::string(node.op->name()) == "one_hot" || std::string(node.op->name()) == "sum") && plan.slot[size_t(node.outputs[0])] >= 0)
      at_offset += planned(plan, node.outputs[0]).offset > 0;
  CHECK(at_offset >= 2);
  check_no_overlap(plan);
  for (uint64_t s = 30; s < 33; ++s) check_planned_equals_unplanned(g, {rnd(s, Shape{8, 5}), labels(s + 100)});
}

TEST_CASE("jit memory plan: a graph changed after planning refuses to run", "[jit]") {
  auto f = [](const TensorList& in) {
    Tensor unused = exp(in[0]);
    return TensorList{tanh(exp(in[0]) * 2.0)};
  };
  jit::Graph g = jit::trace(f, {rnd(6, Shape{8})});
  jit::plan_memory_pass(g);
  REQUIRE(jit::eliminate_common_subexpressions(g) == 1);
  CHECK_THROWS_AS(g.run({rnd(7, Shape{8})}), ValueError);
  jit::plan_memory_pass(g);
  check_planned_equals_unplanned(g, {rnd(7, Shape{8})});
}

TEST_CASE("jit memory plan: control-flow results may be their operands: never planned, operands kept live", "[jit]") {
  // The true branch returns its operand a itself; e and h (a's size) are made after the cond, and the
  // last node reads the cond's result: a's buffer must not be reused before that read.
  auto f = [](const TensorList& in) {
    const Tensor a = exp(in[0]);
    const Tensor r = jit::cond(gt(sum(in[0]), scalar(0.0, DType::f32)), [](const TensorList& o) { return TensorList{o[0]}; },
                               [](const TensorList& o) { return TensorList{o[0] * 2.0}; }, {a})[0];
    const Tensor h = exp(tanh(in[0]));
    return TensorList{r + h};
  };
  jit::Graph g = jit::trace(f, {rnd(40, Shape{4, 6})});
  const jit::MemoryPlan& plan = jit::plan_memory_pass(g);
  int cond_node = -1;
  for (size_t i = 0; i < g.nodes.size(); ++i)
    if (std::string(g.nodes[i].op->name()) == "cond") cond_node = int(i);
  REQUIRE(cond_node >= 0);
  CHECK(plan.slot[size_t(g.nodes[size_t(cond_node)].outputs[0])] == -1);
  CHECK(planned(plan, g.nodes[0].outputs[0]).last == int(g.nodes.size()) - 1);  // a: until r's last use
  check_no_overlap(plan);
  for (uint64_t s = 41; s < 45; ++s) {
    Tensor x = rnd(s, Shape{4, 6});
    check_planned_equals_unplanned(g, {x});
    check_planned_equals_unplanned(g, {-x});  // the other branch
  }
}

TEST_CASE("jit: checkpoint() recomputes in the traced backward, so the planned peak falls", "[jit][memory][checkpoint]") {
  // Four blocks of elementwise work on a [256, 64] activation, each checkpointed or not. Traced and
  // optimised as jit() does (CSE, fusion, the memory plan), the checkpointed step must keep its
  // recomputation (CSE would otherwise merge it with the forward's ops) and so hold fewer bytes live at
  // once, while computing the same loss and gradients (bitwise in f64: the same ops run).
  std::vector<Tensor> ws;
  for (uint64_t k = 0; k < 4; ++k) ws.push_back(rnd(40 + k, Shape{64, 64}).astype(DType::f64) * 0.1);
  ParamTree params;
  for (size_t k = 0; k < ws.size(); ++k) params.insert("w" + std::to_string(k), ws[k]);
  auto step_of = [&](bool ckpt) {
    return [&, ckpt](const TensorList& in) {
      auto [loss, grads] = value_and_grad(
          [&] {
            Tensor h = in[0];
            for (size_t k = 0; k < ws.size(); ++k) {
              const Tensor& w = params[k].second;
              auto block = [&w](const Tensor& x) {
                const Tensor u = tanh(x * 0.5);  // fused ops of the block's input alone: the same in the recomputation
                const Tensor a = matmul(u, w);
                const Tensor b = tanh(a);
                return b * b + exp(a * 0.1) * x;
              };
              h = ckpt ? checkpoint(block, h, {w}) : block(h);
            }
            return sum(h * h);
          },
          params);
      TensorList out{loss};
      for (const auto& [p, g] : grads) out.push_back(g);
      return out;
    };
  };
  const Tensor x = rnd(7, Shape{256, 64}).astype(DType::f64);
  jit::Graph plain = jit::trace(step_of(false), {x}), remat = jit::trace(step_of(true), {x});
  for (jit::Graph* g : {&plain, &remat}) jit::optimize_for_replay(*g, jit::JitOptions{});
  for (const auto& n : plain.nodes) CHECK(n.remat == 0);
  // Each block's recomputation survived CSE and fusion whole: the block's three nodes after fusion (the
  // fused tanh(0.5 x), the matmul with its fused epilogue, the fused tail). Merged with the forward's
  // twins (CSE across recomputations, or fusion forgetting a group's recomputation) some would be gone.
  std::map<int, int> per_recomputation;
  for (const auto& n : remat.nodes)
    if (n.remat > 0) ++per_recomputation[n.remat];
  CHECK(per_recomputation == std::map<int, int>{{1, 3}, {2, 3}, {3, 3}, {4, 3}});
  REQUIRE(plain.plan);
  REQUIRE(remat.plan);
  INFO("without checkpoint: " << plain.plan->str() << "; with: " << remat.plan->str());
  // Without: every block's a, b and the products live until their backward. With: one block's at a time.
  CHECK(double(remat.plan->peak_live_bytes) < 0.7 * double(plain.plan->peak_live_bytes));
  for (uint64_t s = 8; s < 10; ++s) {
    const Tensor xs = rnd(s, Shape{256, 64}).astype(DType::f64);
    const TensorList want = step_of(false)({xs}), a = plain.run({xs}), b = remat.run({xs});
    REQUIRE(b.size() == want.size());
    for (size_t k = 0; k < want.size(); ++k) {
      INFO("output " << k);
      CHECK(vec(b[k]) == vec(a[k]));
      CHECK(vec(b[k]) == vec(want[k]));
    }
  }
}
