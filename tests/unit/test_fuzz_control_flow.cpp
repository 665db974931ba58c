// cond, scan, while_loop and checkpoint on random programs: branches, loop bodies and checkpointed
// functions are random programs themselves (nested control flow included) that capture tensors from the
// enclosing program, and predicates and trip counts depend on the data. Checked: the vjp against central
// finite differences and jit() of the program and of its gradient against eager, on the inputs of the
// trace and on fresh ones, so that replays take other branches and trip counts than the trace; vmap
// against a loop over examples whose predicates differ; second derivatives against finite differences
// and under jit. The seeds are fixed; FUZZ_SEED explores others.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include <titanax/titanax.h>

#include "fuzz_program.h"
#include "jit/control_flow.h"

using namespace titanax;
using namespace titanax::testing::fuzz;

namespace {

// Branches taken and trip counts run by top-level control flow in eager runs (a nested op, or one
// under a trace, cannot read its predicate on the host): the tests check both kinds occur.
struct Coverage {
  bool record = false;
  int taken[2] = {0, 0};  // cond: false, true
  int trips[2] = {0, 0};  // while_loop: one trip, three trips
};
Coverage coverage;

// u itself when it has shape s, else sum(u) broadcast to s: a differentiable function of u of shape s.
Tensor fit(const Tensor& u, const Shape& s) { return u.shape() == s ? u : expand(sum(u), s); }

// Steps of Gen::candidate, and at depth < 2 (three times in ten) a cond, a scan or (when allowed) a
// while_loop whose functions are random programs drawn here one level deeper.
struct FlowGen {
  Gen z;
  bool with_while = false;
  bool with_checkpoint = false;  // also activation checkpoints (autodiff checkpoint()): not under vmap

  Program sub(const TensorList& example, int depth) {
    return z.program(example, int(z.pick(1, 4)), 256, [this, depth](const TensorList& v) { return draw(v, depth + 1); });
  }

  Step draw(const TensorList& v, int depth) {
    if (with_checkpoint && depth < 2 && z.pick(0, 9) < 2) return checkpoint_step(v, depth);
    if (depth >= 2 || z.pick(0, 9) >= 3) return z.candidate(v);
    switch (z.pick(0, with_while ? 2 : 1)) {
      case 0: return cond_step(v, depth);
      case 1: return scan_step(v, depth);
      default: return while_step(v, depth);
    }
  }

  size_t any(const TensorList& v) { return size_t(z.pick(0, int64_t(v.size()) - 1)); }
  std::string name(size_t i) { return "v" + std::to_string(i); }
  // A threshold near the example's sum(v[i]), so that other inputs fall on either side of it.
  double threshold(const Tensor& t) { return sum(t).item() + (z.coin() ? 0.4 : -0.4); }

  // checkpoint(f, v[a], {v[c]}): f a random program of (x, the captured v[c]) run again in the backward
  // pass (Chen et al.'s activation recomputation); its gradients must be those of f recorded directly.
  Step checkpoint_step(const TensorList& v, int depth) {
    const size_t a = any(v), c = any(v);
    const Program f = sub({v[a], v[c]}, depth);
    return {"checkpoint(f, " + name(a) + ", params " + name(c) + ")\n  f (inputs v0 x, v1 captured):\n" + f.str("    "),
            [=](const TensorList& x) {
              const Tensor captured = x[c];
              return checkpoint([f, captured](const Tensor& in) { return f({in, captured}); }, x[a], {captured});
            }};
  }

  // cond(sum(v[p]) > thr, T, F, {v[a], v[b]}), both branches also reading the captured v[c]; F's result
  // is fitted to T's shape.
  Step cond_step(const TensorList& v, int depth) {
    const size_t a = any(v), b = any(v), c = any(v), p = any(v);
    const TensorList example{v[a], v[b], v[c]};
    const Program t = sub(example, depth), f = sub(example, depth);
    const Shape s = t(example).shape();
    const double thr = threshold(v[p]);
    const std::string what = "cond(sum(" + name(p) + ") > " + std::to_string(thr) + ", operands " + name(a) + " " + name(b) +
                             ", capturing " + name(c) + ")\n  true:\n" + t.str("    ") + "  false (fitted to " + s.str() + "):\n" +
                             f.str("    ");
    return {what, [=](const TensorList& x) {
              const Tensor pred = gt(sum(x[p]), scalar_like(thr, x[p]));
              if (depth == 0 && coverage.record) ++coverage.taken[pred.item() != 0];
              const Tensor captured = x[c];
              auto branch = [captured, s](const Program& prog) {
                return [prog, captured, s](const TensorList& ops) { return TensorList{fit(prog({ops[0], ops[1], captured}), s)}; };
              };
              return jit::cond(pred, branch(t), branch(f), {x[a], x[b]})[0];
            }};
  }

  // scan over the leading axis of v[a] with carry v[b], the body also reading the captured v[c]: the
  // new carry is tanh of one of the body's values (fitted), y_t another; the step's result is the final
  // carry or the stacked ys.
  Step scan_step(const TensorList& v, int depth) {
    size_t a = any(v);
    for (int tries = 0; tries < 8 && (v[a].dim() == 0 || v[a].shape()[0] > 4); ++tries) a = any(v);
    if (v[a].dim() == 0 || v[a].shape()[0] > 4) return z.candidate(v);
    const size_t b = any(v), c = any(v);
    const TensorList example{v[b], v[a].slice(0, 0, 1).squeeze(0), v[c]};
    const Program body = sub(example, depth);
    const size_t values = example.size() + body.steps.size();
    const size_t kc = size_t(z.pick(0, int64_t(values) - 1)), ky = size_t(z.pick(0, int64_t(values) - 1));
    const bool reverse = z.coin(), carry_out = z.coin();
    const Shape cs = v[b].shape();
    const std::string what = std::string(reverse ? "scan reverse" : "scan") + " over " + name(a) + " from carry " + name(b) +
                             ", capturing " + name(c) + " (body inputs v0 carry, v1 x_t, v2 captured; new carry tanh(v" +
                             std::to_string(kc) + "), y_t v" + std::to_string(ky) + "), result " +
                             (carry_out ? "the carry" : "the ys") + "\n" + body.str("  ");
    return {what, [=](const TensorList& x) {
              const Tensor captured = x[c];
              auto f = [=](const TensorList& carry, const TensorList& xt) {
                const TensorList all = body.all({carry[0], xt[0], captured});
                return std::pair<TensorList, TensorList>{{tanh(fit(all[kc], cs))}, {all[ky]}};
              };
              const TensorList r = jit::scan(f, {x[b]}, {x[a]}, reverse);
              return carry_out ? r[0] : r[1];
            }};
  }

  // while (i < bound) {i += 1; carry = tanh(body(carry, v[c]))} from carry v[b], where bound is 3 when
  // sum(v[c]) > thr, else 1; the step's result is the final carry. Not differentiable.
  Step while_step(const TensorList& v, int depth) {
    const size_t b = any(v), c = any(v);
    const TensorList example{v[b], v[c]};
    const Program body = sub(example, depth);
    const size_t k = size_t(z.pick(0, int64_t(example.size() + body.steps.size()) - 1));
    const double thr = threshold(v[c]);
    const Shape cs = v[b].shape();
    const std::string what = "while_loop from carry " + name(b) + ", 3 trips if sum(" + name(c) + ") > " + std::to_string(thr) +
                             " else 1 (body inputs v0 carry, v1 captured; new carry tanh(v" + std::to_string(k) + "))\n" + body.str("  ");
    return {what, [=](const TensorList& x) {
              const Tensor captured = x[c];
              const Tensor many = gt(sum(captured), scalar_like(thr, captured));
              if (depth == 0 && coverage.record) ++coverage.trips[many.item() != 0];
              const Tensor bound = where(many, scalar_like(3.0, captured), scalar_like(1.0, captured));
              auto cond_fn = [bound](const TensorList& s) { return TensorList{lt(s[0], bound)}; };
              auto body_fn = [=](const TensorList& s) {
                return TensorList{s[0] + 1.0, tanh(fit(body.all({s[1], captured})[k], cs))};
              };
              return jit::while_loop(cond_fn, body_fn, {scalar_like(0.0, captured), x[b]})[1];
            }};
  }

  // Two or three f64 inputs of related shapes (equal, broadcastable, or a matmul partner).
  TensorList inputs() {
    const Shape s0 = small_shape(z), s1 = partner_shape(z, s0);
    TensorList in{random_normal(RngKey::from_seed(z.g()), s0, DType::f64) * 0.7,
                  random_normal(RngKey::from_seed(z.g()), s1, DType::f64) * 0.7};
    if (z.coin()) in.push_back(random_normal(RngKey::from_seed(z.g()), s0, DType::f64) * 0.7);
    return in;
  }
  // Fresh values of the same shapes.
  TensorList like(const TensorList& in) {
    TensorList out;
    for (const auto& t : in) out.push_back(random_normal(RngKey::from_seed(z.g()), t.shape(), DType::f64) * 0.7);
    return out;
  }
  Program program(const TensorList& in) {
    return z.program(in, int(z.pick(2, 6)), 256, [this](const TensorList& v) { return draw(v, 0); });
  }
};

// gradcheck of fn at x, telling a wrong vjp from a predicate that finite differences push across its
// threshold (inputs drawn at random, and values inside scans, can land within eps of one): a jump J
// in the value makes the numeric derivative J / (2 eps), so its error shrinks tenfold when eps grows
// tenfold, where a wrong vjp's error stays. A failure counts unless the error shrinks so.
GradcheckResult gradcheck_branchy(const std::function<Tensor(const TensorList&)>& fn, const TensorList& x) {
  GradcheckResult r = gradcheck(fn, x);
  if (r.ok) return r;
  const GradcheckResult wider = gradcheck(fn, x, 1e-5);
  if (wider.max_abs_error < 0.2 * r.max_abs_error) {
    r.ok = true;
    r.report = "";
  }
  return r;
}

// Eager runs whose top-level predicates are counted.
template <class F>
auto recorded(F&& f) {
  coverage.record = true;
  auto r = f();
  coverage.record = false;
  return r;
}

}  // namespace

TEST_CASE("random programs with cond, scan and checkpoint: vjp against finite differences, jit against eager on inputs that branch otherwise",
          "[autodiff][jit][control_flow][fuzz]") {
  FlowGen z{Gen{std::mt19937_64(seed_or(2024))}};
  z.with_checkpoint = true;
  coverage = {};
  int flow_programs = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const TensorList inputs = z.inputs();
    const Program prog = z.program(inputs);
    const std::string text = prog.str();
    flow_programs += text.find("cond(") != std::string::npos || text.find("scan") != std::string::npos;
    INFO("trial " << trial << ", inputs " << inputs[0].shape().str() << " " << inputs[1].shape().str() << "\n" << text);

    const Tensor cot = random_normal(RngKey::from_seed(z.z.g()), prog(inputs).shape(), DType::f64);
    auto value_and_grads = [&](const TensorList& x) {
      TensorList leaves;
      for (const auto& t : x) leaves.push_back(t.detach().set_requires_grad());
      TensorList out = grad(sum(prog(leaves) * cot), leaves);
      out.insert(out.begin(), prog(x));
      return out;
    };
    auto compiled = jit::jit(value_and_grads);
    TensorList x = inputs;
    for (int call = 0; call < 4; ++call, x = z.like(inputs)) {  // the trace, then replays on fresh inputs
      const GradcheckResult r = gradcheck_branchy([&](const TensorList& y) { return prog(y); }, x);  // eager, whichever branches x takes
      INFO("call " << call << ": " << r.report);
      CHECK(r.ok);
      const TensorList want = recorded([&] { return value_and_grads(x); });
      const TensorList got = compiled(x);
      REQUIRE(got.size() == want.size());
      for (size_t i = 0; i < got.size(); ++i) {
        INFO("call " << call << ", output " << i << " (0 the value, then the gradients): jit " << values(got[i]) << ", eager "
                     << values(want[i]));
        CHECK(close(got[i], want[i], 1e-12));
      }
    }
    CHECK(compiled.stats().hits >= 1);  // replays of the compiled graph, not eager runs
  }
  CHECK(flow_programs >= 30);  // most programs hold control flow
  CHECK(coverage.taken[0] >= 20);  // top-level conds took each branch, replays included
  CHECK(coverage.taken[1] >= 20);
}

TEST_CASE("random programs with cond, scan and checkpoint: second derivatives against finite differences of the gradient, and under jit",
          "[autodiff][control_flow][fuzz]") {
  // gradgradcheck (gradient_functional): the gradient of <d/dx sum(prog(x) * cot), w>, through the
  // vjps of cond's and scan's vjps (themselves conds and scans).
  FlowGen z{Gen{std::mt19937_64(seed_or(77))}};
  z.with_checkpoint = true;  // recomputed under create_graph from a recorded copy of their input
  int checkpointed = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const TensorList inputs = z.inputs();
    const Program prog = z.program(inputs);
    checkpointed += prog.str().find("checkpoint(") != std::string::npos;
    INFO("trial " << trial << ", inputs " << inputs[0].shape().str() << " " << inputs[1].shape().str() << "\n" << prog.str());
    const Tensor cot = random_normal(RngKey::from_seed(z.z.g()), prog(inputs).shape(), DType::f64);
    const auto g = gradient_functional(prog, cot, z.like(inputs));
    const GradcheckResult r = gradcheck_branchy(g, inputs);
    INFO(r.report);
    CHECK(r.ok);
    // The Hessian-vector product under jit, traced once and replayed on inputs that branch otherwise.
    const auto hessian_vector = gradient_of(g);
    auto compiled = jit::jit(hessian_vector);
    TensorList x = inputs;
    for (int call = 0; call < 3; ++call, x = z.like(inputs)) {
      const TensorList got = compiled(x), want = hessian_vector(x);
      REQUIRE(got.size() == want.size());
      for (size_t i = 0; i < got.size(); ++i) {
        INFO("jit call " << call << ", input " << i << ": jit " << values(got[i]) << ", eager " << values(want[i]));
        CHECK(close(got[i], want[i], 1e-12));
      }
    }
    CHECK(compiled.stats().hits >= 1);  // replays of the compiled graph, not eager runs
  }
  CHECK(checkpointed >= 10);  // programs differentiated twice through checkpoint()
}

TEST_CASE("random programs with while_loop, cond and scan: jit replays and vmap against a loop over examples",
          "[jit][vmap][control_flow][fuzz]") {
  FlowGen z{Gen{std::mt19937_64(seed_or(4048))}, true};
  coverage = {};
  const int64_t B = 4;
  for (int trial = 0; trial < 60; ++trial) {
    const TensorList inputs = z.inputs();
    const Program prog = z.program(inputs);
    const std::string text = prog.str();
    const bool differentiable = text.find("while_loop") == std::string::npos;
    INFO("trial " << trial << ", inputs " << inputs[0].shape().str() << " " << inputs[1].shape().str() << "\n" << text);

    // Per example: the value and, without a while_loop, the gradient of sum(value^2) for every input.
    auto per_example = [&](const TensorList& x) {
      TensorList out{prog(x)};
      if (differentiable) {
        TensorList leaves;
        for (const auto& t : x) leaves.push_back(t.detach().set_requires_grad());
        const Tensor y = prog(leaves);
        for (const auto& g : grad(sum(y * y), leaves)) out.push_back(g);
      }
      return out;
    };

    // jit: the trace, then replays on fresh inputs.
    auto compiled = jit::jit(per_example);
    TensorList x = inputs;
    for (int call = 0; call < 3; ++call, x = z.like(inputs)) {
      const TensorList want = recorded([&] { return per_example(x); }), got = compiled(x);
      REQUIRE(got.size() == want.size());
      for (size_t i = 0; i < got.size(); ++i) {
        INFO("jit call " << call << ", output " << i << ": jit " << values(got[i]) << ", eager " << values(want[i]));
        CHECK(close(got[i], want[i], 1e-12));
      }
    }
    CHECK(compiled.stats().hits >= 1);  // replays of the compiled graph, not eager runs

    // vmap: every input batched along axis 0 (so every predicate and trip count is per example), or the
    // last input shared.
    const bool shared = inputs.size() > 2 && z.z.coin();
    std::vector<TensorList> examples;
    for (int64_t b = 0; b < B; ++b) examples.push_back(z.like(inputs));
    TensorList batched;
    std::vector<int> in_axes;
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (shared && i + 1 == inputs.size()) {
        for (auto& e : examples) e[i] = inputs[i];
        batched.push_back(inputs[i]);
        in_axes.push_back(jit::not_batched);
        continue;
      }
      TensorList u;
      for (const auto& e : examples) u.push_back(e[i].unsqueeze(0));
      batched.push_back(concat(u, 0));
      in_axes.push_back(0);
    }
    const TensorList got = jit::vmap(per_example, in_axes, std::vector<int>(differentiable ? inputs.size() + 1 : 1, 0))(batched);
    for (int64_t b = 0; b < B; ++b) {
      const TensorList want = recorded([&] { return per_example(examples[size_t(b)]); });
      REQUIRE(got.size() == want.size());
      for (size_t k = 0; k < got.size(); ++k) {
        const Tensor g = got[k].slice(0, b, b + 1).squeeze(0);
        INFO("vmap example " << b << " of " << B << (shared ? " (last input shared)" : "") << ", output " << k << ": vmap "
                             << values(g) << ", loop " << values(want[k]));
        CHECK(close(g, want[k], 1e-12));
      }
    }
  }
  CHECK(coverage.taken[0] >= 10);
  CHECK(coverage.taken[1] >= 10);
  CHECK(coverage.trips[0] >= 10);  // while_loops that ran once and three times
  CHECK(coverage.trips[1] >= 10);
}
