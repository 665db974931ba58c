#include "op_cases.h"

#include <cmath>

namespace titanax::testing {

Tensor randn64(RngKey key, const Shape& shape, double scale, double margin) {
  Tensor t = random_normal(key, shape, DType::f64);
  std::vector<double> v = t.to_vector<double>();
  for (auto& x : v) {
    x *= scale;
    if (margin > 0 && std::fabs(x) < margin) x = x < 0 ? x - margin : x + margin;
  }
  return from_vector(v, shape);
}

Tensor uniform64(RngKey key, const Shape& shape, double lo, double hi) {
  std::vector<double> v = random_uniform(key, shape, DType::f64).to_vector<double>();
  for (auto& x : v) x = lo + (hi - lo) * x;
  return from_vector(v, shape);
}

Tensor randint(RngKey key, const Shape& shape, int64_t n) {
  std::vector<double> u = random_uniform(key, shape, DType::f64).to_vector<double>();
  std::vector<int64_t> v(u.size());
  for (size_t i = 0; i < u.size(); ++i) v[i] = std::min<int64_t>(n - 1, int64_t(u[i] * double(n)));
  return from_vector(v, shape);
}

namespace {

RngKey k(RngKey key, int i) { return fold_in(key, uint64_t(i)); }

using Fn1 = Tensor (*)(const Tensor&);
using Fn2 = Tensor (*)(const Tensor&, const Tensor&);

OpCase unary_case(std::string name, Fn1 f, double lo = -2, double hi = 2, double margin = 0.05) {
  return {name, [=](RngKey key) {
            Tensor x = uniform64(k(key, 0), Shape{3, 4}, lo, hi);
            if (margin > 0) {  // keep clear of kinks (relu, abs at 0)
              std::vector<double> v = x.to_vector<double>();
              for (auto& e : v)
                if (std::fabs(e) < margin) e += e < 0 ? -margin : margin;
              x = from_vector(v, x.shape());
            }
            return TensorList{x};
          },
          [f](const TensorList& in) { return f(in[0]); }};
}

// Binary ops on broadcasting shapes: [2, 3, 4] with [3, 1], and [4] with [2, 1, 4].
void add_binary(std::vector<OpCase>& cs, const std::string& name, Fn2 f, double lo = -2, double hi = 2) {
  cs.push_back({name + "/broadcast_right", [=](RngKey key) {
                  return TensorList{uniform64(k(key, 0), Shape{2, 3, 4}, lo, hi), uniform64(k(key, 1), Shape{3, 1}, lo, hi)};
                },
                [f](const TensorList& in) { return f(in[0], in[1]); }});
  cs.push_back({name + "/broadcast_left", [=](RngKey key) {
                  return TensorList{uniform64(k(key, 0), Shape{4}, lo, hi), uniform64(k(key, 1), Shape{2, 1, 4}, lo, hi)};
                },
                [f](const TensorList& in) { return f(in[0], in[1]); }});
}

std::vector<OpCase> build() {
  std::vector<OpCase> cs;
  add_binary(cs, "add", add);
  add_binary(cs, "sub", sub);
  add_binary(cs, "mul", mul);
  add_binary(cs, "div", div, 0.5, 2.0);
  add_binary(cs, "maximum", maximum);
  add_binary(cs, "minimum", minimum);
  add_binary(cs, "pow", pow, 0.5, 2.0);
  cs.push_back(unary_case("neg", neg));
  cs.push_back(unary_case("exp", exp));
  cs.push_back(unary_case("log", log, 0.2, 3.0, 0));
  cs.push_back(unary_case("sqrt", sqrt, 0.2, 3.0, 0));
  cs.push_back(unary_case("rsqrt", rsqrt, 0.2, 3.0, 0));
  cs.push_back(unary_case("tanh", tanh));
  cs.push_back(unary_case("sigmoid", sigmoid));
  cs.push_back(unary_case("abs", abs));
  cs.push_back(unary_case("square", square));
  cs.push_back(unary_case("reciprocal", reciprocal, 0.3, 2.0, 0));
  cs.push_back(unary_case("relu", relu));
  cs.push_back(unary_case("gelu_tanh", [](const Tensor& x) { return gelu(x, true); }));
  cs.push_back(unary_case("gelu_erf", [](const Tensor& x) { return gelu(x, false); }));
  cs.push_back(unary_case("clamp", [](const Tensor& x) { return clamp(x, -1.0, 1.0); }));
  cs.push_back({"where", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{3, 4}), randn64(k(key, 1), Shape{3, 4}), randn64(k(key, 2), Shape{4})};
                },
                [](const TensorList& in) { return where(gt(in[0], scalar_like(0.0, in[0])), in[1], in[2]); }});
  cs.push_back({"relu_backward", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{3, 4}), randn64(k(key, 1), Shape{3, 4}, 1, 0.05)}; },
                [](const TensorList& in) { return relu_backward(in[0], in[1].detach()); }});

  // Reductions over every axis set of a rank-3 tensor, with and without keepdims.
  std::vector<std::vector<int>> axis_sets = {{}, {0}, {1}, {2}, {-1}, {0, 1}, {0, 2}, {1, 2}, {0, 1, 2}};
  for (const auto& axes : axis_sets) {
    std::string tag = "[";
    for (int a : axes) tag += std::to_string(a) + ",";
    tag += "]";
    for (bool keep : {false, true}) {
      std::string kd = keep ? "/keepdims" : "";
      auto in3 = [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{2, 3, 4})}; };
      cs.push_back({"sum" + tag + kd, in3, [axes, keep](const TensorList& in) { return sum(in[0], axes, keep); }});
      cs.push_back({"mean" + tag + kd, in3, [axes, keep](const TensorList& in) { return mean(in[0], axes, keep); }});
      cs.push_back({"max" + tag + kd, in3, [axes, keep](const TensorList& in) { return max(in[0], axes, keep); }});
      cs.push_back({"min" + tag + kd, in3, [axes, keep](const TensorList& in) { return min(in[0], axes, keep); }});
      if (!axes.empty())
        cs.push_back({"logsumexp" + tag + kd, in3, [axes, keep](const TensorList& in) { return logsumexp(in[0], axes, keep); }});
    }
  }
  // A reduction over a strided (transposed) view.
  cs.push_back({"sum/transposed_view", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{3, 5})}; },
                [](const TensorList& in) { return sum(in[0].T(), {1}); }});

  // The sum of squares of several tensors (a gradient norm's), one of them a strided view (the CUDA
  // tests add tensors of several 16384-element chunks).
  cs.push_back({"sum_squares", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{3, 5}), randn64(k(key, 1), Shape{40}), randn64(k(key, 2), Shape{7})};
                },
                [](const TensorList& in) { return sum_squares({in[0].T(), in[1], in[2]}); }});

  // Shapes and views.
  cs.push_back({"reshape", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{2, 6})}; },
                [](const TensorList& in) { return mul(in[0].reshape(Shape{3, -1}), in[0].reshape(Shape{3, 4})); }});
  cs.push_back({"reshape/noncontiguous", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{3, 4})}; },
                [](const TensorList& in) { return in[0].T().reshape(Shape{2, 6}); }});
  cs.push_back({"permute", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{2, 3, 4})}; },
                [](const TensorList& in) { return square(in[0].permute({2, 0, 1})); }});
  cs.push_back({"expand", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{3, 1})}; },
                [](const TensorList& in) { return square(in[0].expand(Shape{2, 3, 4})); }});
  cs.push_back({"slice/step2", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{4, 7})}; },
                [](const TensorList& in) { return square(in[0].slice(1, 1, 6, 2)); }});
  cs.push_back({"unbind", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{4, 3, 5})}; },
                [](const TensorList& in) {  // slice 1 unused: its cotangent is zeros
                  const TensorList p = unbind(in[0].permute({1, 0, 2}), 0);
                  return p[0] * 2.0 + square(p[2]);
                }});
  cs.push_back({"slice/negative", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{4, 7})}; },
                [](const TensorList& in) { return in[0].slice(0, -3, 4); }});
  cs.push_back({"concat", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{2, 3}), randn64(k(key, 1), Shape{2, 2})}; },
                [](const TensorList& in) { return square(concat({in[0], in[1], in[0]}, 1)); }});
  cs.push_back({"pad", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{2, 3})}; },
                [](const TensorList& in) { return pad(in[0], 0, 1, 2); }});
  cs.push_back({"squeeze_unsqueeze", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{3, 1})}; },
                [](const TensorList& in) { return in[0].squeeze(1).unsqueeze(0); }});
  cs.push_back({"astype_roundtrip", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{5})}; },
                [](const TensorList& in) { return square(in[0].astype(DType::f32).astype(DType::f64)); }, false});

  // Linear algebra.
  cs.push_back({"matmul", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{3, 4}), randn64(k(key, 1), Shape{4, 5})}; },
                [](const TensorList& in) { return matmul(in[0], in[1]); }});
  cs.push_back({"matmul/batched_broadcast", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{2, 3, 4}), randn64(k(key, 1), Shape{4, 2})};
                },
                [](const TensorList& in) { return matmul(in[0], in[1]); }});
  cs.push_back({"matmul/transposed_operands", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{4, 3}), randn64(k(key, 1), Shape{5, 4})};
                },
                [](const TensorList& in) { return matmul(in[0].T(), in[1].T()); }});
  cs.push_back({"matmul/vector", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{4}), randn64(k(key, 1), Shape{4, 3})}; },
                [](const TensorList& in) { return matmul(in[0], in[1]); }});
  cs.push_back({"linear", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{2, 3, 4}), randn64(k(key, 1), Shape{5, 4}), randn64(k(key, 2), Shape{5})};
                },
                [](const TensorList& in) { return linear(in[0], in[1], in[2]); }});
  cs.push_back({"linear/no_bias", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{3, 4}), randn64(k(key, 1), Shape{2, 4})}; },
                [](const TensorList& in) { return linear(in[0], in[1]); }});
  return cs;
}

}  // namespace

std::vector<OpCase> extra_op_cases();  // tests/op_cases_nn.cpp: neural-network ops

const std::vector<OpCase>& op_cases() {
  static const std::vector<OpCase> all = [] {
    std::vector<OpCase> cs = build();
    for (auto& c : extra_op_cases()) cs.push_back(std::move(c));
    return cs;
  }();
  return all;
}

}  // namespace titanax::testing
