// Anomaly detection on the GPU (part of titanax_cuda_tests: skipped, exit 77, without a GPU; see
// test_cuda.cpp): device tensors are checked by a reduction read on the host (autodiff/anomaly.cpp), and
// the report must match what the CPU reports for the same values; a jit replay on the GPU runs node by
// node and names the member op of a fused (NVRTC) node.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>

#include "autodiff/anomaly.h"
#include "jit/graph.h"
#include "ops/ops.h"
#include "cuda_test_util.h"
#include "op_cases.h"
#include "test_util.h"

using namespace titanax;

namespace {
bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }
}  // namespace

TEST_CASE("cuda: count_non_finite and anomaly reports match the CPU's on fresh random inputs", "[anomaly]") {
  const uint64_t seed = testing::fresh_seed();
  INFO("TITANAX_TEST_SEED=" << seed);
  std::mt19937_64 gen(seed);
  // [37, 29] normal values with a NaN, a +inf and a -inf at random places (distinct, the NaN first in order).
  std::vector<double> v = testing::randn64(RngKey::from_seed(seed), Shape{37, 29}).to_vector<double>();
  std::uniform_int_distribution<size_t> pos(0, v.size() - 1);
  size_t p0 = pos(gen), p1 = pos(gen), p2 = pos(gen);
  while (p1 == p0) p1 = pos(gen);
  while (p2 == p0 || p2 == p1) p2 = pos(gen);
  v[p0] = std::numeric_limits<double>::quiet_NaN();
  v[p1] = std::numeric_limits<double>::infinity();
  v[p2] = -std::numeric_limits<double>::infinity();
  const Tensor host = from_vector(v, Shape{37, 29});
  for (DType dt : {DType::f32, DType::f64, DType::bf16, DType::f16}) {
    INFO(dtype_name(dt));
    const Tensor h = host.astype(dt), d = h.to(Device::cuda(0));
    const NonFiniteCount ch = count_non_finite(h), cd = count_non_finite(d);
    CHECK((cd.nan == 1 && cd.posinf == 1 && cd.neginf == 1));
    CHECK((cd.nan == ch.nan && cd.posinf == ch.posinf && cd.neginf == ch.neginf));
    const NonFiniteCount sh = count_non_finite(h.T().slice(0, 3, 20, 2)), sd = count_non_finite(d.T().slice(0, 3, 20, 2));
    CHECK((sd.nan == sh.nan && sd.posinf == sh.posinf && sd.neginf == sh.neginf));
  }

  // The same op on the same values reports the same element on both devices (exp keeps NaN and +inf;
  // with infinities reported too, the first non-finite element).
  const Tensor x = host.astype(DType::f32), xd = x.to(Device::cuda(0));
  DetectAnomalyGuard all(AnomalyOptions{.nans = true, .infs = true});
  const std::string on_cpu = testing::catch_error<FloatingPointError>([&] { exp(x); }).what();
  const std::string on_gpu = testing::catch_error<FloatingPointError>([&] { exp(xd); }).what();
  CAPTURE(on_cpu, on_gpu);
  const size_t first = std::min({p0, p1, p2});
  const std::string at = "the first at [" + std::to_string(first / 29) + ", " + std::to_string(first % 29) + "]";
  CHECK(has(on_cpu, at));
  CHECK(has(on_gpu, at));
  CHECK(has(on_gpu, "f32[37, 29]@cuda:0"));
  CHECK(has(on_gpu, "input 0 already held it"));
}

TEST_CASE("cuda: anomaly detection leaves finite work alone and names the member op of a fused GPU node", "[anomaly][jit]") {
  const uint64_t seed = testing::fresh_seed();
  INFO("TITANAX_TEST_SEED=" << seed);
  const Tensor a = testing::randn64(RngKey::from_seed(seed), Shape{64, 48}).astype(DType::f32).to(Device::cuda(0));
  const Tensor b = testing::randn64(RngKey::from_seed(seed + 1), Shape{48, 32}).astype(DType::f32).to(Device::cuda(0));
  auto f = jit::jit([](const TensorList& in) {
    NameScope s("head");
    return TensorList{log(softmax(matmul(in[0], in[1]), -1)) * 2.0 + 1.0};
  });
  TensorList plain;
  {
    DetectAnomalyGuard off(AnomalyOptions{.nans = false, .infs = false});
    plain = f({a, b});  // traced
    plain = f({a, b});  // replayed
  }
  DetectAnomalyGuard on;
  const TensorList checked = f({a, b});  // node by node, every node checked: the same values
  CHECK(testing::bitwise_equal(checked[0], plain[0]));
  // log(x) * 2 + 1 on a GPU tensor with a negative element: a fused NVRTC node that runs again op by op.
  auto g = jit::jit([](const TensorList& in) {
    NameScope s("head");
    return TensorList{log(in[0]) * 2.0 + 1.0};
  });
  const Tensor good = from_vector(std::vector<float>{1, 2, 3, 4}, Shape{4}).to(Device::cuda(0));
  const Tensor bad = from_vector(std::vector<float>{1, 2, -3, 4}, Shape{4}).to(Device::cuda(0));
  g({good});
  const std::string what = testing::catch_error<FloatingPointError>([&] { g({bad}); }).what();
  CAPTURE(what);
  CHECK(has(what, "op 'log' produced nan in output 0 in 'head', at node 0 of a jit graph"));
  CHECK(has(what, "run again op by op"));
  CHECK(has(what, "the first at [2]"));
}
