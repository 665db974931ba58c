// How the CUDA matmul calls cuBLASLt (kernels::cuda::matmul_call: operands read where they are, a
// shared weight folded into the rows), run on the CPU: a reference of cuBLASLt's column-major GEMM
// semantics (op(A) m x k, op(B) k x n, element (row, col) of a column-major matrix at row + col * ld,
// batches `stride` elements apart) evaluates the call on the very CPU memory of the operands, and must
// give the CPU's matmul of the same views. Each case also checks that the views the call claims to read
// in place are not copied (a transposed operand, a column slice, strided batches, the folded weight).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>

#include "core/rng.h"
#include "kernels/cuda/kernels.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;
using kernels::cuda::GemmCall;

namespace {

// c [cs] (row-major, contiguous) computed as cuBLASLt would run g: C = op_ta(A) op_tb(B) column-major.
// First the call must be one cuBLASLt takes: every leading dimension at least its stored matrix's rows
// (cublasLtMatrixLayoutCreate), and batches apart by a nonzero stride (we never rely on cuBLASLt taking
// a broadcast batch).
Tensor run_column_major(const GemmCall& g, const Shape& cs) {
  REQUIRE(g.lda >= std::max<int64_t>(1, g.ta ? g.k : g.m));
  REQUIRE(g.ldb >= std::max<int64_t>(1, g.tb ? g.n : g.k));
  REQUIRE(g.ldc >= std::max<int64_t>(1, g.m));
  if (g.batch > 1) REQUIRE((g.sa > 0 && g.sb > 0 && g.sc >= g.ldc * g.n));
  Tensor c = full(cs, std::nan(""), DType::f64);
  const auto* A = static_cast<const double*>(g.A.raw_data());
  const auto* B = static_cast<const double*>(g.B.raw_data());
  auto* C = static_cast<double*>(c.raw_data());
  for (int64_t i = 0; i < g.batch; ++i)
    for (int64_t col = 0; col < g.n; ++col)
      for (int64_t row = 0; row < g.m; ++row) {
        double acc = 0;
        for (int64_t p = 0; p < g.k; ++p) {
          const double a = g.ta ? A[i * g.sa + p + row * g.lda] : A[i * g.sa + row + p * g.lda];
          const double b = g.tb ? B[i * g.sb + col + p * g.ldb] : B[i * g.sb + p + col * g.ldb];
          acc += a * b;
        }
        C[i * g.sc + row + col * g.ldc] = acc;
      }
  return c;
}

Tensor rnd(uint64_t seed, const Shape& s) { return testing::randn64(RngKey::from_seed(seed), s); }

bool same_memory(const Tensor& view, const Tensor& t) { return view.raw_data() == t.raw_data(); }

// The call for a @ b, checked against the CPU's matmul; returns it for checks of its form.
GemmCall check(const Tensor& a, const Tensor& b) {
  const Tensor want = matmul(a, b);
  const GemmCall g = kernels::cuda::matmul_call(a, b, want.shape());
  const Tensor got = run_column_major(g, want.shape());
  const std::vector<double> x = got.to_vector<double>(), y = want.contiguous().to_vector<double>();
  REQUIRE(x.size() == y.size());
  double err = 0, scale = 1e-300;
  for (size_t i = 0; i < x.size(); ++i) err = std::max(err, std::fabs(x[i] - y[i])), scale = std::max(scale, std::fabs(y[i]));
  CHECK(err / scale <= 1e-12);  // NaN (an element the call never writes) fails too
  return g;
}

}  // namespace

TEST_CASE("cuda matmul_call: cuBLASLt's column-major call computes the CPU's matmul, views read in place") {
  const Tensor x = rnd(1, Shape{96, 33}), dy = rnd(2, Shape{96, 40}), w = rnd(3, Shape{40, 33});

  SECTION("contiguous operands: no transposes, no copies") {
    const Tensor b = rnd(4, Shape{33, 40});
    const GemmCall g = check(x, b);
    CHECK((!g.ta && !g.tb && g.batch == 1));
    CHECK((same_memory(g.A, b) && same_memory(g.B, x)));
  }
  SECTION("a transposed operand goes by the op flag (the weight gradient dY^T X, and X W^T)") {
    GemmCall g = check(dy.T(), x);
    CHECK((g.tb && !g.ta && same_memory(g.B, dy)));
    g = check(x, w.T());
    CHECK((g.ta && !g.tb && same_memory(g.A, w)));
  }
  SECTION("a column slice goes by its leading dimension") {
    const Tensor wide = rnd(5, Shape{96, 50});
    const GemmCall g = check(wide.slice(1, 3, 36), w.T());
    CHECK(g.ldb == 50);
    CHECK(same_memory(g.B, wide.slice(1, 3, 36)));
    const Tensor tall = rnd(6, Shape{70, 40});  // rows of a transposed operand: its leading dimension too
    check(tall.slice(0, 10, 43).T(), rnd(7, Shape{33, 5}));
  }
  SECTION("batches one stride apart are read in place, transposed or not") {
    const Tensor p = rnd(8, Shape{4, 33, 96}), q = rnd(9, Shape{4, 33, 7});
    GemmCall g = check(p.permute({0, 2, 1}), q);
    CHECK((g.batch == 4 && g.tb && g.sb == 33 * 96 && same_memory(g.B, p)));
    const Tensor dy3 = rnd(10, Shape{4, 24, 40});
    g = check(dy3.slice(1, 2, 20), w);  // rows 2..19 of each batch: not stacked, a batched call
    CHECK((g.batch == 4 && g.sb == 24 * 40 && same_memory(g.B, dy3.slice(1, 2, 20))));
    check(rnd(11, Shape{2, 3, 5, 6}), rnd(12, Shape{2, 3, 6, 4}));  // two batch axes, one stride
  }
  SECTION("a weight shared by every batch folds the batch into the rows") {
    const Tensor x3 = rnd(13, Shape{4, 24, 33}), dy3 = rnd(14, Shape{4, 24, 40});
    GemmCall g = check(x3, w.T());
    CHECK((g.batch == 1 && g.n == 4 * 24 && g.ta && same_memory(g.A, w) && same_memory(g.B, x3)));
    g = check(dy3, w);  // a linear layer's input gradient on [B, T, out]
    CHECK((g.batch == 1 && g.n == 4 * 24 && same_memory(g.A, w)));
    g = check(rnd(15, Shape{2, 3, 5, 6}), rnd(16, Shape{1, 1, 6, 4}));  // unit batch axes of b
    CHECK(g.batch == 1);
    g = check(rnd(17, Shape{2, 3, 5, 6}), rnd(18, Shape{6, 4}).expand(Shape{3, 6, 4}));  // b broadcast by stride 0
    CHECK(g.batch == 1);
  }
  SECTION("layouts cuBLASLt cannot take are copied, and still right") {
    const Tensor p = rnd(19, Shape{4, 33, 96});
    check(p.permute({0, 2, 1}), w.T());                                    // shared weight, a transposed: batched
    check(rnd(20, Shape{3, 2, 5, 6}).permute({1, 0, 2, 3}), rnd(21, Shape{2, 3, 6, 4}));  // interleaved batch axes
    check(rnd(22, Shape{5, 6}), rnd(23, Shape{3, 6, 4}));                  // a broadcast over b's batch
    check(rnd(24, Shape{6, 5}).T().slice(1, 0, 6, 2), rnd(25, Shape{3, 4}));  // both strides > 1
    check(rnd(32, Shape{1, 33}).expand(Shape{96, 33}), w.T());                // rows broadcast (stride 0)
  }
  SECTION("matrices of one row, one column, or an inner dimension of 1") {
    check(x.slice(0, 5, 6), w.T());  // one row at an offset
    check(rnd(33, Shape{33}).expand(Shape{1, 33}), w.T());  // one row whose row stride is 0
    check(rnd(34, Shape{40}).expand(Shape{1, 40}).slice(1, 0, 40, 2), rnd(35, Shape{20, 3}));  // one row, step 2
    check(x, w.T().slice(1, 7, 8));  // one column
    check(rnd(26, Shape{5, 1}), rnd(27, Shape{1, 4}));
    check(rnd(28, Shape{1, 1}), rnd(29, Shape{1, 1}));
    check(rnd(30, Shape{3, 1, 6}), rnd(31, Shape{6, 1}));  // fold with one row per batch
  }
}
