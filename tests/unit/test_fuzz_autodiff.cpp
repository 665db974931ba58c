// Autodiff and the JIT on random compositions of smooth ops: values reused several times (gradients
// accumulate), strided views (slices, permutes, transposes, expands) feeding later ops, broadcasting,
// reductions with and without keepdims, matmul, softmax and layer norm. Each program's vjp is checked
// against central finite differences in f64, and jit() of the program and of its gradient against eager.
// The seed is fixed; FUZZ_SEED explores others.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <titanax/titanax.h>

#include "jit/graph.h"
#include "fuzz_program.h"

using namespace titanax;
using namespace titanax::testing::fuzz;

TEST_CASE("random compositions of smooth ops: vjp against finite differences, jit against eager", "[autodiff][jit][fuzz]") {
  Gen z{std::mt19937_64(seed_or(77))};
  for (int trial = 0; trial < 120; ++trial) {
    TensorList inputs;
    const Shape s0 = small_shape(z);
    inputs.push_back(random_normal(RngKey::from_seed(z.g()), s0, DType::f64) * 0.7);
    // A second input of a related shape (equal, broadcastable, or the matmul partner), and sometimes a third.
    inputs.push_back(random_normal(RngKey::from_seed(z.g()), partner_shape(z, s0), DType::f64) * 0.7);
    if (z.coin()) inputs.push_back(random_normal(RngKey::from_seed(z.g()), s0, DType::f64) * 0.7);
    const Program prog = z.program(inputs, int(z.pick(3, 8)));
    INFO("trial " << trial << ", inputs " << inputs[0].shape().str() << " " << inputs[1].shape().str() << "\n" << prog.str());

    auto fn = [&](const TensorList& x) { return prog(x); };
    const GradcheckResult r = gradcheck(fn, inputs);
    INFO(r.report);
    CHECK(r.ok);

    // jit of the program, and of its gradient (the tape's backward traced into the graph), against eager.
    const Tensor eager = prog(inputs);
    const Tensor cot = random_normal(RngKey::from_seed(z.g()), eager.shape(), DType::f64);
    auto grads_of = [&](const TensorList& x) {
      TensorList leaves;
      for (const auto& t : x) leaves.push_back(t.detach().set_requires_grad());
      return grad(sum(prog(leaves) * cot), leaves);
    };
    const TensorList eager_grads = grads_of(inputs);
    auto forward = jit::jit([&](const TensorList& x) { return TensorList{prog(x)}; });
    auto backward = jit::jit(grads_of);
    for (int call = 0; call < 2; ++call) {  // the trace, then a replay of the optimised graph
      INFO("jit call " << call);
      const Tensor jf = forward(inputs)[0];
      INFO("jit " << values(jf) << ", eager " << values(eager));
      CHECK(close(jf, eager, 1e-12));
      const TensorList jg = backward(inputs);
      REQUIRE(jg.size() == eager_grads.size());
      for (size_t i = 0; i < jg.size(); ++i) {
        INFO("gradient of input " << i << ": jit " << values(jg[i]) << ", eager " << values(eager_grads[i]));
        CHECK(close(jg[i], eager_grads[i], 1e-12));
      }
    }
    CHECK(forward.stats().hits >= 1);  // replays of the compiled graphs, not eager runs
    CHECK(backward.stats().hits >= 1);
  }
}

TEST_CASE("random compositions: second derivatives (the vjp of the vjp) against finite differences of the gradient",
          "[autodiff][fuzz]") {
  // PyTorch's gradgradcheck: g(x) = <d/dx sum(prog(x) * cot), w> (gradient_functional), whose own
  // gradient goes through every op's vjp recorded with create_graph, against central finite
  // differences of g.
  Gen z{std::mt19937_64(seed_or(303))};
  for (int trial = 0; trial < 80; ++trial) {
    TensorList inputs{random_normal(RngKey::from_seed(z.g()), small_shape(z), DType::f64) * 0.7};
    inputs.push_back(random_normal(RngKey::from_seed(z.g()), partner_shape(z, inputs[0].shape()), DType::f64) * 0.7);
    const Program prog = z.program(inputs, int(z.pick(2, 6)));
    INFO("trial " << trial << ", inputs " << inputs[0].shape().str() << " " << inputs[1].shape().str() << "\n" << prog.str());
    const Tensor cot = random_normal(RngKey::from_seed(z.g()), prog(inputs).shape(), DType::f64);
    TensorList w;
    for (const auto& t : inputs) w.push_back(random_normal(RngKey::from_seed(z.g()), t.shape(), DType::f64));
    const auto g = gradient_functional(prog, cot, w);
    const GradcheckResult r = gradcheck(g, inputs);
    INFO(r.report);
    CHECK(r.ok);
    // The second derivatives under jit (both backward passes traced into one graph; trace and replay)
    // and per example under vmap, against eager.
    const auto hessian_vector = gradient_of(g);
    const TensorList want = hessian_vector(inputs);
    auto compiled = jit::jit(hessian_vector);
    for (int call = 0; call < 2; ++call) {
      const TensorList got = compiled(inputs);
      REQUIRE(got.size() == want.size());
      for (size_t i = 0; i < got.size(); ++i) {
        INFO("jit call " << call << ", input " << i << ": jit " << values(got[i]) << ", eager " << values(want[i]));
        CHECK(close(got[i], want[i], 1e-12));
      }
    }
    CHECK(compiled.stats().hits >= 1);  // replays of the compiled graph, not eager runs
    const TensorList batched{concat({inputs[0].unsqueeze(0), (inputs[0] * 0.5).unsqueeze(0)}, 0), inputs[1]};
    const TensorList per = jit::vmap(hessian_vector, {0, jit::not_batched})(batched);
    REQUIRE(per.size() == want.size());
    const TensorList second = hessian_vector({inputs[0] * 0.5, inputs[1]});
    for (size_t i = 0; i < per.size(); ++i) {
      INFO("vmap, input " << i);
      CHECK(close(per[i].slice(0, 0, 1).squeeze(0), want[i], 1e-12));
      CHECK(close(per[i].slice(0, 1, 2).squeeze(0), second[i], 1e-12));
    }
  }
}

TEST_CASE("random compositions on larger f32 / bf16 tensors: jit's fused, planned replay equals eager", "[jit][fuzz]") {
  // Shapes up to thousands of elements, so fused loops run in several chunks and threads, and the memory
  // plan reuses buffers; forward and gradient, trace and two replays.
  Gen z{std::mt19937_64(seed_or(91))};
  for (int trial = 0; trial < 40; ++trial) {
    const Shape s0{z.pick(1, 40), z.pick(1, 70), z.pick(1, 9)};
    std::vector<int64_t> d = s0.vec();
    if (z.coin()) d = {d.back(), z.pick(1, 50)};
    else if (z.coin()) d[0] = 1;
    const DType dt = trial % 3 == 2 ? DType::bf16 : DType::f32;  // bf16: every op rounds, fused or not
    TensorList inputs{random_normal(RngKey::from_seed(z.g()), s0).astype(dt),
                      random_normal(RngKey::from_seed(z.g()), Shape(d)).astype(dt)};
    const Program prog = z.program(inputs, int(z.pick(3, 8)), 40000);
    INFO("trial " << trial << ", inputs " << inputs[0].str() << " " << inputs[1].str() << "\n" << prog.str());
    const Tensor eager = prog(inputs);
    const Tensor cot = random_normal(RngKey::from_seed(z.g()), eager.shape()).astype(eager.dtype());
    auto grads_of = [&](const TensorList& x) {
      TensorList leaves;
      for (const auto& t : x) leaves.push_back(t.detach().set_requires_grad());
      TensorList out = grad(sum(prog(leaves) * cot), leaves);
      out.push_back(prog(x));
      return out;
    };
    const TensorList want = grads_of(inputs);
    auto compiled = jit::jit(grads_of);
    for (int call = 0; call < 3; ++call) {
      const TensorList got = compiled(inputs);
      REQUIRE(got.size() == want.size());
      for (size_t i = 0; i < got.size(); ++i) {
        INFO("call " << call << ", output " << i << " (the last is the value)");
        const auto g = got[i].astype(DType::f32).contiguous().to_vector<float>();
        const auto w = want[i].astype(DType::f32).contiguous().to_vector<float>();
        REQUIRE(g.size() == w.size());
        double worst = 0;
        for (size_t j = 0; j < g.size(); ++j) worst = std::max(worst, std::fabs(double(g[j]) - w[j]) / (1 + std::fabs(double(w[j]))));
        // Bitwise, as fusion and the memory plan promise, except where a GEMM is involved: the replay may
        // hand oneDNN another layout of the same operands (a folded constant is contiguous where eager
        // had a strided view), hence another blocking and summation order, as in PyTorch.
        CHECK(worst <= (!prog.has_gemm ? 0.0 : dt == DType::bf16 ? 2e-2 : 1e-5));
      }
    }
    CHECK(compiled.stats().hits >= 1);  // replays of the compiled graph, not eager runs
  }
}

TEST_CASE("random compositions under vmap: batched values and per-example gradients against a loop", "[jit][vmap][fuzz]") {
  // Each input batched along a random axis (or shared: not_batched), the output's batch axis placed at a
  // random position (first or last).
  Gen z{std::mt19937_64(seed_or(123))};
  const int64_t B = 3;
  for (int trial = 0; trial < 80; ++trial) {
    const Shape s0 = small_shape(z), s1 = partner_shape(z, s0);
    const TensorList example{random_normal(RngKey::from_seed(z.g()), s0, DType::f64),
                             random_normal(RngKey::from_seed(z.g()), s1, DType::f64)};
    const Program prog = z.program(example, int(z.pick(3, 7)));
    // Per example: the value and the gradient of sum(value * value) with respect to both inputs.
    auto per_example = [&](const TensorList& x) {
      TensorList leaves{x[0].detach().set_requires_grad(), x[1].detach().set_requires_grad()};
      const Tensor y = prog(leaves);
      TensorList out = grad(sum(y * y), leaves);
      out.insert(out.begin(), prog(x));
      return out;
    };
    const bool shared = z.coin();  // input 1 the same for every example
    std::vector<int> in_axes{int(z.pick(-s0.rank() - 1, s0.rank())), shared ? jit::not_batched : 0};
    TensorList batched, slices0;
    for (int64_t b = 0; b < B; ++b) slices0.push_back(random_normal(RngKey::from_seed(z.g()), s0, DType::f64));
    const int ax0 = in_axes[0] < 0 ? in_axes[0] + s0.rank() + 1 : in_axes[0];
    batched.push_back(concat([&] { TensorList u; for (auto& t : slices0) u.push_back(t.unsqueeze(ax0)); return u; }(), ax0));
    TensorList slices1;
    for (int64_t b = 0; b < B; ++b) slices1.push_back(shared ? example[1] : random_normal(RngKey::from_seed(z.g()), s1, DType::f64));
    batched.push_back(shared ? example[1] : concat([&] { TensorList u; for (auto& t : slices1) u.push_back(t.unsqueeze(0)); return u; }(), 0));
    const int out_axis = int(z.pick(0, 1)) ? 0 : -1;
    INFO("trial " << trial << ", example inputs " << s0.str() << " " << s1.str() << ", in_axes " << in_axes[0] << " "
                  << (shared ? "shared" : "0") << ", out_axis " << out_axis << "\n" << prog.str());
    const TensorList got = jit::vmap(per_example, in_axes, std::vector<int>(3, out_axis))(batched);
    REQUIRE(got.size() == 3);
    for (int64_t b = 0; b < B; ++b) {
      const TensorList want = per_example({slices0[size_t(b)], slices1[size_t(b)]});
      for (size_t k = 0; k < 3; ++k) {
        const Tensor g = got[k].slice(out_axis < 0 ? got[k].dim() - 1 : 0, b, b + 1).squeeze(out_axis < 0 ? got[k].dim() - 1 : 0);
        INFO("example " << b << ", output " << k << " (0 the value, then the gradients): vmap " << values(g) << ", loop "
                        << values(want[k]));
        REQUIRE(g.shape() == want[k].shape());
        const auto gv = g.contiguous().to_vector<double>(), wv = want[k].contiguous().to_vector<double>();
        bool close = true;
        for (size_t i = 0; i < gv.size(); ++i) close = close && std::fabs(gv[i] - wv[i]) <= 1e-12 * (1 + std::fabs(wv[i]));
        CHECK(close);
      }
    }
  }
}
