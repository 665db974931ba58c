// Random programs for the fuzz tests: a program is a list of steps over the values so far (its inputs,
// then each step's result), drawn from smooth ops (elementwise, reductions, softmax, layer norm, matmul,
// views, concat, pad, take) so that gradients exist almost everywhere. Shared by test_fuzz_autodiff.cpp
// and test_fuzz_control_flow.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <titanax/titanax.h>

namespace titanax::testing::fuzz {

// One step of a program: reads values by index, appends its result.
struct Step {
  std::string what;
  std::function<Tensor(const TensorList&)> run;
};

struct Program {
  std::vector<Step> steps;
  int inputs = 0;
  bool has_gemm = false;  // a matmul step: results depend on the GEMM's blocking, so on operand layouts
  // Runs every step on `args` (the inputs), returns every value: the inputs, then each step's result.
  TensorList all(const TensorList& args) const {
    TensorList v = args;
    for (const auto& s : steps) v.push_back(s.run(v));
    return v;
  }
  // Runs every step on `args`, returns the last value.
  Tensor operator()(const TensorList& args) const { return all(args).back(); }
  // A line per step (more for a step whose description spans lines), each prefixed by `indent`.
  std::string str(const std::string& indent = "") const {
    std::string s;
    for (size_t i = 0; i < steps.size(); ++i) {
      s += indent + "v" + std::to_string(inputs + int(i)) + " = ";
      std::string w = steps[i].what;
      while (!w.empty() && w.back() == '\n') w.pop_back();
      for (char c : w) s += c == '\n' ? "\n" + indent : std::string(1, c);
      s += "\n";
    }
    return s;
  }
};

// A tensor's description and its values, for failure messages.
inline std::string values(const Tensor& t) {
  std::string s = t.str() + " {";
  for (double x : t.contiguous().to_vector<double>()) s += " " + std::to_string(x);
  return s + " }";
}

// Same shape and every element within rel * (1 + |want|) (NaN never).
inline bool close(const Tensor& got, const Tensor& want, double rel) {
  if (got.shape() != want.shape()) return false;
  const auto g = got.contiguous().to_vector<double>(), w = want.contiguous().to_vector<double>();
  for (size_t i = 0; i < g.size(); ++i)
    if (!(std::fabs(g[i] - w[i]) <= rel * (1 + std::fabs(w[i])))) return false;
  return true;
}

// x -> <d/dx sum(prog(x) * cot), w> (w: one tensor per input; prog: a Program or any TensorList -> Tensor
// function), a scalar whose own gradient goes through the vjp of every vjp (PyTorch's gradgradcheck).
// Under gradcheck's numeric pass the inputs do not require grad: they are made leaves again so that the
// inner gradient exists.
template <class F>
std::function<Tensor(const TensorList&)> gradient_functional(F prog, Tensor cot, TensorList w) {
  return [prog = std::move(prog), cot = std::move(cot), w = std::move(w)](const TensorList& in) {
    GradModeGuard on(true);
    const bool outer = in[0].requires_grad();
    TensorList xs = in;
    if (!outer)
      for (auto& t : xs) t = t.detach().set_requires_grad();
    BackwardOptions o;
    o.create_graph = outer;
    const TensorList gs = grad(sum(prog(xs) * cot), xs, o);
    Tensor acc = sum(gs[0] * w[0]);
    for (size_t i = 1; i < gs.size(); ++i) acc = acc + sum(gs[i] * w[i]);
    return acc;
  };
}

// x -> the gradient of g at x (with g a gradient_functional: a Hessian-vector product), each input made
// a leaf first.
inline std::function<TensorList(const TensorList&)> gradient_of(std::function<Tensor(const TensorList&)> g) {
  return [g = std::move(g)](const TensorList& x) {
    TensorList leaves;
    for (const auto& t : x) leaves.push_back(t.detach().set_requires_grad());
    return grad(g(leaves), leaves);
  };
}

// The fixed seed of a test, or FUZZ_SEED from the environment to explore others.
inline uint64_t seed_or(uint64_t fixed) { return std::getenv("FUZZ_SEED") ? std::stoull(std::getenv("FUZZ_SEED")) : fixed; }

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

  // A program of `length` steps over `inputs` (example values: the steps are tried on them, and those
  // that do not fit the shapes, or whose result is empty or has more than max_numel elements, are drawn
  // again). `draw` replaces candidate() as the source of steps.
  Program program(const TensorList& inputs, int length, int64_t max_numel = 256,
                  const std::function<Step(const TensorList&)>& draw = {}) {
    Program p;
    p.inputs = int(inputs.size());
    TensorList v = inputs;
    NoGradGuard ng;
    while (int(p.steps.size()) < length) {
      Step s = draw ? draw(v) : candidate(v);
      try {
        Tensor r = s.run(v);
        if (r.numel() == 0 || r.numel() > max_numel) continue;  // keep the work bounded
        v.push_back(r);
        p.has_gemm = p.has_gemm || s.what.find("matmul") != std::string::npos;  // nested steps too
        p.steps.push_back(std::move(s));
      } catch (const Error&) {
        // not for these shapes: draw another
      }
    }
    return p;
  }
};

// Rank 1 to 3, extents 1 to 3.
inline Shape small_shape(Gen& z) {
  const int rank = int(z.pick(1, 3));
  std::vector<int64_t> d(static_cast<size_t>(rank));
  for (auto& x : d) x = z.pick(1, 3);
  return Shape(d);
}

// A shape related to s0, for a second input: s0 itself, s0 with a broadcast first axis, or (rank >= 2)
// a matmul partner [s0.back(), 1..3].
inline Shape partner_shape(Gen& z, const Shape& s0) {
  std::vector<int64_t> d = s0.vec();
  if (z.coin() && d.size() >= 2) d = {d.back(), z.pick(1, 3)};
  else if (z.coin()) d[0] = 1;
  return Shape(d);
}


}  // namespace titanax::testing::fuzz
