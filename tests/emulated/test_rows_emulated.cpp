// The row kernels of kernels/cuda/nn.cu (block bodies in kernels/cuda/rows.cuh: softmax, cross-entropy,
// the vocabulary-parallel cross-entropy's shard kernels, layer norm) run on the CPU through the emulated GPU primitives of emulator.h, against the CPU kernels
// (kernels/cpu/nn.h) on fresh random inputs: the same formulas in another summation order, so f32 within
// 1e-5 (1e-4 where a whole row or column is summed) and f64 within 1e-12. Blocks are 256 threads as
// nn.cu launches them (1024 for the one-block label and total kernels), and fewer blocks than rows, so the
// grid-stride loops and the block reductions' reuse of their shared partials are exercised. Outputs
// start as NaN, so an unwritten element fails. The fused cross-entropy must equal the separate forward
// and backward bitwise, as the JIT's fusion promises.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>

#include "kernels/cuda/rows.cuh"

#include "cuda/cuda_test_util.h"
#include "emu_test_util.h"
#include "emulator.h"
#include "kernels/cpu/nn.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;
namespace rk = titanax::kernels::cuda::row_kernels;
namespace kc = titanax::kernels::cpu;
using testing::emu::HostPrim;
using testing::emu::fresh_key;
using testing::emu::cptr;
using testing::emu::ptr;
using testing::emu::nan_tensor;

namespace {

constexpr int kRowThreads = 256;

}  // namespace

TEMPLATE_TEST_CASE("row kernels, emulated: softmax and log-softmax over rows match the CPU", "[emulated]", float, double) {
  const DType dt = std::is_same_v<TestType, float> ? DType::f32 : DType::f64;
  const double tol = dt == DType::f32 ? 1e-5 : 1e-12;
  const RngKey key = fresh_key();
  for (const int64_t n : {int64_t(7), int64_t(300), int64_t(1000)}) {
    INFO("n " << n);
    const int64_t R = 5;
    Tensor x = (testing::randn64(fold_in(key, uint64_t(n)), Shape{R, n}) * 4.0).astype(dt);
    TestType* xv = ptr<TestType>(x);
    // Row 1: its first two thirds masked (-inf), so threads start their running max at -inf and keep it.
    for (int64_t j = 0; j < 2 * n / 3; ++j) xv[n + j] = TestType(-INFINITY);
    // Row 2: one logit far above its row's others: exp overflows unless the true row max is subtracted.
    xv[2 * n] = TestType(800);
    // Row 3 holds a NaN (a NaN row, as on the CPU); row 4 is all -inf (NaN too).
    xv[3 * n + n / 2] = TestType(NAN);
    for (int64_t j = 0; j < n; ++j) xv[4 * n + j] = TestType(-INFINITY);
    for (bool log : {false, true}) {
      Tensor y = nan_tensor(x.shape(), dt), yc = nan_tensor(x.shape(), dt), want = empty(x.shape(), dt);
      testing::emu::launch(3, 1, kRowThreads, 0, [&](unsigned char*) {
        rk::softmax_rows<HostPrim>(cptr<TestType>(x), ptr<TestType>(y), R, n, log, static_cast<TestType*>(nullptr));
      });
      // With the row cached in shared memory (the second pass reads it there): bitwise the same.
      testing::emu::launch(3, 1, kRowThreads, size_t(n) * sizeof(TestType), [&](unsigned char* smem) {
        rk::softmax_rows<HostPrim>(cptr<TestType>(x), ptr<TestType>(yc), R, n, log, reinterpret_cast<TestType*>(smem));
      });
      kc::softmax(x, R, n, 1, log, want);
      CHECK(testing::rel_error(y, want) <= tol);
      CHECK(testing::bitwise_equal(yc, y));
    }
  }
}

TEMPLATE_TEST_CASE("row kernels, emulated: softmax and log-softmax over a middle axis match the CPU", "[emulated]", float,
                   double) {
  const DType dt = std::is_same_v<TestType, float> ? DType::f32 : DType::f64;
  const double tol = dt == DType::f32 ? 1e-5 : 1e-12;
  const RngKey key = fresh_key();
  const int64_t outer = 5, n = 50, inner = 20;  // 100 columns over a grid of 2 blocks of 32 threads: strides
  Tensor x = (testing::randn64(key, Shape{outer, n, inner}) * 4.0).astype(dt);
  // Column (1, 3) leads with a logit far above its others: exp overflows unless the true max is subtracted.
  ptr<TestType>(x)[(1 * n + 0) * inner + 3] = TestType(800);
  for (bool log : {false, true}) {
    INFO("log " << log);
    Tensor y = nan_tensor(x.shape(), dt), want = empty(x.shape(), dt);
    testing::emu::launch(2, 1, 32, 0, [&](unsigned char*) {
      rk::softmax_cols<HostPrim>(cptr<TestType>(x), ptr<TestType>(y), outer, n, inner, log);
    });
    kc::softmax(x, outer, n, inner, log, want);
    CHECK(testing::rel_error(y, want) <= tol);
  }
}

TEMPLATE_TEST_CASE("row kernels, emulated: cross-entropy forward, backward and both fused match the CPU", "[emulated]", float,
                   double) {
  const DType dt = std::is_same_v<TestType, float> ? DType::f32 : DType::f64;
  const double tol = dt == DType::f32 ? 1e-5 : 1e-12;
  const RngKey key = fresh_key();
  const int64_t R = 9, C = 333, ignore = -100;
  const Tensor x = (testing::randn64(fold_in(key, 1), Shape{R, C}) * 3.0).astype(dt);
  std::vector<int64_t> lv;
  for (int64_t r = 0; r < R; ++r) lv.push_back(r % 4 == 1 ? ignore : (r * 37 + 5) % C);
  for (DType lt : {DType::i64, DType::i32}) {
    const Tensor labels = from_vector(lv, Shape{R}, lt);
    const bool l64 = lt == DType::i64;
    const Tensor ct_none = testing::randn64(fold_in(key, 2), Shape{R}).astype(dt), ct_one = scalar(0.75, dt);
    for (int red : {0, 1, 2}) {  // mean, sum, none (nn.cu's codes)
      INFO("labels " << dtype_name(lt) << " reduction " << red);
      const kc::LossReduction cred = red == 0 ? kc::LossReduction::mean : red == 1 ? kc::LossReduction::sum : kc::LossReduction::none;
      const Tensor& ct = red == 2 ? ct_none : ct_one;
      const Shape lshape = red == 2 ? Shape{R} : Shape{};
      Tensor count = full(Shape{}, -1.0, DType::i64), rows = nan_tensor(Shape{R}, DType::f64);
      Tensor loss = nan_tensor(lshape, dt), dx = nan_tensor(x.shape(), dt);
      Tensor loss_f = nan_tensor(lshape, dt), dx_f = nan_tensor(x.shape(), dt);
      const kernels::cuda::ReportSlot slot{};
      testing::emu::reset_report();
      auto labels_kernel = [&] {
        testing::emu::launch(1, 1, 1024, 0, [&](unsigned char*) {
          if (l64) rk::ce_labels<HostPrim>(cptr<int64_t>(labels), R, C, ignore, ptr<int64_t>(count), slot);
          else rk::ce_labels<HostPrim>(cptr<int32_t>(labels), R, C, ignore, ptr<int64_t>(count), slot);
        });
      };
      auto total_kernel = [&](Tensor& out) {
        if (red != 2)
          testing::emu::launch(1, 1, 1024, 0, [&](unsigned char*) {
            rk::ce_total<HostPrim>(cptr<double>(rows), R, red, cptr<int64_t>(count), ptr<TestType>(out));
          });
      };
      // Separate: labels, forward (the fused body without ct and dx, as nn.cu launches it), total; labels, backward.
      labels_kernel();
      testing::emu::launch(4, 1, kRowThreads, 0, [&](unsigned char*) {
        if (l64)
          rk::ce_fused<HostPrim>(cptr<TestType>(x), cptr<int64_t>(labels), static_cast<const TestType*>(nullptr), R, C, ignore, red,
                                 nullptr, ptr<TestType>(loss), ptr<double>(rows), static_cast<TestType*>(nullptr),
                                 static_cast<TestType*>(nullptr));
        else
          rk::ce_fused<HostPrim>(cptr<TestType>(x), cptr<int32_t>(labels), static_cast<const TestType*>(nullptr), R, C, ignore, red,
                                 nullptr, ptr<TestType>(loss), ptr<double>(rows), static_cast<TestType*>(nullptr),
                                 static_cast<TestType*>(nullptr));
      });
      total_kernel(loss);
      // The backward with each row cached in shared memory (as nn.cu launches it where the row fits), and
      // without: bitwise the same.
      auto backward_kernel = [&](Tensor& out, bool cached) {
        labels_kernel();
        testing::emu::launch(4, 1, kRowThreads, cached ? size_t(C) * sizeof(TestType) : 0, [&](unsigned char* smem) {
          TestType* cache = cached ? reinterpret_cast<TestType*>(smem) : nullptr;
          if (l64)
            rk::ce_backward<HostPrim>(cptr<TestType>(x), cptr<int64_t>(labels), cptr<TestType>(ct), R, C, ignore, red,
                                      cptr<int64_t>(count), ptr<TestType>(out), cache);
          else
            rk::ce_backward<HostPrim>(cptr<TestType>(x), cptr<int32_t>(labels), cptr<TestType>(ct), R, C, ignore, red,
                                      cptr<int64_t>(count), ptr<TestType>(out), cache);
        });
      };
      backward_kernel(dx, true);
      Tensor dx_nc = nan_tensor(x.shape(), dt);
      backward_kernel(dx_nc, false);
      CHECK(testing::bitwise_equal(dx_nc, dx));
      CHECK(count.item() == 7);  // rows 1 and 5 ignored
      CHECK_FALSE(testing::emu::reported().any);
      // The CPU kernels.
      const int64_t n = kc::check_labels(labels, C, ignore, labels.shape(), "cross_entropy");
      Tensor want_loss = empty(lshape, dt), want_dx = empty(x.shape(), dt);
      kc::cross_entropy(x, labels, ignore, cred, n, want_loss);
      kc::cross_entropy_backward(x, labels, ct, ignore, cred, n, want_dx);
      CHECK(testing::rel_error(loss, want_loss) <= tol);
      CHECK(testing::rel_error(dx, want_dx) <= tol);
      // Fused: labels, fused, total; bitwise the separate kernels' results.
      rows = nan_tensor(Shape{R}, DType::f64);
      labels_kernel();
      testing::emu::launch(4, 1, kRowThreads, size_t(C) * sizeof(TestType), [&](unsigned char* smem) {
        TestType* cache = reinterpret_cast<TestType*>(smem);
        if (l64)
          rk::ce_fused<HostPrim>(cptr<TestType>(x), cptr<int64_t>(labels), cptr<TestType>(ct), R, C, ignore, red,
                                 cptr<int64_t>(count), ptr<TestType>(loss_f), ptr<double>(rows), ptr<TestType>(dx_f), cache);
        else
          rk::ce_fused<HostPrim>(cptr<TestType>(x), cptr<int32_t>(labels), cptr<TestType>(ct), R, C, ignore, red,
                                 cptr<int64_t>(count), ptr<TestType>(loss_f), ptr<double>(rows), ptr<TestType>(dx_f), cache);
      });
      total_kernel(loss_f);
      CHECK(testing::bitwise_equal(loss_f, loss));
      CHECK(testing::bitwise_equal(dx_f, dx));
    }
  }
  SECTION("a label out of range is reported once (the first), its row's loss and gradient NaN") {
    std::vector<int64_t> bad = lv;
    bad[3] = C + 4;
    bad[6] = -7;
    const Tensor labels = from_vector(bad, Shape{R});
    Tensor count = full(Shape{}, -1.0, DType::i64), loss = nan_tensor(Shape{R}, dt), dx = nan_tensor(x.shape(), dt);
    Tensor rows = nan_tensor(Shape{R}, DType::f64);
    const Tensor ct = testing::randn64(fold_in(key, 3), Shape{R}).astype(dt);
    testing::emu::reset_report();
    testing::emu::launch(1, 1, 1024, 0, [&](unsigned char*) {
      rk::ce_labels<HostPrim>(cptr<int64_t>(labels), R, C, ignore, ptr<int64_t>(count), kernels::cuda::ReportSlot{});
    });
    testing::emu::launch(4, 1, kRowThreads, 0, [&](unsigned char*) {
      rk::ce_fused<HostPrim>(cptr<TestType>(x), cptr<int64_t>(labels), cptr<TestType>(ct), R, C, ignore, 2,
                             cptr<int64_t>(count), ptr<TestType>(loss), ptr<double>(rows), ptr<TestType>(dx),
                             static_cast<TestType*>(nullptr));
    });
    REQUIRE(testing::emu::reported().any);
    const kernels::cuda::DeviceReport& r = testing::emu::reported().r;
    CHECK(r.code == kernels::cuda::kLabelOutOfRange);
    CHECK(((r.index == 3 && r.value == C + 4) || (r.index == 6 && r.value == -7)));  // either may win the race
    CHECK(r.bound == C);
    CHECK(r.aux == ignore);
    const std::vector<double> l = loss.astype(DType::f64).to_vector<double>();
    CHECK(std::isnan(l[3]));
    CHECK(std::isnan(l[6]));
    CHECK(std::isfinite(l[0]));
    CHECK(l[1] == 0.0);  // ignored
  }
}

TEMPLATE_TEST_CASE("row kernels, emulated: cross-entropy of f16 / bf16 logits is that of their f32 copy, bitwise", "[emulated]",
                   __half, __nv_bfloat16) {
  // 16-bit logits widen exactly and compute in f32: the f32 loss and the f32 gradient rounded once must be
  // bitwise what the f32 kernels give on the widened copy (the copy autocast no longer makes).
  using S = TestType;
  const DType dt = testing::emu::dtype_of<S>();
  const RngKey key = fresh_key();
  const int64_t R = 9, C = 333, ignore = -100;
  const Tensor x = (testing::randn64(fold_in(key, 1), Shape{R, C}) * 3.0).astype(dt), x32 = x.astype(DType::f32);
  std::vector<int64_t> lv;
  for (int64_t r = 0; r < R; ++r) lv.push_back(r % 4 == 1 ? ignore : (r * 37 + 5) % C);
  const Tensor labels = from_vector(lv, Shape{R});
  for (int red : {0, 1, 2}) {  // mean, sum, none
    INFO("reduction " << red);
    const Tensor ct = red == 2 ? testing::randn64(fold_in(key, 2), Shape{R}).astype(DType::f32) : scalar(0.75, DType::f32);
    const Shape lshape = red == 2 ? Shape{R} : Shape{};
    // The fused kernel (labels, loss and gradient with the row cached, total) on logits stored as T.
    auto fused = [&]<class T>(const Tensor& logits, Tensor& loss, Tensor& dx) {
      Tensor count = full(Shape{}, -1.0, DType::i64), rows = nan_tensor(Shape{R}, DType::f64);
      testing::emu::launch(1, 1, 1024, 0, [&](unsigned char*) {
        rk::ce_labels<HostPrim>(cptr<int64_t>(labels), R, C, ignore, ptr<int64_t>(count), kernels::cuda::ReportSlot{});
      });
      testing::emu::launch(4, 1, kRowThreads, size_t(C) * sizeof(T), [&](unsigned char* smem) {
        rk::ce_fused<HostPrim>(cptr<T>(logits), cptr<int64_t>(labels), cptr<float>(ct), R, C, ignore, red, cptr<int64_t>(count),
                               ptr<float>(loss), ptr<double>(rows), ptr<T>(dx), reinterpret_cast<T*>(smem));
      });
      if (red != 2)
        testing::emu::launch(1, 1, 1024, 0, [&](unsigned char*) {
          rk::ce_total<HostPrim>(cptr<double>(rows), R, red, cptr<int64_t>(count), ptr<float>(loss));
        });
      // The backward alone, without a cache: bitwise the fused gradient.
      Tensor dx_b = nan_tensor(logits.shape(), logits.dtype());
      testing::emu::launch(4, 1, kRowThreads, 0, [&](unsigned char*) {
        rk::ce_backward<HostPrim>(cptr<T>(logits), cptr<int64_t>(labels), cptr<float>(ct), R, C, ignore, red,
                                  cptr<int64_t>(count), ptr<T>(dx_b), static_cast<T*>(nullptr));
      });
      CHECK(testing::bitwise_equal(dx_b, dx));
    };
    Tensor loss = nan_tensor(lshape, DType::f32), dx = nan_tensor(x.shape(), dt);
    Tensor loss32 = nan_tensor(lshape, DType::f32), dx32 = nan_tensor(x.shape(), DType::f32);
    fused.template operator()<S>(x, loss, dx);
    fused.template operator()<float>(x32, loss32, dx32);
    CHECK(testing::bitwise_equal(loss, loss32));
    CHECK(testing::bitwise_equal(dx, dx32.astype(dt)));
    CHECK(std::isfinite(loss.astype(DType::f64).to_vector<double>()[0]));
  }
}

TEMPLATE_TEST_CASE("row kernels, emulated: layer norm forward and backward match the CPU", "[emulated]", float, double) {
  const DType dt = std::is_same_v<TestType, float> ? DType::f32 : DType::f64;
  const double tol = dt == DType::f32 ? 1e-5 : 1e-12;
  const RngKey key = fresh_key();
  // R: two full chunks of dw / db's stage 1 and a partial one; D: ten 32-column tiles, the last partial.
  // The block-per-row forward and dx run on the first Rb rows (their barriers make every emulated row
  // costly); dw / db on all R, from the rows' mean and rstd computed here.
  const int64_t R = 2 * rk::kLnChunkRows + 88, Rb = 6, D = 300;
  const double eps = 1e-5;
  const Tensor x = (testing::randn64(fold_in(key, 1), Shape{R, D}) * 2.0 + 0.5).astype(dt);
  const Tensor w = testing::randn64(fold_in(key, 2), Shape{D}).astype(dt), b = testing::randn64(fold_in(key, 3), Shape{D}).astype(dt);
  const Tensor dy = testing::randn64(fold_in(key, 4), Shape{R, D}).astype(dt);
  const Tensor xb = x.slice(0, 0, Rb).contiguous(), dyb = dy.slice(0, 0, Rb).contiguous();
  std::vector<double> host_stats(size_t(2 * R));
  const std::vector<double> xs = x.astype(DType::f64).to_vector<double>();
  for (int64_t r = 0; r < R; ++r) {
    double mean = 0, var = 0;
    for (int64_t j = 0; j < D; ++j) mean += xs[size_t(r * D + j)] / double(D);
    for (int64_t j = 0; j < D; ++j) var += (xs[size_t(r * D + j)] - mean) * (xs[size_t(r * D + j)] - mean) / double(D);
    host_stats[size_t(2 * r)] = mean;
    host_stats[size_t(2 * r + 1)] = 1.0 / std::sqrt(var + eps);
  }
  for (bool affine : {true, false}) {
    INFO("affine " << affine);
    const Tensor* wp = affine ? &w : nullptr;
    const Tensor* bp = affine ? &b : nullptr;
    Tensor y = nan_tensor(xb.shape(), dt), want_y = empty(xb.shape(), dt);
    testing::emu::launch(4, 1, kRowThreads, 0, [&](unsigned char*) {
      rk::layer_norm<HostPrim>(cptr<TestType>(xb), wp ? cptr<TestType>(*wp) : nullptr, bp ? cptr<TestType>(*bp) : nullptr, Rb, D,
                               eps, ptr<TestType>(y));
    });
    kc::layer_norm(xb, wp, bp, eps, want_y);
    CHECK(testing::rel_error(y, want_y) <= tol);
    Tensor dx = nan_tensor(xb.shape(), dt), stats = nan_tensor(Shape{2 * Rb}, DType::f64);
    testing::emu::launch(4, 1, kRowThreads, 0, [&](unsigned char*) {
      rk::layer_norm_dx<HostPrim>(cptr<TestType>(dyb), cptr<TestType>(xb), wp ? cptr<TestType>(*wp) : nullptr,
                                  static_cast<const TestType*>(nullptr), Rb, D, eps, ptr<TestType>(dx), ptr<double>(stats));
    });
    Tensor want_dx = empty(xb.shape(), dt);
    kc::layer_norm_backward(dyb, xb, wp, eps, want_dx, nullptr, nullptr);
    CHECK(testing::rel_error(dx, want_dx) <= tol);
    {  // with the residual stream's other gradient: bitwise dx, then a separate add
      const Tensor res = testing::randn64(fold_in(key, 5), xb.shape()).astype(dt);
      Tensor dxr = nan_tensor(xb.shape(), dt);
      testing::emu::launch(4, 1, kRowThreads, 0, [&](unsigned char*) {
        rk::layer_norm_dx<HostPrim>(cptr<TestType>(dyb), cptr<TestType>(xb), wp ? cptr<TestType>(*wp) : nullptr,
                                    cptr<TestType>(res), Rb, D, eps, ptr<TestType>(dxr), nullptr);
      });
      CHECK(testing::bitwise_equal(dxr, dx + res));
    }
    const std::vector<double> st = stats.to_vector<double>();
    for (int64_t i = 0; i < 2 * Rb; ++i)
      CHECK(std::fabs(st[size_t(i)] - host_stats[size_t(i)]) <= 1e-12 * (1.0 + std::fabs(host_stats[size_t(i)])));
    // dw / db over all R rows.
    Tensor dw = nan_tensor(Shape{D}, dt), db = nan_tensor(Shape{D}, dt);
    Tensor partial = nan_tensor(Shape{2 * rk::ln_chunks(R) * D}, DType::f64);
    testing::emu::launch(4, 2, kRowThreads, 0, [&](unsigned char*) {  // blocks loop over tiles and chunks
      rk::layer_norm_dwdb_partial<HostPrim>(cptr<TestType>(dy), cptr<TestType>(x), host_stats.data(), R, D,
                                            ptr<double>(partial));
    });
    testing::emu::launch(1, 1, kRowThreads, 0, [&](unsigned char*) {  // 256 threads over 300 columns
      rk::layer_norm_dwdb_total<HostPrim>(cptr<double>(partial), R, D, ptr<TestType>(dw), ptr<TestType>(db));
    });
    Tensor full_dx = empty(x.shape(), dt), want_dw = empty(Shape{D}, dt), want_db = empty(Shape{D}, dt);
    kc::layer_norm_backward(dy, x, wp, eps, full_dx, &want_dw, &want_db);
    CHECK(testing::rel_error(dw, want_dw) <= (dt == DType::f32 ? 1e-4 : 1e-12));
    CHECK(testing::rel_error(db, want_db) <= (dt == DType::f32 ? 1e-4 : 1e-12));
  }
}

TEST_CASE("row kernels, emulated: layer norm's warp-per-row f32 bodies match the CPU", "[emulated]") {
  const RngKey key = fresh_key();
  const double eps = 1e-5;
  // 37 rows over 24 warps (a warp takes two rows, some one); D (with the float4 per lane nn.cu takes):
  // ragged over the lanes (300 with 4: 75 float4, so lanes 11-31 hold two and the others three), GPT-2's 768
  // (6), the largest the path takes (8), and one float4 (2).
  const int64_t R = 37;
  for (const int64_t D : {int64_t(300), int64_t(768), int64_t(128 * rk::kLnWarpVecs), int64_t(4)}) {
    REQUIRE(rk::ln_warp_rows(D));
    const Tensor x = (testing::randn64(fold_in(key, uint64_t(D)), Shape{R, D}) * 2.0 + 0.5).astype(DType::f32);
    const Tensor w = testing::randn64(fold_in(key, 2), Shape{D}).astype(DType::f32);
    const Tensor b = testing::randn64(fold_in(key, 3), Shape{D}).astype(DType::f32);
    const Tensor dy = testing::randn64(fold_in(key, 4), Shape{R, D}).astype(DType::f32);
    for (bool affine : {true, false}) {
      INFO("D " << D << " affine " << affine);
      const float* wp = affine ? cptr<float>(w) : nullptr;
      const float* bp = affine ? cptr<float>(b) : nullptr;
      Tensor y = nan_tensor(x.shape(), DType::f32), dx = nan_tensor(x.shape(), DType::f32);
      Tensor stats = nan_tensor(Shape{2 * R}, DType::f64);
      rk::with_ln_warp_vecs(D, [&](auto kv) {
        constexpr int KV = decltype(kv)::value;
        testing::emu::launch(3, 1, kRowThreads, 0, [&](unsigned char*) {
          rk::layer_norm_warp<HostPrim, KV>(cptr<float>(x), wp, bp, R, D, eps, ptr<float>(y));
        });
        testing::emu::launch(3, 1, kRowThreads, 0, [&](unsigned char*) {
          rk::layer_norm_dx_warp<HostPrim, KV>(cptr<float>(dy), cptr<float>(x), wp, nullptr, R, D, eps, ptr<float>(dx),
                                               ptr<double>(stats));
        });
        // With the residual stream's other gradient: bitwise dx, then a separate add.
        const Tensor res = testing::randn64(fold_in(key, 6), x.shape()).astype(DType::f32);
        Tensor dxr = nan_tensor(x.shape(), DType::f32);
        testing::emu::launch(3, 1, kRowThreads, 0, [&](unsigned char*) {
          rk::layer_norm_dx_warp<HostPrim, KV>(cptr<float>(dy), cptr<float>(x), wp, cptr<float>(res), R, D, eps,
                                               ptr<float>(dxr), nullptr);
        });
        CHECK(testing::bitwise_equal(dxr, dx + res));
      });
      Tensor want_y = empty(x.shape(), DType::f32), want_dx = empty(x.shape(), DType::f32);
      kc::layer_norm(x, affine ? &w : nullptr, affine ? &b : nullptr, eps, want_y);
      kc::layer_norm_backward(dy, x, affine ? &w : nullptr, eps, want_dx, nullptr, nullptr);
      CHECK(testing::rel_error(y, want_y) <= 1e-5);
      CHECK(testing::rel_error(dx, want_dx) <= 1e-5);
      // The rows' mean and rstd (for dw / db) against the CPU's, in f64.
      const std::vector<double> st = stats.to_vector<double>(), xs = x.astype(DType::f64).to_vector<double>();
      double worst = 0;
      for (int64_t r = 0; r < R; ++r) {
        double mean = 0, var = 0;
        for (int64_t j = 0; j < D; ++j) mean += xs[size_t(r * D + j)] / double(D);
        for (int64_t j = 0; j < D; ++j) var += (xs[size_t(r * D + j)] - mean) * (xs[size_t(r * D + j)] - mean) / double(D);
        const double rstd = 1.0 / std::sqrt(var + eps);
        worst = std::max(worst, std::fabs(st[size_t(2 * r)] - mean) / (1.0 + std::fabs(mean)));
        worst = std::max(worst, std::fabs(st[size_t(2 * r + 1)] - rstd) / rstd);
      }
      CHECK(worst <= 1e-12);
    }
  }
}

TEMPLATE_TEST_CASE("row kernels, emulated: the vocabulary-parallel cross-entropy's shard kernels match the CPU's", "[emulated]",
                   float, double) {
  const DType dt = std::is_same_v<TestType, float> ? DType::f32 : DType::f64;
  const double tol = dt == DType::f32 ? 1e-5 : 1e-12;
  const RngKey key = fresh_key();
  // This rank's shard: columns lo .. lo + C - 1 of a vocabulary of 3 C; labels in every shard, some ignored.
  const int64_t R = 9, C = 111, lo = C, ignore = -100;
  const Tensor x = (testing::randn64(fold_in(key, 1), Shape{R, C}) * 3.0).astype(dt);
  std::vector<int64_t> lv;
  for (int64_t r = 0; r < R; ++r) lv.push_back(r % 4 == 1 ? ignore : (r * 37 + 5) % (3 * C));
  const Tensor gmax_all = testing::randn64(fold_in(key, 2), Shape{R}) + 9.0;  // a larger max from another shard
  for (DType lt : {DType::i64, DType::i32}) {
    INFO("labels " << dtype_name(lt));
    const Tensor labels = from_vector(lv, Shape{R}, lt);
    const bool l64 = lt == DType::i64;
    Tensor want_max = nan_tensor(Shape{R}, DType::f64), got_max = nan_tensor(Shape{R}, DType::f64);
    kc::ce_shard_max(x, want_max);
    testing::emu::launch(4, 1, kRowThreads, 0, [&](unsigned char*) { rk::ce_shard_max<HostPrim>(cptr<TestType>(x), R, C, ptr<double>(got_max)); });
    CHECK(testing::bitwise_equal(got_max, want_max));
    Tensor want_part = nan_tensor(Shape{2, R}, DType::f64), got_part = nan_tensor(Shape{2, R}, DType::f64);
    kc::ce_shard_partials(x, labels, lo, gmax_all, want_part);
    testing::emu::launch(4, 1, kRowThreads, 0, [&](unsigned char*) {
      if (l64) rk::ce_shard_partials<HostPrim>(cptr<TestType>(x), cptr<int64_t>(labels), R, C, lo, cptr<double>(gmax_all), ptr<double>(got_part));
      else rk::ce_shard_partials<HostPrim>(cptr<TestType>(x), cptr<int32_t>(labels), R, C, lo, cptr<double>(gmax_all), ptr<double>(got_part));
    });
    CHECK(testing::rel_error(got_part.slice(0, 0, 1), want_part.slice(0, 0, 1)) <= tol);  // sums in another order
    CHECK(testing::bitwise_equal(got_part.slice(0, 1, 2).contiguous(), want_part.slice(0, 1, 2).contiguous()));  // the label's logit
    // The backward from all-reduced stats (gmax_all, the shard's sums standing in for the global ones).
    const Tensor stats = concat({gmax_all.reshape(Shape{1, R}), want_part.slice(0, 0, 1) * 3.0}, 0).contiguous();
    const Tensor ct_none = testing::randn64(fold_in(key, 3), Shape{R}).astype(dt), ct_one = scalar(0.75, dt);
    const int64_t count = 7;  // the labels that are not ignored
    for (int red : {0, 1, 2}) {
      INFO("reduction " << red);
      const kc::LossReduction cred = red == 0 ? kc::LossReduction::mean : red == 1 ? kc::LossReduction::sum : kc::LossReduction::none;
      const Tensor& ct = red == 2 ? ct_none : ct_one;
      Tensor want = nan_tensor(x.shape(), dt), got = nan_tensor(x.shape(), dt);
      kc::ce_shard_backward(x, labels, lo, stats, ct, ignore, cred, count, want);
      testing::emu::launch(4, 1, kRowThreads, 0, [&](unsigned char*) {
        if (l64)
          rk::ce_shard_backward<HostPrim>(cptr<TestType>(x), cptr<int64_t>(labels), cptr<TestType>(ct), R, C, lo, cptr<double>(stats),
                                          ignore, red, count, ptr<TestType>(got));
        else
          rk::ce_shard_backward<HostPrim>(cptr<TestType>(x), cptr<int32_t>(labels), cptr<TestType>(ct), R, C, lo, cptr<double>(stats),
                                          ignore, red, count, ptr<TestType>(got));
      });
      CHECK(testing::rel_error(got, want) <= tol);
    }
  }
}
