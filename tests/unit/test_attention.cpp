// scaled_dot_product_attention (kernels/cpu/attention.h, FlashAttention-2 tiling with an online softmax)
// against the attention written out with matmul and softmax (the T x T scores materialised) in f64, on
// shapes that span several 64-row tiles; f32 against that f64 reference; its errors; and the GPT built
// on it against the same GPT with the written-out attention; second and third derivatives (the backward
// ops' vjps). Finite-difference checks of its vjp are in the op table (tests/op_cases_nn.cpp).
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

#include <titanax/titanax.h>

#include "jit_test_util.h"
#include "op_cases.h"

using namespace titanax;
using testing::randn64;

namespace {

// softmax(scale * q k^T + mask) v with the scores in memory; the mask of PyTorch's is_causal.
Tensor reference(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale) {
  const int64_t Tq = q.shape()[q.dim() - 2], Tk = k.shape()[k.dim() - 2];
  Tensor s = matmul(q, k.transpose(-2, -1)) * scale;
  if (causal) {
    std::vector<double> m(size_t(Tq * Tk), 0.0);
    for (int64_t i = 0; i < Tq; ++i)
      for (int64_t j = i + 1; j < Tk; ++j) m[size_t(i * Tk + j)] = -std::numeric_limits<double>::infinity();
    s = s + from_vector(m, Shape{Tq, Tk}).astype(q.dtype());
  }
  return matmul(softmax(s, -1), v);
}

double worst_abs(const Tensor& a, const Tensor& b) {
  const auto x = a.astype(DType::f64).to_vector<double>(), y = b.astype(DType::f64).to_vector<double>();
  REQUIRE(x.size() == y.size());
  double w = 0;
  for (size_t i = 0; i < x.size(); ++i) w = std::max(w, std::fabs(x[i] - y[i]));
  return w;
}

struct Grads {
  Tensor o, dq, dk, dv;
};
// Output and the gradients of sum(o * ct) for q, k, v.
template <class F>
Grads run(F&& f, const Tensor& q0, const Tensor& k0, const Tensor& v0, const Tensor& ct) {
  Tensor q = q0.detach(), k = k0.detach(), v = v0.detach();
  for (Tensor* t : {&q, &k, &v}) t->set_requires_grad();
  Tensor o = f(q, k, v);
  TensorList g = grad(sum(o * ct), {q, k, v});
  return {o.detach(), g[0], g[1], g[2]};
}

}  // namespace

TEST_CASE("attention: tiled online softmax equals the written-out attention (f64, forward and gradients)", "[ops][attention]") {
  const RngKey key = RngKey::from_seed(11);
  struct Case {
    Shape q, kv;
    bool causal;
  };
  // Several tiles in both directions, ragged last tiles, Tq < Tk, Tq > Tk, D = 1.
  for (const Case& c : {Case{{2, 3, 150, 16}, {2, 3, 150, 16}, true}, Case{{2, 3, 150, 16}, {2, 3, 150, 16}, false},
                        Case{{4, 65, 8}, {4, 200, 8}, true}, Case{{4, 200, 8}, {4, 65, 8}, true},
                        Case{{3, 129, 1}, {3, 129, 1}, false}}) {
    INFO("q " << c.q.str() << " kv " << c.kv.str() << " causal " << c.causal);
    const Tensor q = randn64(fold_in(key, 1), c.q, 1.5), k = randn64(fold_in(key, 2), c.kv, 1.5),
                 v = randn64(fold_in(key, 3), c.kv), ct = randn64(fold_in(key, 4), c.q);
    const double scale = 0.7;
    Grads got = run([&](auto& a, auto& b, auto& d) { return scaled_dot_product_attention(a, b, d, c.causal, scale); }, q,
                    k, v, ct);
    Grads want = run([&](auto& a, auto& b, auto& d) { return reference(a, b, d, c.causal, scale); }, q, k, v, ct);
    CHECK(got.o.shape() == c.q);
    CHECK(worst_abs(got.o, want.o) < 1e-12);
    CHECK(worst_abs(got.dq, want.dq) < 1e-11);
    CHECK(worst_abs(got.dk, want.dk) < 1e-11);
    CHECK(worst_abs(got.dv, want.dv) < 1e-11);
  }
}

TEST_CASE("attention: f32 within 1e-5 of f64; the default scale is 1 / sqrt(D)", "[ops][attention]") {
  const RngKey key = RngKey::from_seed(12);
  const Shape s{2, 4, 190, 32};
  const Tensor q = randn64(fold_in(key, 1), s), k = randn64(fold_in(key, 2), s), v = randn64(fold_in(key, 3), s),
               ct = randn64(fold_in(key, 4), s);
  auto f = [](auto& a, auto& b, auto& d) { return scaled_dot_product_attention(a, b, d, true); };
  Grads g32 = run(f, q.astype(DType::f32), k.astype(DType::f32), v.astype(DType::f32), ct.astype(DType::f32));
  Grads g64 = run([](auto& a, auto& b, auto& d) { return reference(a, b, d, true, 1.0 / std::sqrt(32.0)); }, q, k, v, ct);
  CHECK(g32.o.dtype() == DType::f32);
  CHECK(worst_abs(g32.o, g64.o) < 1e-5);
  CHECK(worst_abs(g32.dq, g64.dq) < 1e-4);
  CHECK(worst_abs(g32.dk, g64.dk) < 1e-4);
  CHECK(worst_abs(g32.dv, g64.dv) < 1e-4);
}

TEST_CASE("attention: bf16 inputs compute in f32 and round; autocast lowers f32 inputs", "[ops][attention][mixed]") {
  const RngKey key = RngKey::from_seed(13);
  const Shape s{2, 70, 16};
  const Tensor q = randn64(fold_in(key, 1), s).astype(DType::bf16), k = randn64(fold_in(key, 2), s).astype(DType::bf16),
               v = randn64(fold_in(key, 3), s).astype(DType::bf16);
  const Tensor o = scaled_dot_product_attention(q, k, v, true);
  CHECK(o.dtype() == DType::bf16);
  const Tensor want = reference(q.astype(DType::f64), k.astype(DType::f64), v.astype(DType::f64), true, 0.25);
  CHECK(worst_abs(o, want) < 1e-2);  // |o| <= max |v| ~ 4: half a bf16 ulp there is 2^-6
  AutocastGuard ac(DType::bf16);
  CHECK(scaled_dot_product_attention(q.astype(DType::f32), k.astype(DType::f32), v.astype(DType::f32)).dtype() ==
        DType::bf16);
}

TEST_CASE("attention: q, k, v as views of one qkv projection are copied once, before the op", "[ops][attention]") {
  // [B, T, 3, H, D] permuted to [3, B, H, T, D] and sliced, as a GPT block cuts them: the op and its
  // backward must read contiguous copies made once on the tape (the kernels read [N, T, D]), and the
  // gradient must flow back into the projection.
  const RngKey key = RngKey::from_seed(14);
  const Tensor qkv0 = randn64(fold_in(key, 1), Shape{2, 40, 3, 2, 8}), ct = randn64(fold_in(key, 2), Shape{1, 2, 2, 40, 8});
  auto cut = [](const Tensor& qkv, int i) { return qkv.permute({2, 0, 3, 1, 4}).slice(0, i, i + 1); };
  auto step = [&](const TensorList& in) {
    Tensor qkv = in[0].detach();
    qkv.set_requires_grad();
    const Tensor o = scaled_dot_product_attention(cut(qkv, 0), cut(qkv, 1), cut(qkv, 2), true);
    return TensorList{o.detach(), grad(sum(o * in[1]), {qkv})[0]};
  };
  const TensorList got = step({qkv0, ct});
  Tensor qkv = qkv0.detach();
  qkv.set_requires_grad();
  const Tensor o = reference(cut(qkv, 0), cut(qkv, 1), cut(qkv, 2), true, 1.0 / std::sqrt(8.0));
  CHECK(worst_abs(got[0], o) < 1e-12);
  CHECK(worst_abs(got[1], grad(sum(o * ct), {qkv})[0]) < 1e-11);

  const jit::Graph g = jit::trace(step, {qkv0, ct});
  const std::vector<int> producer = testing::producers(g);
  int checked = 0;
  for (const auto& n : g.nodes) {
    const std::string name = n.op->name();
    if (name != "scaled_dot_product_attention" && name != "scaled_dot_product_attention_backward") continue;
    for (int k = 0; k < 3; ++k) {
      INFO(name << " input " << k);
      const int p = producer[size_t(n.inputs[size_t(k)])];
      REQUIRE(p >= 0);
      CHECK(std::string(g.nodes[size_t(p)].op->name()) == "copy");
      ++checked;
    }
  }
  CHECK(checked == 6);
}

TEST_CASE("attention on a packed qkv equals attention on its q, k, v parts, bitwise, and its gradient is packed alike", "[ops][attention]") {
  const RngKey key = RngKey::from_seed(77);
  for (const Shape& shape : {Shape{2, 9, 3, 2, 4}, Shape{7, 3, 3, 5}, Shape{2, 1, 70, 3, 2, 8}}) {
    for (bool causal : {true, false}) {
      INFO("qkv " << shape.str() << " causal " << causal);
      const int r = shape.rank();
      Tensor qkv = randn64(fold_in(key, r), shape).detach();
      qkv.set_requires_grad();
      Shape o_shape = shape;
      o_shape.erase(r - 3);
      const Tensor ct = randn64(fold_in(key, 100 + r), o_shape);
      // The reference: the parts as [..., H, T, D] (axis T moved after H), the unpacked op, o moved back.
      std::vector<int> to_heads;  // [..., T, H, D] -> [..., H, T, D]
      for (int i = 0; i < r - 4; ++i) to_heads.push_back(i);
      to_heads.insert(to_heads.end(), {r - 3, r - 4, r - 2});
      const TensorList parts = unbind(qkv, r - 3);
      const Tensor want = scaled_dot_product_attention(parts[0].permute(to_heads), parts[1].permute(to_heads),
                                                       parts[2].permute(to_heads), causal)
                              .permute(to_heads);  // the swap is its own inverse
      const Tensor got = scaled_dot_product_attention_qkvpacked(qkv, causal);
      REQUIRE(got.shape() == o_shape);
      CHECK(got.to_vector<double>() == want.contiguous().to_vector<double>());
      const Tensor g_want = grad(sum(want * ct), {qkv})[0], g_got = grad(sum(got * ct), {qkv})[0];
      REQUIRE(g_got.shape() == shape);
      CHECK(g_got.to_vector<double>() == g_want.contiguous().to_vector<double>());
    }
  }
  // Traced with its gradient: the op pair and nothing that copies around them (the unpacked op on the
  // parts needs a concat of dq, dk, dv and a copy of the permuted o).
  const Tensor x0 = randn64(fold_in(key, 8), Shape{2, 6, 3, 2, 8});
  const jit::Graph g = jit::trace(
      [](const TensorList& in) {
        Tensor qkv = in[0].detach();
        qkv.set_requires_grad();
        const Tensor o = scaled_dot_product_attention_qkvpacked(qkv, true).reshape(Shape{2, 6, 16});
        return TensorList{grad(sum(o * o), {qkv})[0]};
      },
      {x0});
  CHECK(testing::count_op(g, "scaled_dot_product_attention_qkvpacked") == 1);
  CHECK(testing::count_op(g, "scaled_dot_product_attention_qkvpacked_backward") == 1);
  CHECK(testing::count_op(g, "copy") == 0);
  CHECK(testing::count_op(g, "concat") == 0);
  // bf16: computed in f32 and rounded, as the unpacked op.
  const Tensor x = randn64(fold_in(key, 9), Shape{2, 6, 3, 2, 8}).astype(DType::f32);
  const Tensor lo = scaled_dot_product_attention_qkvpacked(x.astype(DType::bf16), true);
  CHECK(lo.dtype() == DType::bf16);
  CHECK(worst_abs(lo, scaled_dot_product_attention_qkvpacked(x.astype(DType::bf16).astype(DType::f32), true)) <= 1e-2);
  // Errors: the axis of size 3, the rank, the dtype, the scale.
  CHECK_THROWS_AS(scaled_dot_product_attention_qkvpacked(randn64(key, Shape{2, 5, 4, 2, 4})), ShapeError);
  CHECK_THROWS_AS(scaled_dot_product_attention_qkvpacked(randn64(key, Shape{5, 3, 4})), ShapeError);
  CHECK_THROWS_AS(scaled_dot_product_attention_qkvpacked(randn64(key, Shape{0, 3, 2, 4})), ShapeError);  // T = 0
  CHECK_THROWS_AS(scaled_dot_product_attention_qkvpacked(zeros(Shape{2, 5, 3, 2, 4}, DType::i64)), DTypeError);
  CHECK_THROWS_AS(scaled_dot_product_attention_qkvpacked(randn64(key, Shape{2, 5, 3, 2, 4}), false, INFINITY), ValueError);
}

TEST_CASE("attention: mismatched shapes, no keys, mixed dtypes and a bad scale are errors", "[ops][attention]") {
  const Tensor q = zeros(Shape{2, 5, 4}), k = zeros(Shape{2, 6, 4});
  CHECK_THROWS_AS(scaled_dot_product_attention(q, k, zeros(Shape{2, 5, 4})), ShapeError);  // v rows != k rows
  CHECK_THROWS_AS(scaled_dot_product_attention(q, zeros(Shape{2, 6, 3}), zeros(Shape{2, 6, 3})), ShapeError);
  CHECK_THROWS_AS(scaled_dot_product_attention(q, zeros(Shape{3, 6, 4}), zeros(Shape{3, 6, 4})), ShapeError);
  CHECK_THROWS_AS(scaled_dot_product_attention(q, zeros(Shape{2, 0, 4}), zeros(Shape{2, 0, 4})), ShapeError);
  CHECK_THROWS_AS(scaled_dot_product_attention(zeros(Shape{4}), zeros(Shape{4}), zeros(Shape{4})), ShapeError);
  CHECK_THROWS_AS(scaled_dot_product_attention(q, k.astype(DType::f64), k), DTypeError);
  CHECK_THROWS_AS(scaled_dot_product_attention(q.astype(DType::i64), k.astype(DType::i64), k.astype(DType::i64)), DTypeError);
  CHECK_THROWS_AS(scaled_dot_product_attention(q, k, k, false, std::numeric_limits<double>::infinity()), ValueError);
  // No queries: an empty output, and zero gradients for k and v.
  Grads g = run([](auto& a, auto& b, auto& d) { return scaled_dot_product_attention(a, b, d, true); }, zeros(Shape{2, 0, 4}),
                ones(Shape{2, 6, 4}), ones(Shape{2, 6, 4}), zeros(Shape{2, 0, 4}));
  CHECK(g.o.numel() == 0);
  CHECK(g.dk.astype(DType::f64).to_vector<double>() == std::vector<double>(48, 0.0));
  CHECK(g.dv.astype(DType::f64).to_vector<double>() == std::vector<double>(48, 0.0));
}

TEST_CASE("attention's second and third derivatives equal the written-out attention's and finite differences",
          "[ops][attention][autodiff]") {
  // The fused backward ops' vjps recompose attention from matmul and softmax: Hessian-vector products
  // against the written-out attention's (the same math, other op order: 1e-10), gradcheck of the
  // gradient's projection (second order) and of the recorded Hessian-vector product (third order).
  const RngKey key = RngKey::from_seed(202);
  struct Case {
    Shape q, kv;
    bool causal;
  };
  for (const Case& c : {Case{{2, 5, 4}, {2, 7, 4}, true}, Case{{2, 7, 4}, {2, 5, 4}, true}, Case{{1, 2, 6, 3}, {1, 2, 6, 3}, false}}) {
    INFO("q " << c.q.str() << " kv " << c.kv.str() << " causal " << c.causal);
    const TensorList in{randn64(fold_in(key, 1), c.q), randn64(fold_in(key, 2), c.kv), randn64(fold_in(key, 3), c.kv)};
    const TensorList v{randn64(fold_in(key, 4), c.q), randn64(fold_in(key, 5), c.kv), randn64(fold_in(key, 6), c.kv)};
    const Tensor w = randn64(fold_in(key, 7), c.q);
    auto loss = [&](bool fused) {
      return [&, fused](const TensorList& a) {
        const Tensor o = fused ? scaled_dot_product_attention(a[0], a[1], a[2], c.causal, 0.6)
                               : reference(a[0], a[1], a[2], c.causal, 0.6);
        return sum(square(o * w));
      };
    };
    const TensorList hv = hvp(loss(true), in, v).second, want = hvp(loss(false), in, v).second;
    for (size_t i = 0; i < 3; ++i) CHECK(worst_abs(hv[i], want[i]) < 1e-10);
    // Second order: <d loss / d in, v> differentiated by gradcheck.
    const GradcheckResult r2 = gradcheck(
        [&](const TensorList& a) {
          GradModeGuard on(true);
          TensorList x = a;
          const bool outer = a[0].requires_grad();
          if (!outer)
            for (auto& t : x) t = t.detach().set_requires_grad();
          BackwardOptions o;
          o.create_graph = outer;
          const TensorList g = grad(loss(true)(x), x, o);
          return sum(g[0] * v[0]) + sum(g[1] * v[1]) + sum(g[2] * v[2]);
        },
        in);
    INFO(r2.report);
    CHECK(r2.ok);
  }
  // Third order on the smallest case: the recorded Hessian-vector product, differentiated.
  const TensorList in{randn64(fold_in(key, 8), Shape{1, 3, 2}), randn64(fold_in(key, 9), Shape{1, 3, 2}),
                      randn64(fold_in(key, 10), Shape{1, 3, 2})};
  FunctionalOptions cg;
  cg.create_graph = true;
  const GradcheckResult r3 = gradcheck(
      [&](const TensorList& a) {
        const TensorList hv =
            hvp([](const TensorList& x) { return sum(square(scaled_dot_product_attention(x[0], x[1], x[2], true))); }, a, in, cg)
                .second;
        return concat({hv[0].reshape(Shape{-1}), hv[1].reshape(Shape{-1}), hv[2].reshape(Shape{-1})}, 0);
      },
      in);
  INFO(r3.report);
  CHECK(r3.ok);
}

TEST_CASE("attention's second derivatives in bf16: recomputed in f32, within bf16 rounding of f64", "[ops][attention][autodiff][mixed]") {
  const RngKey key = RngKey::from_seed(404);
  const TensorList in{randn64(fold_in(key, 1), Shape{2, 6, 8}), randn64(fold_in(key, 2), Shape{2, 6, 8}),
                      randn64(fold_in(key, 3), Shape{2, 6, 8})};
  const TensorList v{randn64(fold_in(key, 4), Shape{2, 6, 8}), randn64(fold_in(key, 5), Shape{2, 6, 8}),
                     randn64(fold_in(key, 6), Shape{2, 6, 8})};
  auto loss = [](const TensorList& a) { return sum(square(scaled_dot_product_attention(a[0], a[1], a[2], true)).astype(DType::f32)); };
  auto bf16 = [](const TensorList& ts) {
    TensorList out;
    for (const auto& t : ts) out.push_back(t.astype(DType::bf16));
    return out;
  };
  // The f64 reference on the bf16-rounded inputs, so only the computation's rounding differs.
  TensorList rounded;
  for (const auto& t : bf16(in)) rounded.push_back(t.astype(DType::f64));
  TensorList vr;
  for (const auto& t : bf16(v)) vr.push_back(t.astype(DType::f64));
  const TensorList got = hvp(loss, bf16(in), bf16(v)).second, want = hvp(loss, rounded, vr).second;
  for (size_t i = 0; i < 3; ++i) {
    INFO("input " << i);
    CHECK(got[i].dtype() == DType::bf16);
    double scale = 0;
    for (double x : want[i].to_vector<double>()) scale = std::max(scale, std::fabs(x));
    CHECK(worst_abs(got[i], want[i]) <= 1e-2 * scale);  // a few bf16 roundings (2^-8 each) of O(scale) values
  }
}

TEST_CASE("packed attention's second derivatives equal the unpacked attention's", "[ops][attention][autodiff]") {
  const RngKey key = RngKey::from_seed(303);
  const Shape shape{2, 6, 3, 2, 4};  // [B, T, 3, H, D]
  const Tensor qkv = randn64(fold_in(key, 1), shape), v = randn64(fold_in(key, 2), shape);
  const Tensor w = randn64(fold_in(key, 3), Shape{2, 6, 2, 4});
  for (bool causal : {true, false}) {
    INFO("causal " << causal);
    auto packed = [&](const TensorList& a) { return sum(square(scaled_dot_product_attention_qkvpacked(a[0], causal) * w)); };
    auto unpacked = [&](const TensorList& a) {
      const TensorList parts = unbind(a[0], 2);  // [B, T, H, D] each
      auto heads = [](const Tensor& t) { return transpose(t, 1, 2); };
      const Tensor o = scaled_dot_product_attention(heads(parts[0]), heads(parts[1]), heads(parts[2]), causal);
      return sum(square(heads(o) * w));
    };
    const Tensor got = hvp(packed, {qkv}, {v}).second[0], want = hvp(unpacked, {qkv}, {v}).second[0];
    CHECK(got.shape() == shape);
    CHECK(worst_abs(got, want) < 1e-11);
  }
}
