// The fused multi-tensor optimizer kernels (kernels/cuda/optim.cuh) run on the CPU through the emulated
// GPU primitives of emulator.h, against the CPU's updates (kernels/cpu/optim.h) on fresh random tensors of
// several sizes in one chunk (block_y picks the tensor, blocks stride over its elements): f32 within 1e-6,
// f64 within 1e-13 (the same formulas; compilers may contract multiply-adds differently). A skipped step
// leaves everything untouched, and scalars read from "device memory" (a captured launch) act as the
// launch's own. The gradient norm's multi-tensor sums of squares: each chunk's partial and the total
// against the CPU's, in double.
#include <catch2/catch.hpp>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "kernels/cuda/optim.cuh"

#include "cuda/cuda_test_util.h"
#include "emu_test_util.h"
#include "emulator.h"
#include "kernels/cpu/optim.h"
#include "kernels/update_scalars.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;
namespace ok = titanax::kernels::cuda::optim_kernels;
using testing::emu::HostPrim;
using testing::emu::fresh_key;

namespace {

// Three tensors of different sizes (one smaller than a block, one over several blocks of the grid).
const int64_t kSizes[3] = {5, 700, 2100};

template <class T>
struct State {
  std::vector<Tensor> p, g, m, v;
  State(RngKey key, DType dt) {
    for (int i = 0; i < 3; ++i) {
      const Shape s{kSizes[i]};
      p.push_back(testing::randn64(fold_in(key, uint64_t(10 * i)), s).astype(dt));
      g.push_back(testing::randn64(fold_in(key, uint64_t(10 * i + 1)), s).astype(dt));
      m.push_back((testing::randn64(fold_in(key, uint64_t(10 * i + 2)), s) * 0.1).astype(dt));
      v.push_back(abs(testing::randn64(fold_in(key, uint64_t(10 * i + 3)), s) * 0.1).astype(dt));
    }
  }
  State clone() const {
    State c = *this;
    for (auto* list : {&c.p, &c.g, &c.m, &c.v})
      for (auto& t : *list) t = t.clone();
    return c;
  }
  kernels::cuda::TensorChunk chunk(bool with_m, bool with_v) {
    kernels::cuda::TensorChunk c;
    c.count = 3;
    for (int i = 0; i < 3; ++i) {
      c.p[i] = p[size_t(i)].raw_data();
      c.g[i] = g[size_t(i)].raw_data();
      c.m[i] = with_m ? m[size_t(i)].raw_data() : nullptr;
      c.v[i] = with_v ? v[size_t(i)].raw_data() : nullptr;
      c.n[i] = kSizes[i];
    }
    return c;
  }
};

template <class T>
T* data(Tensor& t) { return static_cast<T*>(t.raw_data()); }

// 2 blocks of 256 threads along x (fewer than the largest tensor needs: blocks stride), one per tensor along y.
template <class Body>
void launch_chunk(Body body) { testing::emu::launch(2, 3, 256, 0, [&](unsigned char*) { body(); }); }

}  // namespace

TEMPLATE_TEST_CASE("optimizer kernels, emulated: multi-tensor AdamW / Adam match the CPU", "[emulated]", float, double) {
  const DType dt = std::is_same_v<TestType, float> ? DType::f32 : DType::f64;
  const double tol = dt == DType::f32 ? 1e-6 : 1e-13;
  const RngKey key = fresh_key();
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.01, lr = 1e-2;
  for (bool decoupled : {true, false}) {
    for (int from_device = 0; from_device < 2; ++from_device) {
      INFO("decoupled " << decoupled << " scalars from device memory " << from_device);
      // A gradient factor (a clipping coefficient) of 0.37: the kernels scale the gradient as the CPU's do.
      const kernels::UpdateScalars sc = kernels::adam_scalars(lr, b1, b2, wd, 3, true, 0.37);
      State<TestType> got(key, dt);
      State<TestType> want = got.clone();
      const kernels::UpdateScalars none{};  // step size 0, decay factor 0: a wrong result if the kernel read these
      kernels::cuda::TensorChunk c = got.chunk(true, true);
      launch_chunk([&] {
        ok::adam<HostPrim, TestType>(c, from_device ? none : sc, from_device ? sc.v : nullptr, TestType(eps), TestType(wd),
                                     TestType(b1), TestType(b2), TestType(1 - b1), TestType(1 - b2), decoupled);
      });
      for (int i = 0; i < 3; ++i)
        kernels::cpu::adam_update(data<TestType>(want.p[size_t(i)]), data<TestType>(want.g[size_t(i)]),
                                  data<TestType>(want.m[size_t(i)]), data<TestType>(want.v[size_t(i)]), kSizes[i], sc, b1, b2,
                                  eps, wd, decoupled);
      for (int i = 0; i < 3; ++i) {
        INFO("tensor " << i);
        CHECK(testing::rel_error(got.p[size_t(i)], want.p[size_t(i)]) <= tol);
        CHECK(testing::rel_error(got.m[size_t(i)], want.m[size_t(i)]) <= tol);
        CHECK(testing::rel_error(got.v[size_t(i)], want.v[size_t(i)]) <= tol);
      }
    }
  }
  SECTION("a skipped step changes nothing") {
    State<TestType> got(key, dt);
    const State<TestType> before = got.clone();
    kernels::cuda::TensorChunk c = got.chunk(true, true);
    const kernels::UpdateScalars skip = kernels::adam_scalars(lr, b1, b2, wd, 3, false);
    launch_chunk([&] {
      ok::adam<HostPrim, TestType>(c, skip, nullptr, TestType(eps), TestType(wd), TestType(b1), TestType(b2), TestType(1 - b1),
                                   TestType(1 - b2), true);
    });
    for (int i = 0; i < 3; ++i) CHECK(got.p[size_t(i)].template to_vector<double>() == before.p[size_t(i)].template to_vector<double>());
  }
}

TEMPLATE_TEST_CASE("optimizer kernels, emulated: multi-tensor SGD (momentum, Nesterov, none) matches the CPU", "[emulated]", float,
                   double) {
  const DType dt = std::is_same_v<TestType, float> ? DType::f32 : DType::f64;
  const double tol = dt == DType::f32 ? 1e-6 : 1e-13;
  const RngKey key = fresh_key();
  const double lr = 0.05, wd = 1e-4;
  struct Setting {
    double mu;
    bool nesterov, first;
  };
  for (const Setting& st : {Setting{0.9, false, true}, Setting{0.9, false, false}, Setting{0.9, true, false}, Setting{0.0, false, false}}) {
    INFO("mu " << st.mu << " nesterov " << st.nesterov << " first " << st.first);
    const kernels::UpdateScalars sc = kernels::sgd_scalars(lr, st.first, true, 0.37);
    State<TestType> got(key, dt);
    State<TestType> want = got.clone();
    kernels::cuda::TensorChunk c = got.chunk(st.mu > 0, false);
    launch_chunk([&] { ok::sgd<HostPrim, TestType>(c, sc, nullptr, TestType(st.mu), TestType(wd), st.nesterov); });
    for (int i = 0; i < 3; ++i)
      kernels::cpu::sgd_update(data<TestType>(want.p[size_t(i)]), data<TestType>(want.g[size_t(i)]),
                               st.mu > 0 ? data<TestType>(want.m[size_t(i)]) : nullptr, kSizes[i], sc, st.mu, wd, st.nesterov);
    for (int i = 0; i < 3; ++i) {
      INFO("tensor " << i);
      CHECK(testing::rel_error(got.p[size_t(i)], want.p[size_t(i)]) <= tol);
      if (st.mu > 0) CHECK(testing::rel_error(got.m[size_t(i)], want.m[size_t(i)]) <= tol);
    }
  }
}

TEMPLATE_TEST_CASE("optimizer kernels, emulated: the gradient norm's multi-tensor sums of squares match the CPU", "[emulated]",
                   float, double, __nv_bfloat16) {
  using T = TestType;
  const DType dt = testing::emu::dtype_of<T>();
  const RngKey key = fresh_key();
  // 40000 elements (two whole chunks of 16384 and a partial one), 7, exactly one chunk, and an empty tensor.
  const std::vector<int64_t> sizes{40000, 7, kernels::cuda::kSquaresChunk, 0};
  std::vector<Tensor> xs;
  kernels::cuda::SquaresChunk c;
  int64_t P = 0;
  for (size_t i = 0; i < sizes.size(); ++i, ++c.count) {
    xs.push_back(testing::randn64(fold_in(key, i), Shape{sizes[i]}).astype(dt));
    c.x[c.count] = xs.back().raw_data();
    c.n[c.count] = sizes[i];
    c.first[c.count] = P;
    P += (sizes[i] + kernels::cuda::kSquaresChunk - 1) / kernels::cuda::kSquaresChunk;
  }
  std::vector<double> partial(size_t(P), NAN);
  double out = NAN;
  // Blocks of 64 threads, 2 blocks over the chunks (so they loop) by one per tensor.
  testing::emu::launch(2, c.count, 64, 0, [&](unsigned char*) { ok::sum_squares<HostPrim, T>(c, partial.data()); });
  testing::emu::launch(1, 1, 64, 0, [&](unsigned char*) { ok::sum_partials<HostPrim>(partial.data(), P, &out); });
  // The CPU: each chunk's sum of squares in double (in another order within the chunk), and the total.
  for (size_t i = 0, p = 0; i < xs.size(); ++i) {
    const std::vector<double> v = xs[i].astype(DType::f64).to_vector<double>();
    for (int64_t k = 0; k * kernels::cuda::kSquaresChunk < sizes[i]; ++k, ++p) {
      double chunk = 0;
      for (int64_t j = k * kernels::cuda::kSquaresChunk; j < std::min(sizes[i], (k + 1) * kernels::cuda::kSquaresChunk); ++j)
        chunk += v[size_t(j)] * v[size_t(j)];
      INFO("tensor " << i << " chunk " << k);
      CHECK(partial[p] == Approx(chunk).epsilon(1e-12));
    }
  }
  CHECK(out == Approx(sum_squares(TensorList(xs.begin(), xs.end())).item()).epsilon(1e-12));
}
