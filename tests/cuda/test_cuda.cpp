// CUDA backend tests (titanax_cuda_tests): every op case of tests/op_cases.h run on the GPU against the
// CPU on fresh random inputs (f32), forward and gradients, with every CUDA allocation poisoned (NaN)
// first so elements a kernel leaves unwritten fail; plus the caching allocator's statistics and
// Tensor::to round trips. On a machine without a GPU the binary prints why and exits 77, which CTest
// reports as skipped.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/allocator.h"
#include "core/cuda_runtime.h"
#include "kernels/cpu/optim.h"
#include "kernels/cuda/kernels.h"
#include "cuda_test_util.h"
#include "op_cases.h"

using namespace titanax;

namespace {

// Runs before Catch's main: skip (77) without a GPU; poison CUDA allocations before the pool exists.
const bool kReady = [] {
  if (!cuda_rt::built_with_cuda() || cuda_rt::device_count() == 0) {
    std::printf("titanax_cuda_tests: skipped: %s\n",
                cuda_rt::built_with_cuda() ? "no CUDA device is visible (cudaGetDeviceCount is 0 or failed)"
                                           : "this build has no CUDA backend");
    std::fflush(stdout);
    std::exit(77);
  }
  setenv("TITANAX_CUDA_POISON", "1", 1);
  return true;
}();

using testing::rel_error;

bool is_reduction_like(const std::string& name) {
  for (const char* k : {"sum", "mean", "max", "min", "logsumexp", "softmax", "entropy", "norm", "matmul", "linear",
                        "embedding", "take", "attention", "gpt", "mlp"})
    if (name.find(k) != std::string::npos) return true;
  return false;
}

TensorList as_f32(const TensorList& in, Device d) {
  TensorList out;
  for (const auto& t : in) out.push_back((is_floating(t.dtype()) ? t.astype(DType::f32) : t).detach().to(d));
  return out;
}

}  // namespace

TEST_CASE("cuda: every op case matches the CPU (forward and gradients, f32)") {
  REQUIRE(kReady);
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed << " (rerun with TITANAX_TEST_SEED=" << seed << ")");
  const RngKey base = RngKey::from_seed(seed);
  int ran = 0, unsupported = 0;
  for (const auto& c : testing::op_cases()) {
    INFO("case " << c.name);
    const RngKey key = fold_in(base, std::hash<std::string>{}(c.name));
    TensorList in64 = c.inputs(key);
    TensorList cpu_in = as_f32(in64, Device::cpu()), gpu_in = as_f32(in64, Device::cuda(0));
    Tensor want, got;
    try {
      got = c.fn(gpu_in);
    } catch (const DeviceError& e) {  // an op without a CUDA kernel yet: reported, not failed
      ++unsupported;
      WARN("no CUDA kernel: " << c.name << ": " << e.what());
      continue;
    }
    want = c.fn(cpu_in);
    const double tol = is_reduction_like(c.name) ? 1e-4 : 1e-5;
    CHECK(got.device() == Device::cuda(0));
    CHECK(got.shape() == want.shape());
    CHECK(rel_error(got, want) < tol);
    ++ran;
    if (!c.check_grad || !is_floating(want.dtype())) continue;
    // Gradients of sum(y * w) for a random w: exercises the backward kernels.
    for (auto* ins : {&cpu_in, &gpu_in})
      for (auto& t : *ins)
        if (is_floating(t.dtype())) t.set_requires_grad(true);
    Tensor w = testing::randn64(fold_in(key, 99), want.shape()).astype(DType::f32);
    sum(mul(c.fn(cpu_in), w)).backward();
    try {
      sum(mul(c.fn(gpu_in), w.to(Device::cuda(0)))).backward();
    } catch (const DeviceError& e) {
      ++unsupported;
      WARN("no CUDA kernel in the backward of " << c.name << ": " << e.what());
      continue;
    }
    for (size_t i = 0; i < cpu_in.size(); ++i) {
      if (!cpu_in[i].grad().defined()) continue;
      INFO("gradient of input " << i);
      REQUIRE(gpu_in[i].grad().defined());
      CHECK(rel_error(gpu_in[i].grad(), cpu_in[i].grad()) < 1e-4);
    }
  }
  std::printf("cuda op cases: %d ran, %d without a CUDA kernel\n", ran, unsupported);
  CHECK(ran > 0);
}

TEST_CASE("cuda: Tensor::to round trips and strided device copies") {
  Tensor x = testing::randn64(RngKey::from_seed(testing::fresh_seed()), Shape{5, 7}).astype(DType::f32);
  Tensor d = x.to(Device::cuda(0));
  CHECK(d.device() == Device::cuda(0));
  CHECK(rel_error(d, x) == 0.0);
  CHECK(rel_error(d.T().contiguous(), x.T().contiguous()) == 0.0);  // strided copy kernel
  CHECK(rel_error(d.astype(DType::f64), x.astype(DType::f64)) == 0.0);
  Tensor i = from_vector(std::vector<int64_t>{1, -2, 3}, Shape{3}).to(Device::cuda(0));
  CHECK(i.to(Device::cpu()).to_vector<int64_t>() == std::vector<int64_t>{1, -2, 3});
}

TEST_CASE("cuda: caching allocator statistics") {
  Allocator& a = cuda_allocator(0);
  a.empty_cache();
  const AllocatorStats s0 = a.stats();
  {
    Tensor t = empty(Shape{1 << 20}, DType::f32, Device::cuda(0));  // 4 MiB: a fresh cudaMalloc
    const AllocatorStats s1 = a.stats();
    CHECK(s1.current_bytes - s0.current_bytes >= int64_t(4) << 20);
    CHECK(s1.num_system_allocs == s0.num_system_allocs + 1);
    CHECK(s1.peak_bytes >= s1.current_bytes);
  }
  const AllocatorStats s2 = a.stats();
  CHECK(s2.current_bytes == s0.current_bytes);
  CHECK(s2.reserved_bytes > s0.reserved_bytes);  // cached, not returned
  {
    Tensor t = empty(Shape{1 << 20}, DType::f32, Device::cuda(0));  // same size class, same stream: reused
    CHECK(a.stats().num_system_allocs == s2.num_system_allocs);
  }
  a.empty_cache();
  CHECK(a.stats().reserved_bytes == s0.reserved_bytes);  // the cached 4 MiB went back to the driver
  a.reset_peak();
  CHECK(a.stats().peak_bytes == a.stats().current_bytes);
}

TEST_CASE("cuda: out of memory is an OutOfMemoryError with the statistics") {
  bool threw = false;
  try {
    Tensor t = empty(Shape{int64_t(1) << 50}, DType::u8, Device::cuda(0));  // 1 PiB
  } catch (const OutOfMemoryError& e) {
    threw = true;
    CHECK(std::string(e.what()).find("reserved=") != std::string::npos);
  }
  CHECK(threw);
}

TEST_CASE("cuda: fused AdamW matches the CPU update") {
  const RngKey key = RngKey::from_seed(testing::fresh_seed());
  std::vector<Tensor> p, g, m, v, dp, dg, dm, dv;
  for (int i = 0; i < 30; ++i) {  // more than one 24-tensor chunk
    Shape s{int64_t(3 + i * 37)};
    p.push_back(testing::randn64(fold_in(key, 4 * i), s).astype(DType::f32));
    g.push_back(testing::randn64(fold_in(key, 4 * i + 1), s).astype(DType::f32));
    m.push_back(zeros(s));
    v.push_back(zeros(s));
    using L = std::vector<Tensor>;
    const std::pair<L*, L*> pairs[] = {{&p, &dp}, {&g, &dg}, {&m, &dm}, {&v, &dv}};
    for (auto [src, dst] : pairs) dst->push_back(src->back().to(Device::cuda(0)));
  }
  // Step 1 with the scalars by value, step 2 with them read from device memory (as a captured CUDA graph
  // does), step 3 skipped (apply 0: nothing moves), each against the CPU kernel.
  Tensor on_device = empty(Shape{kernels::UpdateScalars::size}, DType::f64, Device::cuda(0));
  for (int64_t t = 1; t <= 3; ++t) {
    INFO("step " << t);
    const kernels::UpdateScalars sc = kernels::adam_scalars(1e-3 * double(t), 0.9, 0.999, 0.1, t, t != 3);
    for (size_t i = 0; i < p.size(); ++i)
      kernels::cpu::adam_update(p[i].data<float>(), g[i].data<float>(), m[i].data<float>(), v[i].data<float>(),
                                p[i].numel(), sc, 0.9, 0.999, 1e-8, 0.1, true);
    if (t == 1) {
      kernels::cuda::adam_update(dp, dg, dm, dv, sc, 0.9, 0.999, 1e-8, 0.1, true);
    } else {
      kernels::cuda::set_update_scalars(on_device, sc);
      kernels::cuda::adam_update(dp, dg, dm, dv, kernels::UpdateScalars{}, 0.9, 0.999, 1e-8, 0.1, true, &on_device);
    }
    for (size_t i = 0; i < p.size(); ++i) {
      CHECK(rel_error(dp[i], p[i]) < 1e-5);
      CHECK(rel_error(dm[i], m[i]) < 1e-5);
      CHECK(rel_error(dv[i], v[i]) < 1e-5);
    }
  }
  CHECK(on_device.to(Device::cpu()).to_vector<double>()[0] == 0.0);  // the skipped step's apply flag
}

TEST_CASE("cuda: matmul and linear on views at odd offsets (cuBLASLt's alignment preferences) match the CPU") {
  // Row 1 onwards of [rows + 1, k] with k odd: each operand starts 4 (f32) or 2 (bf16) bytes past an
  // aligned address, and the leading dimensions are odd, so an algorithm picked for 256-byte aligned
  // operands may not run on them; the bias is a view at an odd offset too.
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  for (DType t : {DType::f32, DType::bf16}) {
    INFO(dtype_name(t));
    const double tol = t == DType::f32 ? 1e-5 : 1e-2;
    const Tensor xb = testing::randn64(fold_in(key, 1), Shape{65, 257}).astype(t);
    const Tensor wb = (testing::randn64(fold_in(key, 2), Shape{97, 257}) * 0.1).astype(t);
    const Tensor bb = testing::randn64(fold_in(key, 3), Shape{97}).astype(t);
    const Tensor mb = testing::randn64(fold_in(key, 4), Shape{258, 41}).astype(t);
    const Tensor x = xb.slice(0, 1, 65), w = wb.slice(0, 1, 97), b = bb.slice(0, 1, 97), m = mb.slice(0, 1, 258);
    const Device g = Device::cuda(0);
    const Tensor xg = xb.to(g).slice(0, 1, 65), wg = wb.to(g).slice(0, 1, 97), bg = bb.to(g).slice(0, 1, 97),
                 mg = mb.to(g).slice(0, 1, 258);
    REQUIRE(xg.is_contiguous());
    REQUIRE(reinterpret_cast<uintptr_t>(xg.raw_data()) % 8 != 0);
    const Tensor want_lin = linear(x.astype(DType::f64), w.astype(DType::f64), b.astype(DType::f64));
    const Tensor want_mm = matmul(x.astype(DType::f64), m.astype(DType::f64));
    const Tensor lin = linear(xg, wg, bg), mm = matmul(xg, mg);
    CHECK(rel_error(lin, want_lin) <= tol);
    CHECK(rel_error(mm, want_mm) <= tol);
    // A second call of each problem takes its algorithm from the cache: the same result, bitwise.
    CHECK(testing::bitwise_equal(linear(xg, wg, bg), lin));
    CHECK(testing::bitwise_equal(matmul(xg, mg), mm));
    // The same problems on aligned copies (another cache entry, maybe another algorithm).
    CHECK(rel_error(linear(xg.clone(), wg.clone(), bg.clone()), want_lin) <= tol);
    CHECK(rel_error(matmul(xg.clone(), mg.clone()), want_mm) <= tol);
  }
}

TEST_CASE("cuda: matmul reads transposed, column-sliced and batched views without copies, and matches the CPU") {
  // cuBLASLt takes a transposed operand (a weight gradient's dY^T) by its op flag and a column slice by
  // its leading dimension; these must give what the CPU gives on the same views.
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  const Device g = Device::cuda(0);
  auto pair = [&](uint64_t k, const Shape& s) {
    const Tensor h = testing::randn64(fold_in(key, k), s).astype(DType::f32);
    return std::make_pair(h, h.to(g));
  };
  auto check = [&](const Tensor& a, const Tensor& b, const Tensor& ag, const Tensor& bg) {
    CHECK(rel_error(matmul(ag, bg), matmul(a.astype(DType::f64), b.astype(DType::f64))) <= 1e-5);
  };
  const auto [x, xg] = pair(1, Shape{96, 33});    // [rows, in]
  const auto [dy, dyg] = pair(2, Shape{96, 40});  // [rows, out]
  const auto [w, wg] = pair(3, Shape{40, 33});    // [out, in]
  check(dy.T(), x, dyg.T(), xg);                  // dW = dY^T X: A transposed
  check(x, w.T(), xg, wg.T());                    // X W^T: B transposed
  const auto [wide, wideg] = pair(4, Shape{96, 50});
  check(wide.slice(1, 3, 36), w.T(), wideg.slice(1, 3, 36), wg.T());  // a column slice: ld 50 > 33 columns
  const auto [p, pg] = pair(5, Shape{4, 33, 96});  // batched, each matrix transposed by the permute
  const auto [q, qg] = pair(6, Shape{4, 33, 7});
  check(p.permute({0, 2, 1}), q, pg.permute({0, 2, 1}), qg);
  check(p.permute({0, 2, 1}), w.T(), pg.permute({0, 2, 1}), wg.T());  // B broadcast over the batch: copied
  // A weight for every batch ([B, T, in] @ W^T, and a linear layer's input gradient dY @ W on [B, T,
  // out]): one GEMM over B * T rows.
  const auto [x3, x3g] = pair(7, Shape{4, 24, 33});
  const auto [dy3, dy3g] = pair(8, Shape{4, 24, 40});
  check(x3, w.T(), x3g, wg.T());
  check(dy3, w, dy3g, wg);
  check(dy3.slice(1, 2, 20), w, dy3g.slice(1, 2, 20), wg);  // batches not stacked row blocks: a batched GEMM
}
