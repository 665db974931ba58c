// jvp, vjp, hvp, jacobian and hessian (autodiff/functional.h) against central finite differences in f64:
// of the function for first derivatives, of its gradient for second ones (PyTorch's gradgradcheck).
// Functions are random programs of smooth ops (fuzz_program.h) with two outputs, so the products sum
// over several outputs and inputs; FUZZ_SEED explores other draws.
#include <catch2/catch.hpp>

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <titanax/titanax.h>

#include "fuzz_program.h"

using namespace titanax;
using namespace titanax::testing::fuzz;

namespace {

// A host matrix: rows x cols, row-major.
struct Matrix {
  int64_t rows = 0, cols = 0;
  std::vector<double> v;
  double& at(int64_t r, int64_t c) { return v[size_t(r * cols + c)]; }
  double at(int64_t r, int64_t c) const { return v[size_t(r * cols + c)]; }
};

// d f(x)[a] / d x_j[b] by central differences (f evaluated without recording), as a
// [f(x).numel(), x_j.numel()] matrix.
Matrix fd_jacobian(const std::function<Tensor(const TensorList&)>& f, const TensorList& x, size_t j, double eps = 1e-6) {
  NoGradGuard ng;
  TensorList args;
  for (const auto& t : x) args.push_back(t.contiguous().clone());
  double* p = args[j].data<double>();
  Matrix m;
  m.cols = args[j].numel();
  for (int64_t b = 0; b < m.cols; ++b) {
    const double orig = p[b];
    p[b] = orig + eps;
    args[j].storage()->bump_version();
    const std::vector<double> plus = f(args).contiguous().to_vector<double>();
    p[b] = orig - eps;
    const std::vector<double> minus = f(args).contiguous().to_vector<double>();
    p[b] = orig;
    if (b == 0) {
      m.rows = int64_t(plus.size());
      m.v.assign(size_t(m.rows * m.cols), 0.0);
    }
    for (int64_t a = 0; a < m.rows; ++a) m.at(a, b) = (plus[size_t(a)] - minus[size_t(a)]) / (2 * eps);
  }
  return m;
}

// M t (t flattened), or M^T t when transposed.
std::vector<double> times(const Matrix& m, const Tensor& t, bool transposed = false) {
  const std::vector<double> x = t.contiguous().to_vector<double>();
  std::vector<double> out(size_t(transposed ? m.cols : m.rows), 0.0);
  for (int64_t a = 0; a < m.rows; ++a)
    for (int64_t b = 0; b < m.cols; ++b) {
      if (transposed) out[size_t(b)] += m.at(a, b) * x[size_t(a)];
      else out[size_t(a)] += m.at(a, b) * x[size_t(b)];
    }
  return out;
}

// gradcheck's criterion: |analytic - numeric| <= 1e-6 + 1e-5 |numeric| for every element.
void check_near(const std::vector<double>& got, const std::vector<double>& want, const std::string& what) {
  INFO(what);
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    INFO("element " << i << ": got " << got[i] << ", finite differences " << want[i]);
    CHECK(std::fabs(got[i] - want[i]) <= 1e-6 + 1e-5 * std::fabs(want[i]));
  }
}

void add_to(std::vector<double>& acc, const std::vector<double>& x) {
  if (acc.empty()) acc.assign(x.size(), 0.0);
  for (size_t i = 0; i < x.size(); ++i) acc[i] += x[i];
}

struct Case {
  TensorList inputs;
  Program prog;
  std::string str;
};

// Two or three f64 inputs of related shapes and a program of 3 to 7 smooth ops over them.
Case draw(Gen& z) {
  TensorList inputs;
  const Shape s0 = small_shape(z);
  inputs.push_back(random_normal(RngKey::from_seed(z.g()), s0, DType::f64) * 0.7);
  inputs.push_back(random_normal(RngKey::from_seed(z.g()), partner_shape(z, s0), DType::f64) * 0.7);
  if (z.coin()) inputs.push_back(random_normal(RngKey::from_seed(z.g()), s0, DType::f64) * 0.7);
  Program prog = z.program(inputs, int(z.pick(3, 7)));
  std::string s = "inputs";
  for (const auto& t : inputs) s += " " + t.shape().str();
  return {inputs, prog, s + "\n" + prog.str()};
}

// The program's last two values as fn's two outputs (the second may be an input: a leaf output).
VectorFn two_outputs(const Program& prog) {
  return [prog](const TensorList& x) {
    const TensorList all = prog.all(x);
    return TensorList{all.back(), all[all.size() - 2]};
  };
}

std::function<Tensor(const TensorList&)> output(const VectorFn& f, size_t i) {
  return [f, i](const TensorList& x) { return f(x)[i]; };
}

TensorList like(Gen& z, const TensorList& ts) {
  TensorList out;
  for (const auto& t : ts) out.push_back(random_normal(RngKey::from_seed(z.g()), t.shape(), t.dtype()));
  return out;
}

}  // namespace

TEST_CASE("jvp, vjp and jacobian of random programs against finite differences", "[autodiff][functional][fuzz]") {
  Gen z{std::mt19937_64(seed_or(2026))};
  for (int trial = 0; trial < 60; ++trial) {
    const Case c = draw(z);
    INFO("trial " << trial << ", " << c.str);
    const VectorFn f = two_outputs(c.prog);
    // fd[i][j]: d out_i / d x_j.
    std::vector<std::vector<Matrix>> fd(2);
    for (size_t i = 0; i < 2; ++i)
      for (size_t j = 0; j < c.inputs.size(); ++j) fd[i].push_back(fd_jacobian(output(f, i), c.inputs, j));

    const TensorList tangents = like(z, c.inputs);
    const auto [outs, jv] = jvp(f, c.inputs, tangents);
    REQUIRE(outs.size() == 2);
    REQUIRE(jv.size() == 2);
    for (size_t i = 0; i < 2; ++i) {
      CHECK(jv[i].shape() == outs[i].shape());
      CHECK_FALSE(jv[i].requires_grad());
      std::vector<double> want;
      for (size_t j = 0; j < c.inputs.size(); ++j) add_to(want, times(fd[i][j], tangents[j]));
      check_near(jv[i].to_vector<double>(), want, "jvp output " + std::to_string(i));
      CHECK(close(outs[i], f(c.inputs)[i], 0));
    }

    const VjpResult r = vjp(f, c.inputs);
    for (int call = 0; call < 2; ++call) {  // the pullback runs any number of times on one forward pass
      const TensorList cot = like(z, r.outputs);
      const TensorList g = r.pullback(cot);
      REQUIRE(g.size() == c.inputs.size());
      for (size_t j = 0; j < c.inputs.size(); ++j) {
        std::vector<double> want;
        for (size_t i = 0; i < 2; ++i) add_to(want, times(fd[i][j], cot[i], /*transposed=*/true));
        check_near(g[j].contiguous().to_vector<double>(), want, "vjp call " + std::to_string(call) + ", input " + std::to_string(j));
      }
    }

    const std::vector<TensorList> jac = jacobian(f, c.inputs);
    REQUIRE(jac.size() == 2);
    for (size_t i = 0; i < 2; ++i)
      for (size_t j = 0; j < c.inputs.size(); ++j) {
        std::vector<int64_t> d = outs[i].shape().vec();
        for (int64_t e : c.inputs[j].shape().vec()) d.push_back(e);
        CHECK(jac[i][j].shape() == Shape(d));
        check_near(jac[i][j].contiguous().to_vector<double>(), fd[i][j].v,
                   "jacobian " + std::to_string(i) + ", " + std::to_string(j));
      }
    // Row by row (vectorize off) gives the vmapped rows' values.
    FunctionalOptions rowwise;
    rowwise.vectorize = false;
    const std::vector<TensorList> jac1 = jacobian(f, c.inputs, rowwise);
    for (size_t i = 0; i < 2; ++i)
      for (size_t j = 0; j < c.inputs.size(); ++j) CHECK(close(jac1[i][j], jac[i][j], c.prog.has_gemm ? 1e-12 : 0));
  }
}

TEST_CASE("hvp and hessian of random programs against finite differences of the gradient", "[autodiff][functional][fuzz]") {
  Gen z{std::mt19937_64(seed_or(1994))};
  for (int trial = 0; trial < 40; ++trial) {
    const Case c = draw(z);
    INFO("trial " << trial << ", " << c.str);
    const Tensor cot = random_normal(RngKey::from_seed(z.g()), c.prog(c.inputs).shape(), DType::f64);
    const ScalarFn f = [&](const TensorList& x) { return sum(c.prog(x) * cot); };
    // The gradient (first order, itself checked against finite differences elsewhere), flattened into
    // one vector over all inputs; hfd[j]: its derivative with respect to input j.
    const std::function<Tensor(const TensorList&)> gradient = [&](const TensorList& x) {
      GradModeGuard on(true);  // fd_jacobian evaluates without recording
      TensorList flat;
      for (const Tensor& g : gradient_of(f)(x)) flat.push_back(reshape(g, Shape{-1}));
      return concat(flat, 0);
    };
    std::vector<Matrix> hfd;
    for (size_t j = 0; j < c.inputs.size(); ++j) hfd.push_back(fd_jacobian(gradient, c.inputs, j));

    const TensorList v = like(z, c.inputs);
    const auto [value, hv] = hvp(f, c.inputs, v);
    CHECK(close(value, f(c.inputs), 0));
    std::vector<double> want;
    for (size_t j = 0; j < c.inputs.size(); ++j) add_to(want, times(hfd[j], v[j]));
    std::vector<double> got;
    for (const Tensor& t : hv) {
      const std::vector<double> x = t.contiguous().to_vector<double>();
      got.insert(got.end(), x.begin(), x.end());
    }
    check_near(got, want, "hvp");

    const std::vector<TensorList> h = hessian(f, c.inputs);
    FunctionalOptions rowwise;
    rowwise.vectorize = false;
    const std::vector<TensorList> h1 = hessian(f, c.inputs, rowwise);
    int64_t row0 = 0;
    for (size_t i = 0; i < c.inputs.size(); ++i) {
      for (size_t j = 0; j < c.inputs.size(); ++j) {
        std::vector<int64_t> d = c.inputs[i].shape().vec();
        for (int64_t e : c.inputs[j].shape().vec()) d.push_back(e);
        REQUIRE(h[i][j].shape() == Shape(d));
        std::vector<double> block;  // rows of hfd[j] belonging to input i
        for (int64_t a = 0; a < c.inputs[i].numel(); ++a)
          for (int64_t b = 0; b < c.inputs[j].numel(); ++b) block.push_back(hfd[j].at(row0 + a, b));
        check_near(h[i][j].contiguous().to_vector<double>(), block, "hessian " + std::to_string(i) + ", " + std::to_string(j));
        CHECK(close(h1[i][j], h[i][j], c.prog.has_gemm ? 1e-12 : 0));
      }
      row0 += c.inputs[i].numel();
    }
  }
}

TEST_CASE("create_graph: jvp, vjp and hvp results differentiate again, with respect to primals and vectors",
          "[autodiff][functional][fuzz]") {
  // Each result as a function of (primals, tangents / cotangents / v), checked by gradcheck: its vjp (a
  // third pass over the recorded second) against finite differences of the result itself.
  Gen z{std::mt19937_64(seed_or(31))};
  FunctionalOptions cg;
  cg.create_graph = true;
  for (int trial = 0; trial < 20; ++trial) {
    const Case c = draw(z);
    INFO("trial " << trial << ", " << c.str);
    const VectorFn f = two_outputs(c.prog);
    const size_t n = c.inputs.size();
    TensorList args = c.inputs;
    for (const Tensor& t : like(z, c.inputs)) args.push_back(t);
    auto split = [n](const TensorList& a) {
      return std::pair{TensorList(a.begin(), a.begin() + long(n)), TensorList(a.begin() + long(n), a.end())};
    };

    const GradcheckResult j = gradcheck(
        [&](const TensorList& a) {
          const auto [x, t] = split(a);
          const TensorList jv = jvp(f, x, t, cg).second;
          return concat({reshape(jv[0], Shape{-1}), reshape(jv[1], Shape{-1})}, 0);
        },
        args);
    INFO("jvp: " << j.report);
    CHECK(j.ok);

    const TensorList outs = f(c.inputs);
    TensorList vargs = c.inputs;
    for (const Tensor& t : like(z, outs)) vargs.push_back(t);
    const GradcheckResult v = gradcheck(
        [&](const TensorList& a) {
          const TensorList x(a.begin(), a.begin() + long(n)), u(a.begin() + long(n), a.end());
          TensorList flat;
          for (const Tensor& g : vjp(f, x, cg).pullback(u)) flat.push_back(reshape(g, Shape{-1}));
          return concat(flat, 0);
        },
        vargs);
    INFO("vjp: " << v.report);
    CHECK(v.ok);

    const Tensor cot = random_normal(RngKey::from_seed(z.g()), outs[0].shape(), DType::f64);
    const GradcheckResult h = gradcheck(
        [&](const TensorList& a) {
          const auto [x, w] = split(a);
          TensorList flat;
          for (const Tensor& g : hvp([&](const TensorList& xs) { return sum(c.prog(xs) * cot); }, x, w, cg).second)
            flat.push_back(reshape(g, Shape{-1}));
          return concat(flat, 0);
        },
        args);
    INFO("hvp: " << h.report);
    CHECK(h.ok);
  }
}

TEST_CASE("functional transforms: closed forms, non-floating arguments, and the primals left as they were",
          "[autodiff][functional]") {
  // f(x, W) = 0.5 x^T W x: gradient 0.5 (W + W^T) x with respect to x and 0.5 x x^T with respect to W;
  // d^2/dx^2 = 0.5 (W + W^T), d^2 / dx dW[a, b] = 0.5 (delta(a) x[b] + x[a] delta(b)).
  const int64_t n = 3;
  const Tensor x = random_normal(RngKey::from_seed(1), Shape{n}, DType::f64);
  const Tensor W = random_normal(RngKey::from_seed(2), Shape{n, n}, DType::f64);
  const ScalarFn quad = [](const TensorList& a) { return 0.5 * sum(a[0] * matmul(a[1], a[0])); };
  const std::vector<double> xv = x.to_vector<double>(), wv = W.to_vector<double>();
  const std::vector<TensorList> H = hessian(quad, {x, W});
  const std::vector<double> hxx = H[0][0].to_vector<double>(), hxw = H[0][1].contiguous().to_vector<double>();
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = 0; b < n; ++b) {
      CHECK(hxx[size_t(a * n + b)] == Approx(0.5 * (wv[size_t(a * n + b)] + wv[size_t(b * n + a)])).margin(1e-12));
      for (int64_t c = 0; c < n; ++c)  // d^2 / dx[a] dW[b, c] = 0.5 (delta(a, b) x[c] + x[b] delta(a, c))
        CHECK(hxw[size_t(a * n * n + b * n + c)] ==
              Approx(0.5 * ((a == b ? xv[size_t(c)] : 0.0) + (a == c ? xv[size_t(b)] : 0.0))).margin(1e-12));
    }
  CHECK(H[1][1].shape() == Shape{n, n, n, n});  // f is linear in W: zero
  CHECK(max(abs(H[1][1])).item() == 0);

  // Non-floating primals pass through; their tangents, Jacobian and Hessian entries are undefined.
  const Tensor ids = from_vector(std::vector<int64_t>{2, 0, 2}, Shape{3});
  const VectorFn pick = [](const TensorList& a) { return TensorList{take(a[0], a[1], 0) * 2.0, a[1]}; };
  const Tensor t = from_vector(std::vector<double>{1, 10, 100}, Shape{3});
  const auto [outs, jv] = jvp(pick, {x, ids}, {t, Tensor()});
  CHECK(jv[0].to_vector<double>() == std::vector<double>{200, 2, 200});
  CHECK_FALSE(jv[1].defined());
  const std::vector<TensorList> J = jacobian(pick, {x, ids});
  CHECK(J[0][0].to_vector<double>() == std::vector<double>{0, 0, 2, 2, 0, 0, 0, 0, 2});
  CHECK_FALSE(J[0][1].defined());
  CHECK_FALSE(J[1][0].defined());
  CHECK(vjp(pick, {x, ids}).pullback({t, Tensor()})[0].to_vector<double>() == std::vector<double>{20, 0, 202});
  // An undefined tangent / cotangent of a floating argument is zero; an output that does not depend on
  // the primals gets a zero tangent; a leaf output's tangent is its primal's.
  const VectorFn mixed = [](const TensorList& a) { return TensorList{a[0] * a[1], a[0], ones(Shape{2}, DType::f64)}; };
  const Tensor y = from_vector(std::vector<double>{4, 5, 6}, Shape{3});
  const TensorList jm = jvp(mixed, {x, y}, {Tensor(), t}).second;
  CHECK(jm[0].to_vector<double>() == std::vector<double>{xv[0] * 1, xv[1] * 10, xv[2] * 100});
  CHECK(jm[1].to_vector<double>() == std::vector<double>{0, 0, 0});
  CHECK(jm[2].to_vector<double>() == std::vector<double>{0, 0});

  // The primals' flags and .grad() are untouched, also for a primal that requires grad.
  Tensor p = x.clone().detach().set_requires_grad();
  CHECK_FALSE(x.requires_grad());
  (void)hessian(quad, {x, W});
  (void)jvp([](const TensorList& a) { return TensorList{a[0] * a[0]}; }, {p}, {t});
  CHECK_FALSE(x.requires_grad());
  CHECK_FALSE(W.requires_grad());
  CHECK(p.requires_grad());
  CHECK_FALSE(p.grad().defined());
  // Under NoGradGuard they still differentiate, to the same values (hvp itself is checked against finite
  // differences above).
  const TensorList hv = hvp(quad, {x, W}, {t, Tensor()}).second;
  REQUIRE(max(abs(hv[0])).item() > 0);
  {
    NoGradGuard ng;
    const TensorList hv_ng = hvp(quad, {x, W}, {t, Tensor()}).second;
    CHECK(hv_ng[0].to_vector<double>() == hv[0].to_vector<double>());
    CHECK(hv_ng[1].to_vector<double>() == hv[1].to_vector<double>());
  }
}

TEST_CASE("functional transforms reject mismatched vectors, non-scalar Hessians and missing second derivatives",
          "[autodiff][functional][errors]") {
  const Tensor x = random_normal(RngKey::from_seed(3), Shape{2, 3}, DType::f64);
  const Tensor ids = from_vector(std::vector<int64_t>{1, 0}, Shape{2});
  const VectorFn f = [](const TensorList& a) { return TensorList{exp(a[0])}; };
  auto message = [](const std::function<void()>& call) {
    try {
      call();
    } catch (const AutodiffError& e) {
      return std::string(e.what());
    }
    return std::string("no AutodiffError");
  };
  using Catch::Matchers::Contains;
  CHECK_THAT(message([&] { jvp(f, {x}, {}); }), Contains("tangents do not pair with the primals") && Contains("one per primal: 1"));
  CHECK_THAT(message([&] { jvp(f, {x}, {ones(Shape{3, 2}, DType::f64)}); }),
             Contains("tangents 0 has the wrong shape") && Contains("[2, 3]") && Contains("[3, 2]"));
  CHECK_THAT(message([&] { jvp(f, {x, ids}, {x, ids}); }), Contains("given for a non-floating primal") && Contains("i64"));
  CHECK_THAT(message([&] { vjp(f, {x}).pullback({x, x}); }), Contains("cotangents do not pair with the outputs"));
  CHECK_THAT(message([&] { hvp([](const TensorList& a) { return a[0]; }, {x}, {x}); }),
             Contains("hvp needs fn to return a floating scalar") && Contains("[2, 3]"));
  CHECK_THAT(message([&] { hessian([](const TensorList& a) { return argmax(a[0], 0); }, {x}); }),
             Contains("floating scalar"));
  CHECK_THAT(message([&] { jacobian(f, {Tensor()}); }), Contains("primal 0 is undefined"));
  // An op without a second derivative is named (a custom op here: every op of the library has one).
  struct FirstOrderOnly final : Op {
    const char* name() const override { return "first_order_only"; }
    std::vector<TensorSpec> infer(const TensorList& in) const override { return {{in[0].shape(), in[0].dtype(), in[0].device()}}; }
    void cpu(const TensorList& in, TensorList& out) const override {
      NoGradGuard ng;
      copy_(out[0], exp(in[0]));
    }
    // The vjp multiplies by a detached exp(x): right once, not differentiable with respect to x, so it
    // is a custom op of its own that refuses a vjp.
    struct Scale final : Op {
      const char* name() const override { return "first_order_only_backward"; }
      std::vector<TensorSpec> infer(const TensorList& in) const override { return {{in[0].shape(), in[0].dtype(), in[0].device()}}; }
      void cpu(const TensorList& in, TensorList& out) const override {
        NoGradGuard ng;
        copy_(out[0], in[0] * exp(in[1]));
      }
    };
    TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>&) const override {
      return {apply1(std::make_shared<Scale>(), {ct[0], in[0]})};
    }
  };
  const VectorFn once = [](const TensorList& a) { return TensorList{apply1(std::make_shared<FirstOrderOnly>(), {a[0]})}; };
  CHECK_THAT(message([&] { jvp(once, {x}, {x}); }), Contains("first_order_only_backward") && Contains("has no gradient"));
  CHECK(vjp(once, {x}).pullback({x})[0].shape() == x.shape());  // first-order products work
}

TEST_CASE("jvp and hvp through the vocabulary-parallel cross-entropy (one rank) equal cross_entropy's", "[autodiff][functional][tp]") {
  const Mesh mesh = MeshSpec{{"model"}, {1}}.build(make_local_communicator());
  const Tensor z = random_normal(RngKey::from_seed(12), Shape{5, 7}, DType::f64) * 3.0;
  const Tensor labels = from_vector(std::vector<int64_t>{0, 6, 3, -100, 2}, Shape{5});
  const Tensor v = random_normal(RngKey::from_seed(13), Shape{5, 7}, DType::f64);
  for (Reduction red : {Reduction::mean, Reduction::sum, Reduction::none}) {
    INFO("reduction " << int(red));
    const ScalarFn split = [&](const TensorList& a) { return sum(square(vocab_parallel_cross_entropy(mesh, a[0], labels, "model", red))); };
    const ScalarFn whole = [&](const TensorList& a) { return sum(square(cross_entropy(a[0], labels, red))); };
    CHECK(close(hvp(split, {z}, {v}).second[0], hvp(whole, {z}, {v}).second[0], 1e-12));
    const VectorFn vs = [&](const TensorList& a) { return TensorList{split(a)}; }, vw = [&](const TensorList& a) { return TensorList{whole(a)}; };
    CHECK(close(jvp(vs, {z}, {v}).second[0], jvp(vw, {z}, {v}).second[0], 1e-12));
  }
}

TEST_CASE("jacobian and hessian batch their rows in chunks: a 300-element output, a 150-element primal", "[autodiff][functional]") {
  // d (x^3)_a / d x_b = 3 x_a^2 delta(a, b): diagonal, so a row out of place shows.
  const Tensor x = random_normal(RngKey::from_seed(11), Shape{15, 20}, DType::f64);
  const VectorFn cube = [](const TensorList& a) { return TensorList{a[0] * a[0] * a[0]}; };
  const std::vector<double> xv = x.to_vector<double>();
  for (bool vectorize : {true, false}) {
    INFO("vectorize " << vectorize);
    FunctionalOptions o;
    o.vectorize = vectorize;
    const Tensor J = jacobian(cube, {x}, o)[0][0];
    REQUIRE(J.shape() == Shape{15, 20, 15, 20});
    const std::vector<double> jv = J.to_vector<double>();
    bool ok = true;
    for (size_t a = 0; a < 300; ++a)
      for (size_t b = 0; b < 300; ++b) ok = ok && jv[a * 300 + b] == (a == b ? 3 * xv[a] * xv[a] : 0.0);
    CHECK(ok);
    // sum(x^4 / 12) has Hessian diag(x^2): 150 rows over two chunks.
    const Tensor y = x.reshape(Shape{300}).slice(0, 0, 150).contiguous();
    const Tensor H = hessian([](const TensorList& a) { return sum(square(square(a[0]))) / 12.0; }, {y}, o)[0][0];
    const std::vector<double> hv = H.to_vector<double>(), yv = y.to_vector<double>();
    ok = true;
    for (size_t a = 0; a < 150; ++a)
      for (size_t b = 0; b < 150; ++b) ok = ok && std::fabs(hv[a * 150 + b] - (a == b ? yv[a] * yv[a] : 0.0)) <= 1e-14;
    CHECK(ok);
  }
}

TEST_CASE("jvp under jit and vmap: a forward-mode Jacobian by vmap over tangents equals jacobian()",
          "[autodiff][functional][jit][vmap]") {
  const Tensor x = random_normal(RngKey::from_seed(5), Shape{3, 4}, DType::f64);
  const Tensor w = random_normal(RngKey::from_seed(6), Shape{4, 2}, DType::f64);
  const VectorFn f = [](const TensorList& a) { return TensorList{log_softmax(tanh(matmul(a[0], a[1])), -1)}; };
  // jax.jacfwd: the jvp of every basis tangent of x, batched by vmap; w's tangent is zero.
  const VectorFn push = [&](const TensorList& t) { return jvp(f, {x, w}, {t[0], zeros_like(w)}).second; };
  std::vector<double> e(144, 0.0);
  for (size_t k = 0; k < 12; ++k) e[k * 13] = 1.0;
  const Tensor basis = from_vector(e, Shape{12, 3, 4});
  const Tensor cols = jit::vmap(push, {0}, {-1})({basis})[0];  // [3, 2, 12]
  const Tensor J = jacobian(f, {x, w})[0][0];                  // [3, 2, 3, 4]
  CHECK(close(cols, J.reshape(Shape{3, 2, 12}), 1e-12));
  // jit of a jvp: the trace, then a replay on fresh primals, against eager.
  auto compiled = jit::jit([&](const TensorList& a) { return jvp(f, {a[0], a[1]}, {a[2], a[3]}).second; });
  for (int call = 0; call < 3; ++call) {
    const TensorList in{random_normal(RngKey::from_seed(10 + call), x.shape(), DType::f64),
                        random_normal(RngKey::from_seed(20 + call), w.shape(), DType::f64),
                        random_normal(RngKey::from_seed(30 + call), x.shape(), DType::f64),
                        random_normal(RngKey::from_seed(40 + call), w.shape(), DType::f64)};
    INFO("call " << call);
    CHECK(close(compiled(in)[0], jvp(f, {in[0], in[1]}, {in[2], in[3]}).second[0], 1e-12));
  }
  CHECK(compiled.stats().hits >= 2);
}

TEST_CASE("jvp and hvp through a CNN block (conv2d, relu, max_pool2d, checkpoint) against finite differences",
          "[autodiff][functional]") {
  // Distinct pixel values and a positive bias keep every pooling window's maximum and every ReLU input
  // away from ties and kinks within the finite-difference step.
  std::vector<double> px(2 * 1 * 6 * 6);
  for (size_t i = 0; i < px.size(); ++i) px[i] = 0.05 * double((i * 37) % px.size());
  const Tensor x = from_vector(px, Shape{2, 1, 6, 6});
  const Tensor w = random_normal(RngKey::from_seed(7), Shape{3, 1, 3, 3}, DType::f64) * 0.3;
  const Tensor b = from_vector(std::vector<double>{2, 2.5, 3}, Shape{3});
  const ScalarFn loss = [](const TensorList& a) {
    auto block = [&](const Tensor& t) { return max_pool2d(relu(conv2d(t, a[1], a[2], {1, 1}, {1, 1})), {3, 3}, {2, 2}, {1, 1}); };
    return sum(square(checkpoint(block, a[0], {a[1], a[2]})));
  };
  const TensorList in{x, w, b}, v{random_normal(RngKey::from_seed(8), x.shape(), DType::f64) * 0.1,
                                  random_normal(RngKey::from_seed(9), w.shape(), DType::f64), Tensor()};
  // J v of the loss by finite differences along v.
  const double eps = 1e-6;
  auto along = [&](double t) {
    NoGradGuard ng;
    return loss({x + v[0] * t, w + v[1] * t, b}).item();
  };
  const Tensor jv = jvp([&](const TensorList& a) { return TensorList{loss(a)}; }, in, v).second[0];
  CHECK(jv.item() == Approx((along(eps) - along(-eps)) / (2 * eps)).epsilon(1e-6));
  // H v by finite differences of the gradient along v.
  auto gradient_along = [&](double t) {
    TensorList leaves{(x + v[0] * t).detach().set_requires_grad(), (w + v[1] * t).detach().set_requires_grad(),
                      b.detach().set_requires_grad()};
    return grad(loss(leaves), leaves);
  };
  const TensorList hv = hvp(loss, in, v).second, plus = gradient_along(eps), minus = gradient_along(-eps);
  for (size_t j = 0; j < 3; ++j) {
    INFO("input " << j);
    check_near(hv[j].contiguous().to_vector<double>(), ((plus[j] - minus[j]) / (2 * eps)).contiguous().to_vector<double>(), "hvp");
  }
}
