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

using namespace titanax;

namespace {

// One step of a program: reads values by index, appends its result.
struct Step {
  std::string what;
  std::function<Tensor(const TensorList&)> run;
};

struct Program {
  std::vector<Step> steps;
  int inputs = 0;
  bool has_gemm = false;  // a matmul step: results depend on the GEMM's blocking, so on operand layouts
  // Runs every step on `args` (the inputs), returns the last value.
  Tensor operator()(const TensorList& args) const {
    TensorList v = args;
    for (const auto& s : steps) v.push_back(s.run(v));
    return v.back();
  }
  std::string str() const {
    std::string s;
    for (size_t i = 0; i < steps.size(); ++i) s += "v" + std::to_string(inputs + int(i)) + " = " + steps[i].what + "\n";
    return s;
  }
};

std::string values(const Tensor& t) {
  std::string s = t.str() + " {";
  for (double x : t.contiguous().to_vector<double>()) s += " " + std::to_string(x);
  return s + " }";
}

struct Gen {
  std::mt19937_64 g;
  int64_t pick(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g); }
  bool coin() { return pick(0, 1) == 1; }

  // A candidate step over the values so far (it may not fit their shapes: the caller tries it).
  Step candidate(const TensorList& v) {
    const size_t n = v.size();
    const size_t a = size_t(pick(0, int64_t(n) - 1)), b = size_t(pick(0, int64_t(n) - 1));
    const std::string A = "v" + std::to_string(a), B = "v" + std::to_string(b);
    const int rank = v[a].dim();
    const int ax = rank ? int(pick(-rank, rank - 1)) : 0;
    const std::string AX = std::to_string(ax);
    switch (pick(0, 23)) {
      case 0: return {A + " + " + B, [=](const TensorList& x) { return x[a] + x[b]; }};
      case 1: return {A + " - " + B, [=](const TensorList& x) { return x[a] - x[b]; }};
      case 2: return {A + " * " + B, [=](const TensorList& x) { return x[a] * x[b]; }};
      case 3: return {A + " / (" + B + "^2 + 1)", [=](const TensorList& x) { return x[a] / (square(x[b]) + 1.0); }};
      case 4: return {"exp(tanh(" + A + "))", [=](const TensorList& x) { return exp(tanh(x[a])); }};
      case 5: return {"sigmoid(" + A + ") * 0.5", [=](const TensorList& x) { return sigmoid(x[a]) * 0.5; }};
      case 6: {
        const bool keep = coin();
        return {"sum(" + A + ", " + AX + (keep ? ", keepdims)" : ")"), [=](const TensorList& x) { return sum(x[a], {ax}, keep); }};
      }
      case 7: {
        const bool keep = coin();
        return {"mean(" + A + ", " + AX + (keep ? ", keepdims)" : ")"), [=](const TensorList& x) { return mean(x[a], {ax}, keep); }};
      }
      case 8: return {"softmax(" + A + ", " + AX + ")", [=](const TensorList& x) { return softmax(x[a], ax); }};
      case 9: return {"log_softmax(" + A + ", " + AX + ")", [=](const TensorList& x) { return log_softmax(x[a], ax); }};
      case 10: return {"layer_norm(" + A + ")", [=](const TensorList& x) { return layer_norm(x[a], {}, {}, 1e-5); }};
      case 11: return {"matmul(" + A + ", " + B + ")", [=](const TensorList& x) { return matmul(x[a], x[b]); }};
      case 12: {
        const int64_t start = pick(0, 1), stop = pick(2, 4), step = pick(1, 2);
        return {"slice(" + A + ", " + AX + ", " + std::to_string(start) + ":" + std::to_string(stop) + ":" + std::to_string(step) + ")",
                [=](const TensorList& x) { return slice(x[a], ax, start, stop, step); }};
      }
      case 13: {
        std::vector<int> p(static_cast<size_t>(rank));
        for (int i = 0; i < rank; ++i) p[size_t(i)] = i;
        std::shuffle(p.begin(), p.end(), g);
        std::string ps;
        for (int i : p) ps += std::to_string(i);
        return {"permute(" + A + ", " + ps + ")", [=](const TensorList& x) { return permute(x[a], p); }};
      }
      case 14: {
        const int other = rank ? int(pick(0, rank - 1)) : 0;
        return {"transpose(" + A + ", " + AX + ", " + std::to_string(other) + ")",
                [=](const TensorList& x) { return transpose(x[a], ax, other); }};
      }
      case 15: return {"concat(" + A + ", " + B + ", " + AX + ")", [=](const TensorList& x) { return concat({x[a], x[b]}, ax); }};
      case 16: return {"reshape(" + A + ", [-1])", [=](const TensorList& x) { return reshape(x[a], Shape{-1}); }};
      case 18: return {"gelu(" + A + ")", [=](const TensorList& x) { return gelu(x[a], true); }};
      case 19: return {"log(" + A + "^2 + 1)", [=](const TensorList& x) { return log(square(x[a]) + 1.0); }};
      case 20: return {"sqrt(" + A + "^2 + 1)", [=](const TensorList& x) { return sqrt(square(x[a]) + 1.0); }};
      case 21: {
        const int64_t before = pick(0, 2), after = pick(0, 2);
        return {"pad(" + A + ", " + AX + ", " + std::to_string(before) + ", " + std::to_string(after) + ")",
                [=](const TensorList& x) { return pad(x[a], ax, before, after); }};
      }
      case 22: return {"unbind(" + A + ", " + AX + ").back()", [=](const TensorList& x) { return unbind(x[a], ax).back(); }};
      case 23: {
        const int64_t n = rank ? v[a].shape()[size_t(ax < 0 ? ax + rank : ax)] : 1;
        std::vector<int64_t> ids{pick(0, n - 1), pick(0, n - 1), pick(0, n - 1)};  // repeats: the gradient scatters and adds
        const Tensor idx = from_vector(ids, Shape{3});
        return {"take(" + A + ", [" + std::to_string(ids[0]) + " " + std::to_string(ids[1]) + " " + std::to_string(ids[2]) +
                    "], " + AX + ")",
                [=](const TensorList& x) { return take(x[a], idx, ax); }};
      }
      default: {
        std::vector<int64_t> d = v[a].shape().vec();
        d.insert(d.begin(), 2);
        const Shape s(d);
        return {"expand(" + A + ", " + s.str() + ")", [=](const TensorList& x) { return expand(x[a], s); }};
      }
    }
  }

  Program program(const TensorList& inputs, int length, int64_t max_numel = 256) {
    Program p;
    p.inputs = int(inputs.size());
    TensorList v = inputs;
    NoGradGuard ng;
    while (int(p.steps.size()) < length) {
      Step s = candidate(v);
      try {
        Tensor r = s.run(v);
        if (r.numel() == 0 || r.numel() > max_numel) continue;  // keep the work bounded
        v.push_back(r);
        p.has_gemm = p.has_gemm || s.what.rfind("matmul", 0) == 0;
        p.steps.push_back(std::move(s));
      } catch (const Error&) {
        // not for these shapes: draw another
      }
    }
    return p;
  }
};

Shape small_shape(Gen& z) {
  const int rank = int(z.pick(1, 3));
  std::vector<int64_t> d(static_cast<size_t>(rank));
  for (auto& x : d) x = z.pick(1, 3);
  return Shape(d);
}

}  // namespace

TEST_CASE("random compositions of smooth ops: vjp against finite differences, jit against eager", "[autodiff][jit][fuzz]") {
  Gen z{std::mt19937_64(std::getenv("FUZZ_SEED") ? std::stoull(std::getenv("FUZZ_SEED")) : 77)};
  for (int trial = 0; trial < 120; ++trial) {
    TensorList inputs;
    const Shape s0 = small_shape(z);
    inputs.push_back(random_normal(RngKey::from_seed(z.g()), s0, DType::f64) * 0.7);
    // A second input of a related shape (equal, broadcastable, or the matmul partner), and sometimes a third.
    std::vector<int64_t> d = s0.vec();
    if (z.coin() && d.size() >= 2) d = {d.back(), z.pick(1, 3)};
    else if (z.coin()) d[0] = 1;
    inputs.push_back(random_normal(RngKey::from_seed(z.g()), Shape(d), DType::f64) * 0.7);
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
      const auto close = [](const Tensor& got, const Tensor& want) {
        const auto g = got.contiguous().to_vector<double>(), w = want.contiguous().to_vector<double>();
        if (g.size() != w.size() || got.shape() != want.shape()) return false;
        for (size_t i = 0; i < g.size(); ++i)
          if (!(std::fabs(g[i] - w[i]) <= 1e-12 * (1 + std::fabs(w[i])))) return false;
        return true;
      };
      INFO("jit call " << call);
      const Tensor jf = forward(inputs)[0];
      INFO("jit " << values(jf) << ", eager " << values(eager));
      CHECK(close(jf, eager));
      const TensorList jg = backward(inputs);
      REQUIRE(jg.size() == eager_grads.size());
      for (size_t i = 0; i < jg.size(); ++i) {
        INFO("gradient of input " << i << ": jit " << values(jg[i]) << ", eager " << values(eager_grads[i]));
        CHECK(close(jg[i], eager_grads[i]));
      }
    }
  }
}

TEST_CASE("random compositions on larger f32 / bf16 tensors: jit's fused, planned replay equals eager", "[jit][fuzz]") {
  // Shapes up to thousands of elements, so fused loops run in several chunks and threads, and the memory
  // plan reuses buffers; forward and gradient, trace and two replays.
  Gen z{std::mt19937_64(std::getenv("FUZZ_SEED") ? std::stoull(std::getenv("FUZZ_SEED")) : 91)};
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
  }
}

TEST_CASE("random compositions under vmap: batched values and per-example gradients against a loop", "[jit][vmap][fuzz]") {
  // Each input batched along a random axis (or shared: not_batched), the output's batch axis placed at a
  // random position (first or last).
  Gen z{std::mt19937_64(std::getenv("FUZZ_SEED") ? std::stoull(std::getenv("FUZZ_SEED")) : 123)};
  const int64_t B = 3;
  for (int trial = 0; trial < 80; ++trial) {
    const Shape s0 = small_shape(z);
    std::vector<int64_t> d = s0.vec();
    if (z.coin() && d.size() >= 2) d = {d.back(), z.pick(1, 3)};
    else if (z.coin()) d[0] = 1;
    const TensorList example{random_normal(RngKey::from_seed(z.g()), s0, DType::f64),
                             random_normal(RngKey::from_seed(z.g()), Shape(d), DType::f64)};
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
    for (int64_t b = 0; b < B; ++b) slices1.push_back(shared ? example[1] : random_normal(RngKey::from_seed(z.g()), Shape(d), DType::f64));
    batched.push_back(shared ? example[1] : concat([&] { TensorList u; for (auto& t : slices1) u.push_back(t.unsqueeze(0)); return u; }(), 0));
    const int out_axis = int(z.pick(0, 1)) ? 0 : -1;
    INFO("trial " << trial << ", example inputs " << s0.str() << " " << Shape(d).str() << ", in_axes " << in_axes[0] << " "
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
