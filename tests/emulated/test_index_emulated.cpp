// The gather, deterministic scatter-add and dropout kernels (kernels/cuda/index.cuh) run on the CPU through
// the emulated GPU primitives of emulator.h, against the CPU kernels (kernels/cpu/nn.h) on fresh random
// inputs: gather and scatter-add bitwise (the same elements summed in the same order: the scatter's
// stable radix sort on the device is a std::stable_sort here), one-hot rows in several dtypes, dropout
// bitwise (the same Philox mask;
// f16 / bf16 against the CPU's f32 dropout of the widened input, rounded once).
// Outputs start as NaN, so an element left unwritten fails; a grid of 3 blocks of 64 threads makes every
// kernel stride. An index out of range is reported (first report wins) and its outputs are NaN (one-hot:
// its row is zeros).
#include <catch2/catch.hpp>

#include <algorithm>
#include <numeric>
#include <vector>

#include "kernels/cuda/index.cuh"

#include "cuda/cuda_test_util.h"
#include "emu_test_util.h"
#include "emulator.h"
#include "kernels/cpu/nn.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;
namespace ik = titanax::kernels::cuda::index_kernels;
using testing::emu::HostPrim;
using testing::emu::launch_strided;
using testing::emu::fresh_key;
using testing::emu::cptr;
using testing::emu::ptr;
using testing::emu::nan_tensor;

namespace {

// Random indices in [0, n) (repeats included) as I.
template <class I>
Tensor random_indices(RngKey key, int64_t K, int64_t n) {
  const std::vector<double> u = random_uniform(key, Shape{K}, DType::f64).to_vector<double>();
  std::vector<I> idx(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) idx[size_t(k)] = I(std::min<int64_t>(int64_t(u[size_t(k)] * double(n)), n - 1));
  return from_vector(idx, Shape{K});
}

// The emulated report slot holds a kIndexOutOfRange report with these fields.
void check_index_report(int64_t index, int64_t value, int64_t bound, int64_t aux) {
  REQUIRE(testing::emu::reported().any);
  const kernels::cuda::DeviceReport& r = testing::emu::reported().r;
  CHECK(r.code == kernels::cuda::kIndexOutOfRange);
  CHECK(r.index == index);
  CHECK(r.value == value);
  CHECK(r.bound == bound);
  CHECK(r.aux == aux);
}

}  // namespace

TEMPLATE_TEST_CASE("gather / scatter-add kernels, emulated: bitwise the CPU's, indices i32 and i64", "[emulated]", float,
                   double) {
  const RngKey key = fresh_key();
  const DType dt = std::is_same_v<TestType, float> ? DType::f32 : DType::f64;
  const int64_t A = 3, n = 11, B = 5, K = 40;  // 40 indices over 11 rows: repeats, and some rows never hit
  for (bool idx64 : {false, true}) {
    INFO("i64 indices " << idx64);
    const Tensor idx = idx64 ? random_indices<int64_t>(fold_in(key, 1), K, n) : random_indices<int32_t>(fold_in(key, 1), K, n);
    const kernels::cuda::ReportSlot slot{};
    testing::emu::reset_report();
    // gather: out [A, K, B] = x [A, n, B] at the indices.
    const Tensor x = testing::randn64(fold_in(key, 2), Shape{A, n, B}).astype(dt);
    Tensor want = nan_tensor(Shape{A, K, B}, dt), got = nan_tensor(Shape{A, K, B}, dt);
    kernels::cpu::gather(x, idx, A, n, B, want);
    launch_strided([&] {
      if (idx64) ik::gather<HostPrim>(cptr<TestType>(x), cptr<int64_t>(idx), A, n, B, K, 0, slot, ptr<TestType>(got));
      else ik::gather<HostPrim>(cptr<TestType>(x), cptr<int32_t>(idx), A, n, B, K, 0, slot, ptr<TestType>(got));
    });
    CHECK(testing::bitwise_equal(got, want));
    // scatter-add: out [A, n, B] = the sums of g [A, K, B] by index, each row in increasing k.
    const Tensor g = testing::randn64(fold_in(key, 3), Shape{A, K, B}).astype(dt);
    Tensor swant = nan_tensor(Shape{A, n, B}, dt), sgot = nan_tensor(Shape{A, n, B}, dt);
    kernels::cpu::scatter_add(g, idx, A, n, B, swant);
    std::vector<uint64_t> keys(static_cast<size_t>(K)), sorted(static_cast<size_t>(K));
    std::vector<int64_t> ks(static_cast<size_t>(K)), ks_sorted(static_cast<size_t>(K)), row_start(static_cast<size_t>(n + 1), -1);
    launch_strided([&] {
      if (idx64) ik::scatter_keys<HostPrim>(cptr<int64_t>(idx), K, n, 0, slot, keys.data(), ks.data());
      else ik::scatter_keys<HostPrim>(cptr<int32_t>(idx), K, n, 0, slot, keys.data(), ks.data());
    });
    std::vector<int64_t> order(static_cast<size_t>(K));  // the device's stable radix sort of (keys, ks) by key
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return keys[size_t(a)] < keys[size_t(b)]; });
    for (int64_t e = 0; e < K; ++e) sorted[size_t(e)] = keys[size_t(order[size_t(e)])], ks_sorted[size_t(e)] = ks[size_t(order[size_t(e)])];
    launch_strided([&] { ik::row_starts<HostPrim>(sorted.data(), K, n, row_start.data()); });
    launch_strided([&] {
      ik::scatter_add<HostPrim>(cptr<TestType>(g), row_start.data(), ks_sorted.data(), A, n, B, K, ptr<TestType>(sgot));
    });
    CHECK(testing::bitwise_equal(sgot, swant));
    CHECK_FALSE(testing::emu::reported().any);
  }
  SECTION("an index out of range is reported, its gathered rows NaN and left out of every sum") {
    std::vector<int64_t> bad = random_indices<int64_t>(fold_in(key, 4), K, n).to_vector<int64_t>();
    bad[7] = n;
    const Tensor idx = from_vector(bad, Shape{K});
    const Tensor x = testing::randn64(fold_in(key, 5), Shape{A, n, B}).astype(dt);
    Tensor got = nan_tensor(Shape{A, K, B}, dt);
    testing::emu::reset_report();
    launch_strided([&] {
      ik::gather<HostPrim>(cptr<TestType>(x), cptr<int64_t>(idx), A, n, B, K, 3, kernels::cuda::ReportSlot{}, ptr<TestType>(got));
    });
    check_index_report(7, n, n, 3);
    const std::vector<double> o = got.astype(DType::f64).to_vector<double>();
    for (int64_t a = 0; a < A; ++a)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t b = 0; b < B; ++b) CHECK(std::isnan(o[size_t((a * K + k) * B + b)]) == (k == 7));
    std::vector<uint64_t> keys(static_cast<size_t>(K));
    std::vector<int64_t> ks(static_cast<size_t>(K));
    testing::emu::reset_report();
    launch_strided([&] {
      ik::scatter_keys<HostPrim>(cptr<int64_t>(idx), K, n, 3, kernels::cuda::ReportSlot{}, keys.data(), ks.data());
    });
    CHECK(testing::emu::reported().any);
    CHECK(keys[7] == uint64_t(n));  // sorts after row_start[n]: in no row's sum
  }
}

TEST_CASE("one-hot kernel, emulated: the CPU's rows in f32, bf16, i64 and bool; a bad label reported, its row zeros",
          "[emulated]") {
  const RngKey key = fresh_key();
  const int64_t R = 37, C = 11;
  const Tensor lab = random_indices<int64_t>(fold_in(key, 1), R, C).reshape(Shape{R});
  const Tensor lab32 = lab.astype(DType::i32);
  auto run = [&](const Tensor& labels, auto t, DType dt) {
    using T = decltype(t);
    Tensor got = nan_tensor(Shape{R, C}, DType::f64).astype(dt);
    const kernels::cuda::ReportSlot slot{};
    launch_strided([&] {
      if (labels.dtype() == DType::i64) ik::one_hot<HostPrim>(cptr<int64_t>(labels), R, C, slot, ptr<T>(got));
      else ik::one_hot<HostPrim>(cptr<int32_t>(labels), R, C, slot, ptr<T>(got));
    });
    return got;
  };
  testing::emu::reset_report();
  CHECK(testing::bitwise_equal(run(lab, float{}, DType::f32), one_hot(lab, C, DType::f32)));
  CHECK(testing::bitwise_equal(run(lab32, __nv_bfloat16{}, DType::bf16), one_hot(lab32, C, DType::bf16)));
  CHECK(testing::bitwise_equal(run(lab, int64_t{}, DType::i64), one_hot(lab, C, DType::i64)));
  CHECK(testing::bitwise_equal(run(lab32, bool{}, DType::bool_), one_hot(lab32, C, DType::bool_)));
  CHECK(!testing::emu::reported().any);
  // Label 11 at row 5: reported (first report wins), row 5 all zeros, the other rows still one-hot.
  Tensor bad = lab.clone();
  static_cast<int64_t*>(bad.raw_data())[5] = C;
  const Tensor got = run(bad, float{}, DType::f32);
  check_index_report(5, C, C, kernels::cuda::kOneHot);
  CHECK(sum(got.slice(0, 5, 6)).item() == 0.0);
  CHECK(sum(got).item() == double(R - 1));
  // One class: every label must be 0.
  const Tensor one = from_vector(std::vector<int32_t>{0, 1, 0}, Shape{3});
  Tensor got1 = nan_tensor(Shape{3, 1}, DType::f32);
  testing::emu::reset_report();
  launch_strided([&] { ik::one_hot<HostPrim>(cptr<int32_t>(one), 3, 1, kernels::cuda::ReportSlot{}, ptr<float>(got1)); });
  REQUIRE(testing::emu::reported().any);
  CHECK(testing::emu::reported().r.index == 1);
  CHECK(got1.to_vector<double>() == std::vector<double>{1, 0, 1});
}

TEMPLATE_TEST_CASE("dropout kernel, emulated: bitwise the CPU's Philox mask and scale", "[emulated]", float, double, __half,
                   __nv_bfloat16) {
  const RngKey key = fresh_key();
  using C = kernels::cuda::compute_t<TestType>;
  const DType dt = testing::emu::dtype_of<TestType>(), ct = testing::emu::dtype_of<C>();
  const int64_t n = 1001;  // not a multiple of 4: a partial last Philox block
  const Tensor x = testing::randn64(fold_in(key, 1), Shape{n}).astype(dt);
  for (double p : {0.1, 0.5}) {
    INFO("p " << p);
    const RngKey dk = fold_in(key, 2);
    Tensor want = nan_tensor(Shape{n}, ct), got = nan_tensor(Shape{n}, dt);
    kernels::cpu::dropout(x.astype(ct), p, dk, want);
    launch_strided([&] { ik::dropout<HostPrim>(cptr<TestType>(x), ptr<TestType>(got), n, p, C(1.0 / (1.0 - p)), dk.k0, dk.k1); });
    CHECK(testing::bitwise_equal(got, want.astype(dt)));
  }
}
