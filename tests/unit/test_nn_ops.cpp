// Neural-network ops: forward (and, for the oneDNN paths, backward) values against naive reference loops
// written here in double precision, on fresh random inputs, for f64 and f32; dropout's mask contract;
// the errors each op promises; second derivatives where the ops provide them.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>

#include "kernels/cpu/random.h"
#include "op_cases.h"

using namespace titanax;
using testing::randn64;

namespace {

std::vector<double> vals(const Tensor& t) { return t.to_vector<double>(); }

// |got - want| <= tol * max(1, |want|) elementwise: relative, with an absolute floor for values near 0.
void check_close(const std::vector<double>& got, const std::vector<double>& want, double tol, const char* what = "") {
  REQUIRE(got.size() == want.size());
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::fabs(got[i] - want[i]) <= tol * std::max(1.0, std::fabs(want[i]))) continue;
    if (bad++ < 3) {
      INFO(what << " element " << i << ": got " << got[i] << " want " << want[i]);
      CHECK(false);
    }
  }
  CHECK(bad == 0);
}

double tol_for(DType dt) { return dt == DType::f32 ? 1e-5 : 1e-12; }

// A random tensor of `dt` and its values (as the op sees them) in double.
Tensor rand_as(RngKey key, const Shape& s, DType dt, double scale = 1.0) { return randn64(key, s, scale).astype(dt); }

// Distinct values (gaps >= 0.08) so max-pool windows have a unique maximum.
Tensor distinct(RngKey key, const Shape& s, DType dt) {
  std::vector<double> u = random_uniform(key, s, DType::f64).to_vector<double>();
  const int64_t n = int64_t(u.size());
  std::vector<double> v(u.size());
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = 0.1 * double((i * 7919) % n) - 0.05 * double(n) + 0.01 * u[size_t(i)];
  return from_vector(v, s).astype(dt);
}

// Reference softmax along `axis` of a row-major tensor of shape s.
std::vector<double> ref_softmax(const std::vector<double>& x, const Shape& s, int axis, bool log) {
  int64_t A = 1, n = s[axis], B = 1;
  for (int i = 0; i < axis; ++i) A *= s[i];
  for (int i = axis + 1; i < s.rank(); ++i) B *= s[i];
  std::vector<double> y(x.size());
  for (int64_t a = 0; a < A; ++a)
    for (int64_t b = 0; b < B; ++b) {
      auto at = [&](int64_t i) { return size_t((a * n + i) * B + b); };
      double m = -INFINITY;
      for (int64_t i = 0; i < n; ++i) m = std::max(m, x[at(i)]);
      double z = 0;
      for (int64_t i = 0; i < n; ++i) z += std::exp(x[at(i)] - m);
      for (int64_t i = 0; i < n; ++i) y[at(i)] = log ? x[at(i)] - m - std::log(z) : std::exp(x[at(i)] - m) / z;
    }
  return y;
}

}  // namespace

// ====================================================================================== softmax

TEST_CASE("softmax and log_softmax match a naive reference on every axis", "[ops][nn][softmax]") {
  RngKey key = RngKey::from_seed(101);
  Shape s{3, 4, 5};
  for (DType dt : {DType::f64, DType::f32})
    for (int axis : {0, 1, 2, -1})
      for (bool log : {false, true}) {
        INFO(dtype_name(dt) << " axis " << axis << (log ? " log_softmax" : " softmax"));
        Tensor x = rand_as(fold_in(key, uint64_t(axis + 7)), s, dt, 3.0);
        Tensor y = log ? log_softmax(x, axis) : softmax(x, axis);
        CHECK(y.dtype() == dt);
        CHECK(y.shape() == s);
        check_close(vals(y), ref_softmax(vals(x), s, axis < 0 ? axis + 3 : axis, log), tol_for(dt));
      }
}

TEST_CASE("softmax is stable for large logits and handles big rows on many threads", "[ops][nn][softmax]") {
  Tensor x = from_vector(std::vector<double>{1000, 1001, 1002, -1000, 0, 1000}, Shape{2, 3});
  std::vector<double> want = ref_softmax(vals(x), x.shape(), 1, false);
  check_close(vals(softmax(x)), want, 1e-12);
  check_close(vals(softmax(x.astype(DType::f32))), want, 1e-6);
  check_close(vals(log_softmax(x)), ref_softmax(vals(x), x.shape(), 1, true), 1e-12);
  // Large enough to split across threads (rows and columns paths).
  Tensor big = rand_as(RngKey::from_seed(5), Shape{512, 300}, DType::f32, 4.0);
  check_close(vals(softmax(big, 1)), ref_softmax(vals(big), big.shape(), 1, false), 1e-5);
  check_close(vals(log_softmax(big, 0)), ref_softmax(vals(big), big.shape(), 0, true), 1e-5);
}

// ====================================================================================== cross-entropy

TEST_CASE("cross_entropy matches -log_softmax[label] with mean, sum, none and ignored labels", "[ops][nn][cross_entropy]") {
  RngKey key = RngKey::from_seed(202);
  const int64_t R = 9, C = 7;
  std::vector<int64_t> lab = testing::randint(fold_in(key, 1), Shape{R}, C).to_vector<int64_t>();
  lab[2] = -100;
  lab[6] = -100;
  Tensor labels = from_vector(lab, Shape{R});
  for (DType dt : {DType::f64, DType::f32}) {
    INFO(dtype_name(dt));
    Tensor logits = rand_as(fold_in(key, 2), Shape{R, C}, dt, 3.0);
    std::vector<double> x = vals(logits), per(R, 0.0);
    double total = 0;
    int count = 0;
    for (int64_t r = 0; r < R; ++r) {
      if (lab[size_t(r)] == -100) continue;
      double m = -INFINITY, z = 0;
      for (int64_t c = 0; c < C; ++c) m = std::max(m, x[size_t(r * C + c)]);
      for (int64_t c = 0; c < C; ++c) z += std::exp(x[size_t(r * C + c)] - m);
      per[size_t(r)] = m + std::log(z) - x[size_t(r * C + lab[size_t(r)])];
      total += per[size_t(r)];
      ++count;
    }
    Tensor none = cross_entropy(logits, labels, Reduction::none);
    CHECK(none.shape() == Shape{R});
    check_close(vals(none), per, tol_for(dt), "none");
    Tensor sm = cross_entropy(logits, labels, Reduction::sum);
    CHECK(sm.dim() == 0);
    check_close({sm.item()}, {total}, tol_for(dt), "sum");
    check_close({cross_entropy(logits, labels).item()}, {total / count}, tol_for(dt), "mean");
    // i32 labels and a [..., C] layout give the same numbers.
    Tensor l3 = logits.reshape(Shape{3, 3, C});
    check_close(vals(cross_entropy(l3, labels.astype(DType::i32).reshape(Shape{3, 3}), Reduction::none)), per, tol_for(dt),
                "rank-3");

    // The fused backward: (softmax - onehot) / count on kept rows, 0 on ignored rows.
    Tensor lg = logits.detach().clone().detach();
    lg.set_requires_grad(true);
    Tensor g = grad(cross_entropy(lg, labels), {lg})[0];
    std::vector<double> want(size_t(R * C), 0.0);
    for (int64_t r = 0; r < R; ++r) {
      if (lab[size_t(r)] == -100) continue;
      double m = -INFINITY, z = 0;
      for (int64_t c = 0; c < C; ++c) m = std::max(m, x[size_t(r * C + c)]);
      for (int64_t c = 0; c < C; ++c) z += std::exp(x[size_t(r * C + c)] - m);
      for (int64_t c = 0; c < C; ++c)
        want[size_t(r * C + c)] = (std::exp(x[size_t(r * C + c)] - m) / z - (c == lab[size_t(r)] ? 1.0 : 0.0)) / count;
    }
    check_close(vals(g), want, tol_for(dt), "backward");
  }
}

TEST_CASE("cross_entropy: all labels ignored gives 0, not NaN", "[ops][nn][cross_entropy]") {
  Tensor logits = randn64(RngKey::from_seed(1), Shape{3, 4});
  Tensor labels = from_vector(std::vector<int64_t>{-100, -100, -100}, Shape{3});
  CHECK(cross_entropy(logits, labels).item() == 0.0);
  logits.set_requires_grad(true);
  Tensor g = grad(cross_entropy(logits, labels), {logits})[0];
  for (double v : vals(g)) CHECK(v == 0.0);
}

TEST_CASE("cross_entropy rejects out-of-range labels, bad shapes and dtypes", "[ops][nn][cross_entropy][errors]") {
  Tensor logits = randn64(RngKey::from_seed(2), Shape{2, 3, 5});
  Tensor bad = from_vector(std::vector<int64_t>{0, 1, 2, 3, 5, 4}, Shape{2, 3});
  try {
    cross_entropy(logits, bad);
    FAIL("expected ValueError");
  } catch (const ValueError& e) {
    std::string m = e.what();
    CHECK(m.find("label 5") != std::string::npos);
    CHECK(m.find("[1, 1]") != std::string::npos);  // its position in the labels
  }
  CHECK_THROWS_AS(cross_entropy(logits, from_vector(std::vector<int64_t>{0, -1, 0, 0, 0, 0}, Shape{2, 3})), ValueError);
  CHECK_THROWS_AS(cross_entropy(logits, from_vector(std::vector<int64_t>{0, 1}, Shape{2})), ShapeError);
  CHECK_THROWS_AS(cross_entropy(logits, ones(Shape{2, 3}, DType::f64)), DTypeError);
  CHECK_THROWS_AS(cross_entropy(logits.astype(DType::i64), bad), DTypeError);
}

// ====================================================================================== layer norm

TEST_CASE("layer_norm matches the textbook formula, with and without affine parameters", "[ops][nn][layer_norm]") {
  RngKey key = RngKey::from_seed(303);
  const int64_t R = 6, D = 10;
  const double eps = 1e-5;
  for (DType dt : {DType::f64, DType::f32}) {
    Tensor x = rand_as(fold_in(key, 1), Shape{2, 3, D}, dt, 2.0) + 0.5;
    Tensor w = rand_as(fold_in(key, 2), Shape{D}, dt), b = rand_as(fold_in(key, 3), Shape{D}, dt);
    std::vector<double> xv = vals(x), wv = vals(w), bv = vals(b), plain(xv.size()), affine(xv.size());
    for (int64_t r = 0; r < R; ++r) {
      double mean = 0, var = 0;
      for (int64_t j = 0; j < D; ++j) mean += xv[size_t(r * D + j)] / D;
      for (int64_t j = 0; j < D; ++j) var += (xv[size_t(r * D + j)] - mean) * (xv[size_t(r * D + j)] - mean) / D;
      for (int64_t j = 0; j < D; ++j) {
        double h = (xv[size_t(r * D + j)] - mean) / std::sqrt(var + eps);
        plain[size_t(r * D + j)] = h;
        affine[size_t(r * D + j)] = h * wv[size_t(j)] + bv[size_t(j)];
      }
    }
    INFO(dtype_name(dt));
    check_close(vals(layer_norm(x, w, b, eps)), affine, tol_for(dt) * 10, "affine");
    check_close(vals(layer_norm(x, {}, {}, eps)), plain, tol_for(dt) * 10, "plain");
  }
  CHECK_THROWS_AS(layer_norm(ones(Shape{2, 4}), ones(Shape{3}), {}), ShapeError);
  CHECK_THROWS_AS(layer_norm(ones(Shape{2, 4}), ones(Shape{4}, DType::f64), {}), DTypeError);
  CHECK_THROWS_AS(layer_norm(ones(Shape{2, 4}, DType::i32), {}, {}), DTypeError);
}

TEST_CASE("layer_norm backward in f32 agrees with f64, on many rows", "[ops][nn][layer_norm]") {
  RngKey key = RngKey::from_seed(304);
  Tensor x = randn64(fold_in(key, 1), Shape{257, 96}, 1.5), w = randn64(fold_in(key, 2), Shape{96});
  Tensor b = randn64(fold_in(key, 3), Shape{96}), v = randn64(fold_in(key, 4), Shape{257, 96});
  auto grads = [&](DType dt) {
    TensorList p{x.astype(dt).detach(), w.astype(dt).detach(), b.astype(dt).detach()};
    for (auto& t : p) t.set_requires_grad(true);
    return grad(sum(mul(layer_norm(p[0], p[1], p[2]), v.astype(dt))), p);
  };
  TensorList g64 = grads(DType::f64), g32 = grads(DType::f32);
  for (size_t i = 0; i < 3; ++i) check_close(vals(g32[i]), vals(g64[i]), 2e-4, "grad");
}

// ====================================================================================== dropout

TEST_CASE("dropout: the mask is uniform_at(key, i) >= p, kept values scaled by 1/(1-p)", "[ops][nn][dropout]") {
  const int64_t n = 100000;
  const double p = 0.3;
  Tensor x = randn64(RngKey::from_seed(9), Shape{100, 1000}, 1.0, 1e-3);  // no exact zeros in x
  RngKey k1 = RngKey::from_seed(1234), k2 = RngKey::from_seed(1235);
  for (DType dt : {DType::f64, DType::f32}) {
    INFO(dtype_name(dt));
    Tensor xd = x.astype(dt);
    std::vector<double> xv = vals(xd), a = vals(dropout(xd, p, k1)), a2 = vals(dropout(xd, p, k1)),
                        b = vals(dropout(xd, p, k2));
    CHECK(a == a2);  // same key -> same mask
    int64_t kept = 0, differ = 0, wrong = 0;
    for (int64_t i = 0; i < n; ++i) {
      bool keep = double(kernels::cpu::uniform_at(k1, uint64_t(i))) >= p;
      bool kept_a = a[size_t(i)] != 0;
      kept += kept_a;
      differ += kept_a != (b[size_t(i)] != 0);
      double want = keep ? (dt == DType::f32 ? double(float(xv[size_t(i)]) * float(1.0 / (1.0 - p)))
                                             : xv[size_t(i)] * (1.0 / (1.0 - p)))
                         : 0.0;
      wrong += a[size_t(i)] != want;  // exact: kept values are x * (1 / (1 - p)) in the tensor's dtype
    }
    CHECK(wrong == 0);
    CHECK(std::fabs(double(kept) / n - (1 - p)) < 0.01);
    CHECK(differ > n / 4);  // another key, another mask (expected 2 p (1 - p) n = 0.42 n)
  }
  // Identity when not training or p == 0; p outside [0, 1) throws.
  CHECK(dropout(x, p, k1, false).same(x));
  CHECK(vals(dropout(x, 0.0, k1)) == vals(x));
  CHECK_THROWS_AS(dropout(x, 1.0, k1), ValueError);
  CHECK_THROWS_AS(dropout(x, -0.1, k1), ValueError);
  CHECK_THROWS_AS(dropout(x, 1.0, k1, false), ValueError);
  CHECK_THROWS_AS(dropout(ones(Shape{3}, DType::i64), 0.5, k1), DTypeError);
}

TEST_CASE("dropout's gradient applies the same mask", "[ops][nn][dropout]") {
  Tensor x = randn64(RngKey::from_seed(3), Shape{64, 33}, 1.0, 1e-3);
  x.set_requires_grad(true);
  RngKey key = RngKey::from_seed(77);
  Tensor y = dropout(x, 0.5, key);
  Tensor g = grad(sum(y), {x})[0];
  std::vector<double> yv = vals(y), gv = vals(g);
  for (size_t i = 0; i < yv.size(); ++i) CHECK(gv[i] == (yv[i] != 0 ? 2.0 : 0.0));
}

// ====================================================================================== embedding / take

TEST_CASE("embedding gathers rows and scatters gradients deterministically", "[ops][nn][embedding]") {
  RngKey key = RngKey::from_seed(404);
  const int64_t V = 7, D = 4;
  std::vector<int64_t> ids{3, 0, 3, 6, 1, 3};
  Tensor idt = from_vector(ids, Shape{2, 3});
  for (DType dt : {DType::f64, DType::f32}) {
    Tensor w = rand_as(fold_in(key, 1), Shape{V, D}, dt);
    std::vector<double> wv = vals(w), want;
    for (int64_t id : ids)
      for (int64_t j = 0; j < D; ++j) want.push_back(wv[size_t(id * D + j)]);
    Tensor e = embedding(w, idt);
    CHECK(e.shape() == Shape{2, 3, D});
    CHECK(vals(e) == want);  // a copy: exact
    CHECK(vals(embedding(w, idt.astype(DType::i32))) == want);
    // Backward: rows of v summed into their ids.
    Tensor v = rand_as(fold_in(key, 2), Shape{2, 3, D}, dt);
    std::vector<double> vv = vals(v), gw(size_t(V * D), 0.0);
    for (size_t k = 0; k < ids.size(); ++k)
      for (int64_t j = 0; j < D; ++j) gw[size_t(ids[k] * D + j)] += vv[k * D + size_t(j)];
    Tensor wl = w.detach().clone().detach();
    wl.set_requires_grad(true);
    check_close(vals(grad(sum(mul(embedding(wl, idt), v)), {wl})[0]), gw, tol_for(dt));
  }
  // Bitwise identical run to run, with many repeats on a table large enough to use threads.
  Tensor w = randn64(fold_in(key, 3), Shape{50, 700}).astype(DType::f32);
  w.set_requires_grad(true);
  Tensor many = testing::randint(fold_in(key, 4), Shape{4000}, 50);
  Tensor v = randn64(fold_in(key, 5), Shape{4000, 700}).astype(DType::f32);
  std::vector<float> g1 = grad(sum(mul(embedding(w, many), v)), {w})[0].to_vector<float>();
  std::vector<float> g2 = grad(sum(mul(embedding(w, many), v)), {w})[0].to_vector<float>();
  CHECK(g1 == g2);
  // Errors.
  try {
    embedding(w, from_vector(std::vector<int64_t>{1, 50}, Shape{2}));
    FAIL("expected ValueError");
  } catch (const ValueError& e) {
    CHECK(std::string(e.what()).find("index 50") != std::string::npos);
  }
  CHECK_THROWS_AS(embedding(w, from_vector(std::vector<int64_t>{-1}, Shape{1})), ValueError);
  CHECK_THROWS_AS(embedding(w, ones(Shape{2}, DType::f32)), DTypeError);
  CHECK_THROWS_AS(embedding(ones(Shape{2, 3, 4}), many), ShapeError);
}

TEST_CASE("take gathers along any axis", "[ops][nn][take]") {
  Tensor x = randn64(RngKey::from_seed(505), Shape{3, 4, 5});
  std::vector<double> xv = vals(x);
  std::vector<int64_t> idx{2, 0, 2, 3};
  Tensor it = from_vector(idx, Shape{2, 2});
  Tensor y = take(x, it, 1);
  CHECK(y.shape() == Shape{3, 2, 2, 5});
  std::vector<double> want;
  for (int a = 0; a < 3; ++a)
    for (int64_t i : idx)
      for (int b = 0; b < 5; ++b) want.push_back(xv[size_t((a * 4 + i) * 5 + b)]);
  CHECK(vals(y) == want);
  CHECK(take(x, from_vector(std::vector<int64_t>{4}, Shape{}), -1).shape() == Shape{3, 4});
  CHECK_THROWS_AS(take(x, it, 3), ShapeError);
  CHECK_THROWS_AS(take(x, from_vector(std::vector<int64_t>{5}, Shape{1}), 0), ValueError);
}

// ====================================================================================== conv2d

namespace {

struct ConvCase {
  int64_t N, C, H, W, O, KH, KW, SH, SW, PH, PW;
  bool bias;
};

// y[n, o, i, j] = b[o] + sum_{c, p, q} x[n, c, i*SH - PH + p, j*SW - PW + q] * w[o, c, p, q].
std::vector<double> ref_conv(const ConvCase& k, const std::vector<double>& x, const std::vector<double>& w,
                             const std::vector<double>& b, int64_t OH, int64_t OW) {
  std::vector<double> y(size_t(k.N * k.O * OH * OW), 0.0);
  for (int64_t n = 0; n < k.N; ++n)
    for (int64_t o = 0; o < k.O; ++o)
      for (int64_t i = 0; i < OH; ++i)
        for (int64_t j = 0; j < OW; ++j) {
          double acc = k.bias ? b[size_t(o)] : 0.0;
          for (int64_t c = 0; c < k.C; ++c)
            for (int64_t p = 0; p < k.KH; ++p)
              for (int64_t q = 0; q < k.KW; ++q) {
                int64_t ih = i * k.SH - k.PH + p, iw = j * k.SW - k.PW + q;
                if (ih < 0 || ih >= k.H || iw < 0 || iw >= k.W) continue;
                acc += x[size_t(((n * k.C + c) * k.H + ih) * k.W + iw)] * w[size_t(((o * k.C + c) * k.KH + p) * k.KW + q)];
              }
          y[size_t(((n * k.O + o) * OH + i) * OW + j)] = acc;
        }
  return y;
}

}  // namespace

TEST_CASE("conv2d matches a direct 7-deep loop, forward and backward (f64 loops, f32 oneDNN)", "[ops][nn][conv2d]") {
  RngKey key = RngKey::from_seed(606);
  std::vector<ConvCase> cases{
      {2, 3, 9, 8, 4, 3, 3, 2, 2, 1, 1, true},   // stride 2, padding 1, bias
      {3, 2, 7, 7, 5, 3, 3, 1, 1, 0, 0, false},  // plain
      {2, 4, 6, 10, 3, 2, 3, 1, 2, 1, 0, true},  // rectangular kernel, stride and padding
      {4, 1, 12, 12, 8, 5, 5, 1, 1, 2, 2, true}, // one input channel (the first layer of a CNN)
  };
  int ci = 0;
  for (const ConvCase& k : cases) {
    ++ci;
    const int64_t OH = (k.H + 2 * k.PH - k.KH) / k.SH + 1, OW = (k.W + 2 * k.PW - k.KW) / k.SW + 1;
    for (DType dt : {DType::f64, DType::f32}) {
      INFO("case " << ci << " " << dtype_name(dt));
      Tensor x = rand_as(fold_in(key, uint64_t(ci * 10 + 1)), Shape{k.N, k.C, k.H, k.W}, dt);
      Tensor w = rand_as(fold_in(key, uint64_t(ci * 10 + 2)), Shape{k.O, k.C, k.KH, k.KW}, dt, 0.5);
      Tensor b = rand_as(fold_in(key, uint64_t(ci * 10 + 3)), Shape{k.O}, dt);
      std::vector<double> xv = vals(x), wv = vals(w), bv = vals(b);
      Tensor y = conv2d(x, w, k.bias ? b : Tensor(), {k.SH, k.SW}, {k.PH, k.PW});
      CHECK(y.shape() == Shape{k.N, k.O, OH, OW});
      check_close(vals(y), ref_conv(k, xv, wv, bv, OH, OW), tol_for(dt) * 10, "forward");

      // Backward of L = sum(y * v): the adjoint loops.
      Tensor v = rand_as(fold_in(key, uint64_t(ci * 10 + 4)), y.shape(), dt);
      std::vector<double> vv = vals(v), dx(xv.size(), 0.0), dw(wv.size(), 0.0), db(size_t(k.O), 0.0);
      for (int64_t n = 0; n < k.N; ++n)
        for (int64_t o = 0; o < k.O; ++o)
          for (int64_t i = 0; i < OH; ++i)
            for (int64_t j = 0; j < OW; ++j) {
              double g = vv[size_t(((n * k.O + o) * OH + i) * OW + j)];
              db[size_t(o)] += g;
              for (int64_t c = 0; c < k.C; ++c)
                for (int64_t p = 0; p < k.KH; ++p)
                  for (int64_t q = 0; q < k.KW; ++q) {
                    int64_t ih = i * k.SH - k.PH + p, iw = j * k.SW - k.PW + q;
                    if (ih < 0 || ih >= k.H || iw < 0 || iw >= k.W) continue;
                    size_t xi = size_t(((n * k.C + c) * k.H + ih) * k.W + iw), wi = size_t(((o * k.C + c) * k.KH + p) * k.KW + q);
                    dx[xi] += g * wv[wi];
                    dw[wi] += g * xv[xi];
                  }
            }
      TensorList p{x.detach().clone().detach(), w.detach().clone().detach(), b.detach().clone().detach()};
      for (auto& t : p) t.set_requires_grad(true);
      Tensor out = conv2d(p[0], p[1], k.bias ? p[2] : Tensor(), {k.SH, k.SW}, {k.PH, k.PW});
      TensorList g = grad(sum(mul(out, v)), k.bias ? p : TensorList{p[0], p[1]});
      check_close(vals(g[0]), dx, tol_for(dt) * 10, "dx");
      check_close(vals(g[1]), dw, tol_for(dt) * 100, "dw");
      if (k.bias) check_close(vals(g[2]), db, tol_for(dt) * 100, "db");
    }
  }
}

TEST_CASE("conv2d shape, stride and dtype errors", "[ops][nn][conv2d][errors]") {
  Tensor x = ones(Shape{2, 3, 8, 8}), w = ones(Shape{4, 3, 3, 3});
  try {
    conv2d(x, ones(Shape{4, 2, 3, 3}));
    FAIL("expected ShapeError");
  } catch (const ShapeError& e) {
    CHECK(!e.expected().empty());
    CHECK(e.found().find("3 channels") != std::string::npos);
  }
  CHECK_THROWS_AS(conv2d(x, ones(Shape{4, 3, 9, 3})), ShapeError);            // kernel taller than the input
  CHECK_NOTHROW(conv2d(x, ones(Shape{4, 3, 9, 3}), {}, {1, 1}, {1, 1}));      // fits once padded
  CHECK_THROWS_AS(conv2d(x, w, {}, {0, 1}), ShapeError);                      // bad stride
  CHECK_THROWS_AS(conv2d(x, w, {}, {1, 1}, {-1, 0}), ShapeError);             // negative padding
  CHECK_THROWS_AS(conv2d(x, w, ones(Shape{3})), ShapeError);                  // bias size
  CHECK_THROWS_AS(conv2d(ones(Shape{3, 8, 8}), w), ShapeError);               // missing batch axis
  CHECK_THROWS_AS(conv2d(x, w.astype(DType::f64)), DTypeError);
  CHECK_THROWS_AS(conv2d(x.astype(DType::i32), w.astype(DType::i32)), DTypeError);
}

// ====================================================================================== max_pool2d

namespace {

struct PoolCase {
  Shape s;
  std::array<int64_t, 2> k, st, pd;
  int64_t OH() const { return (s[2] + 2 * pd[0] - k[0]) / st[0] + 1; }
  int64_t OW() const { return (s[3] + 2 * pd[1] - k[1]) / st[1] + 1; }
};

// The naive window maximum of x (row-major values of shape pc.s): per output element its value and the
// flat index of the first maximum in row-major window order.
std::pair<std::vector<double>, std::vector<int64_t>> naive_max_pool(const std::vector<double>& xv, const PoolCase& pc) {
  const int64_t N = pc.s[0], C = pc.s[1], H = pc.s[2], W = pc.s[3], OH = pc.OH(), OW = pc.OW();
  std::vector<double> m(size_t(N * C * OH * OW), -INFINITY);
  std::vector<int64_t> at(m.size(), -1);
  for (int64_t t = 0; t < N * C; ++t)
    for (int64_t i = 0; i < OH; ++i)
      for (int64_t j = 0; j < OW; ++j) {
        const size_t o = size_t((t * OH + i) * OW + j);
        for (int64_t p = 0; p < pc.k[0]; ++p)
          for (int64_t q = 0; q < pc.k[1]; ++q) {
            const int64_t ih = i * pc.st[0] - pc.pd[0] + p, iw = j * pc.st[1] - pc.pd[1] + q;
            if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
            const double v = xv[size_t((t * H + ih) * W + iw)];
            if (v > m[o]) m[o] = v, at[o] = (t * H + ih) * W + iw;
          }
      }
  return {m, at};
}

}  // namespace

TEST_CASE("max_pool2d matches a naive window maximum, forward and backward", "[ops][nn][max_pool2d]") {
  std::vector<PoolCase> cases{{Shape{2, 3, 6, 6}, {2, 2}, {2, 2}, {0, 0}},
                              {Shape{2, 2, 7, 7}, {3, 3}, {2, 2}, {1, 1}},
                              {Shape{1, 4, 9, 5}, {3, 2}, {1, 2}, {1, 1}},
                              {Shape{128, 8, 24, 24}, {2, 2}, {2, 2}, {0, 0}}};  // threads
  int ci = 0;
  for (const auto& pc : cases) {
    ++ci;
    const int64_t N = pc.s[0], C = pc.s[1], H = pc.s[2], W = pc.s[3], OH = pc.OH(), OW = pc.OW();
    for (DType dt : {DType::f64, DType::f32}) {
      INFO("case " << ci << " " << dtype_name(dt));
      Tensor x = distinct(RngKey::from_seed(700 + uint64_t(ci)), pc.s, dt);
      const std::vector<double> xv = vals(x);
      const auto [want, arg] = naive_max_pool(xv, pc);
      Tensor xl = x.detach().clone().detach();
      xl.set_requires_grad(true);
      Tensor y = max_pool2d(xl, pc.k, pc.st, pc.pd);
      CHECK(y.shape() == Shape{N, C, OH, OW});
      CHECK(vals(y) == want);  // a selection: exact
      Tensor v = randn64(RngKey::from_seed(800 + uint64_t(ci)), y.shape()).astype(dt);
      std::vector<double> vv = vals(v), dx(xv.size(), 0.0);
      for (size_t o = 0; o < arg.size(); ++o) dx[size_t(arg[o])] += vv[o];
      check_close(vals(grad(sum(mul(y, v)), {xl})[0]), dx, tol_for(dt), "dx");
      std::vector<int64_t> in_plane(arg.size());
      for (size_t o = 0; o < arg.size(); ++o) in_plane[o] = arg[o] % (H * W);
      CHECK(max_pool2d_indices(x, pc.k, pc.st, pc.pd).to_vector<int64_t>() == in_plane);
    }
  }
  // Errors.
  Tensor x = ones(Shape{1, 1, 4, 4});
  CHECK_THROWS_AS(max_pool2d(x, {5, 5}), ShapeError);
  CHECK_THROWS_AS(max_pool2d(x, {2, 2}, {2, 2}, {2, 2}), ShapeError);  // padding > kernel / 2
  CHECK_THROWS_AS(max_pool2d(x, {0, 2}), ShapeError);
  CHECK_THROWS_AS(max_pool2d(x, {2, 2}, {-1, 1}), ShapeError);
  CHECK_THROWS_AS(max_pool2d(ones(Shape{4, 4}), {2, 2}), ShapeError);
  CHECK_THROWS_AS(max_pool2d(x.astype(DType::i64), {2, 2}), DTypeError);
}

TEST_CASE("max_pool2d on ties: indices, the gradient's routing and the second derivative pick the same winner",
          "[ops][nn][max_pool2d]") {
  // Values in {0, 1, 2} (a ReLU's zeros are the common case): most windows tie. Integer cotangents keep
  // every sum exact, so f32 (oneDNN's kernels) must agree exactly with the first-maximum rule too.
  const std::vector<PoolCase> cases{{Shape{2, 3, 6, 6}, {2, 2}, {2, 2}, {0, 0}},
                                    {Shape{2, 2, 7, 7}, {3, 3}, {2, 2}, {1, 1}},
                                    {Shape{1, 3, 9, 5}, {3, 2}, {1, 2}, {1, 1}}};
  int ci = 0;
  for (const auto& pc : cases) {
    ++ci;
    const int64_t N = pc.s[0], C = pc.s[1], H = pc.s[2], W = pc.s[3], OH = pc.OH(), OW = pc.OW();
    for (DType dt : {DType::f64, DType::f32}) {
      INFO("case " << ci << " " << dtype_name(dt));
      const Tensor x = testing::randint(RngKey::from_seed(900 + uint64_t(ci)), pc.s, 3).astype(dt);
      const std::vector<double> xv = vals(x);
      std::vector<int64_t> first = naive_max_pool(xv, pc).second;  // the first maximum's offset in its plane
      for (int64_t& a : first) a %= H * W;
      CHECK(max_pool2d_indices(x, pc.k, pc.st, pc.pd).to_vector<int64_t>() == first);

      // dx = J^T dy routes each window's dy to that winner.
      const Tensor dy = testing::randint(RngKey::from_seed(950 + uint64_t(ci)), Shape{N, C, OH, OW}, 7).astype(dt) - 3.0;
      const std::vector<double> dyv = vals(dy);
      std::vector<double> want_dx(xv.size(), 0.0);
      for (size_t o = 0; o < first.size(); ++o) want_dx[size_t(int64_t(o) / (OH * OW) * H * W + first[o])] += dyv[o];
      const Tensor xl = x.detach().set_requires_grad();
      const Tensor dyl = dy.detach().set_requires_grad();
      BackwardOptions keep;
      keep.create_graph = true;
      const Tensor dx = grad(sum(max_pool2d(xl, pc.k, pc.st, pc.pd) * dyl), {xl}, keep)[0];
      CHECK(vals(dx) == want_dx);
      // Its vjp with respect to dy, J g: g read at each winner. With respect to x: zero.
      const Tensor g = testing::randint(RngKey::from_seed(990 + uint64_t(ci)), pc.s, 7).astype(dt) - 3.0;
      const std::vector<double> gv = vals(g);
      std::vector<double> want_jg(first.size());
      for (size_t o = 0; o < first.size(); ++o) want_jg[o] = gv[size_t(int64_t(o) / (OH * OW) * H * W + first[o])];
      const TensorList second = grad(sum(dx * g), {dyl, xl});
      CHECK(vals(second[0]) == want_jg);
      CHECK(vals(second[1]) == std::vector<double>(xv.size(), 0.0));
    }
  }
  CHECK_THROWS_AS(max_pool2d_indices(ones(Shape{1, 1, 4, 4}), {5, 5}), ShapeError);
  CHECK_THROWS_AS(max_pool2d_indices(ones(Shape{1, 1, 4, 4}, DType::i32), {2, 2}), DTypeError);
}

// ====================================================================================== dtype errors

TEST_CASE("NN ops reject unsupported dtypes with DTypeError", "[ops][nn][errors]") {
  Tensor xi = ones(Shape{2, 3}, DType::i32);
  CHECK_THROWS_AS(softmax(xi), DTypeError);
  CHECK_THROWS_AS(log_softmax(ones(Shape{2, 3}, DType::bf16)), DTypeError);
  CHECK_THROWS_AS(layer_norm(xi, {}, {}), DTypeError);
  CHECK_THROWS_AS(take(xi, from_vector(std::vector<int64_t>{0}, Shape{1}), 0), DTypeError);
  CHECK_THROWS_AS(take(ones(Shape{2, 3}), ones(Shape{1}), 0), DTypeError);
}

// ====================================================================================== higher order

namespace {

// fn(inputs) = sum over the first-order gradients (w.r.t. the floating inputs) of sum(f(inputs) * v)
// squared: differentiating it needs the vjp of each op's vjp. Under gradcheck's numeric pass the inputs
// do not require grad; they are then re-leafed so the inner gradient still exists.
std::function<Tensor(const TensorList&)> grad_norm_of(std::function<Tensor(const TensorList&)> f) {
  return [f](const TensorList& in) {
    GradModeGuard on(true);
    TensorList xs = in;
    bool outer = in[0].requires_grad();
    for (auto& t : xs)
      if (!outer && is_floating(t.dtype())) {
        t = t.detach().clone().detach();
        t.set_requires_grad(true);
      }
    Tensor y = f(xs);
    Tensor v = random_normal(RngKey::from_seed(31), y.shape(), DType::f64);
    TensorList wrt;
    for (auto& t : xs)
      if (is_floating(t.dtype())) wrt.push_back(t);
    BackwardOptions o;
    o.create_graph = outer;
    TensorList g = grad(sum(mul(y, v)), wrt, o);
    Tensor acc = scalar(0.0, DType::f64);
    for (auto& gi : g) acc = acc + sum(square(gi));
    return acc;
  };
}

}  // namespace

TEST_CASE("second derivatives: conv2d (both backward ops), max_pool2d, softmax, log_softmax, dropout, take, exp, tanh, layer_norm, gelu, cross_entropy", "[ops][nn][autodiff]") {
  RngKey key = RngKey::from_seed(909);
  struct Case {
    const char* name;
    TensorList in;
    std::function<Tensor(const TensorList&)> f;
  };
  std::vector<Case> cases{
      {"conv2d", {randn64(fold_in(key, 1), Shape{2, 2, 5, 5}), randn64(fold_in(key, 2), Shape{3, 2, 3, 3}, 0.5), randn64(fold_in(key, 3), Shape{3})},
       [](const TensorList& in) { return conv2d(in[0], in[1], in[2], {2, 2}, {1, 1}); }},
      // Overlapping windows: an element can win several; squared, so the cotangent reaching the pooling
      // depends on x. Distinct values: finite differences never flip a window's maximum.
      {"max_pool2d", {distinct(fold_in(key, 23), Shape{2, 2, 5, 6}, DType::f64)},
       [](const TensorList& in) { return square(max_pool2d(in[0], {3, 3}, {2, 2}, {1, 1})); }},
      {"softmax", {randn64(fold_in(key, 4), Shape{3, 4})}, [](const TensorList& in) { return softmax(in[0], 0); }},
      // exp and tanh: core ops whose vjps read their saved outputs, like softmax's.
      {"exp", {randn64(fold_in(key, 10), Shape{5})}, [](const TensorList& in) { return exp(in[0]); }},
      {"tanh", {randn64(fold_in(key, 11), Shape{5})}, [](const TensorList& in) { return tanh(in[0]); }},
      {"log_softmax", {randn64(fold_in(key, 5), Shape{3, 4})}, [](const TensorList& in) { return log_softmax(in[0]); }},
      {"dropout", {randn64(fold_in(key, 6), Shape{4, 4})},
       [](const TensorList& in) { return square(dropout(in[0], 0.25, RngKey::from_seed(5))); }},
      {"take", {randn64(fold_in(key, 7), Shape{4, 3})},
       [](const TensorList& in) { return square(take(in[0], from_vector(std::vector<int64_t>{1, 1, 3}, Shape{3}), 0)); }},
      // layer_norm_backward's own vjp (x, w and dy all reach the gradient), with and without parameters.
      {"layer_norm", {randn64(fold_in(key, 12), Shape{3, 5})},
       [](const TensorList& in) { return square(layer_norm(in[0], {}, {})); }},
      {"layer_norm with w and b", {randn64(fold_in(key, 13), Shape{2, 3, 4}), randn64(fold_in(key, 14), Shape{4}), randn64(fold_in(key, 15), Shape{4})},
       [](const TensorList& in) { return tanh(layer_norm(in[0], in[1], in[2])); }},
      {"gelu (tanh)", {randn64(fold_in(key, 16), Shape{7}, 2.0)}, [](const TensorList& in) { return gelu(in[0], true); }},
      {"gelu (erf)", {randn64(fold_in(key, 17), Shape{7}, 2.0)}, [](const TensorList& in) { return gelu(in[0], false); }},
      // cross_entropy_backward's own vjp; squared, so its incoming cotangent depends on the logits too.
      // Row 1 is ignored (ignore_index -100).
      {"cross_entropy (mean, an ignored row)", {randn64(fold_in(key, 18), Shape{4, 5})},
       [](const TensorList& in) {
         return square(cross_entropy(in[0], from_vector(std::vector<int64_t>{2, -100, 0, 4}, Shape{4}), Reduction::mean, -100));
       }},
      {"cross_entropy (sum)", {randn64(fold_in(key, 19), Shape{2, 3, 4})},
       [](const TensorList& in) {
         return square(cross_entropy(in[0], from_vector(std::vector<int64_t>{1, 3, 0, 2, 2, 1}, Shape{2, 3}), Reduction::sum));
       }},
      {"cross_entropy (none)", {randn64(fold_in(key, 20), Shape{3, 4})},
       [](const TensorList& in) {
         return square(cross_entropy(in[0], from_vector(std::vector<int64_t>{3, -100, 1}, Shape{3}), Reduction::none, -100));
       }},
  };
  for (auto& c : cases) {
    INFO(c.name);
    GradcheckResult r = gradcheck(grad_norm_of(c.f), c.in, 1e-6, 1e-5, 1e-5);
    INFO(r.report);
    CHECK(r.ok);
  }
  // Third derivatives of the second derivatives written with ops (layer_norm's, gelu's, cross_entropy's,
  // max_pool2d's gather).
  for (auto& c : cases) {
    const std::string n = c.name;
    if (n.rfind("layer_norm", 0) != 0 && n.rfind("gelu", 0) != 0 && n.rfind("cross_entropy", 0) != 0 && n != "max_pool2d")
      continue;
    INFO(c.name << ", third derivative");
    GradcheckResult r = gradcheck(grad_norm_of(grad_norm_of(c.f)), c.in, 1e-6, 1e-5, 1e-5);
    INFO(r.report);
    CHECK(r.ok);
  }
  // A cotangent that reaches ignored rows (the squared gradient's is 0 there): <d/dz CE(z)^2, w> for each
  // reduction; the ignored row's gradient is 0 whatever z, so its second derivative must be too.
  for (Reduction red : {Reduction::mean, Reduction::sum, Reduction::none}) {
    INFO("cross_entropy, reduction " << int(red) << ", a linear functional of the gradient");
    const Tensor lab = from_vector(std::vector<int64_t>{2, -100, 0}, Shape{3});
    const Tensor w = randn64(fold_in(key, 21), Shape{3, 4});
    auto f = [&](const TensorList& in) {
      GradModeGuard on(true);
      const bool outer = in[0].requires_grad();
      const Tensor z = outer ? in[0] : in[0].detach().set_requires_grad();
      BackwardOptions o;
      o.create_graph = outer;
      return sum(grad(sum(square(cross_entropy(z, lab, red, -100))), {z}, o)[0] * w);
    };
    GradcheckResult r = gradcheck(f, {randn64(fold_in(key, 22), Shape{3, 4})}, 1e-6, 1e-5, 1e-5);
    INFO(r.report);
    CHECK(r.ok);
  }
}
