// The reduction kernels (kernels/cuda/reduce.cuh) run on the CPU through the emulated GPU primitives of
// emulator.h, against the CPU's sum / max / min / argmax (ops/ops.h on CPU tensors): both grouping
// strategies (a warp per output; a block per output), blocks looping over outputs, several kept and
// reduced axes, a strided (transposed) input and NaN propagation. The layouts come from the host's
// kernels::cuda::reduce_layout, as the GPU's launches do. Outputs start as NaN, so an unwritten one fails.
#include <catch2/catch.hpp>

#include <cmath>
#include <type_traits>

#include "kernels/cuda/kernels.h"
#include "kernels/cuda/reduce.cuh"

#include "cuda/cuda_test_util.h"
#include "emu_test_util.h"
#include "emulator.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;
namespace rd = titanax::kernels::cuda::reduce_kernels;
using testing::emu::HostPrim;

namespace {

constexpr int kThreads = 256;

std::vector<bool> marks(int rank, const std::vector<int>& axes) {
  std::vector<bool> m(size_t(rank), false);
  for (int a : axes) m[size_t(a)] = true;
  return m;
}

// The emulated reduction of x over `axes` by op (0 sum, 1 max, 2 min), with GROUP threads per output,
// over `blocks` blocks (fewer than the outputs need, so blocks loop).
template <class T, int GROUP>
Tensor emulated_reduce(int op, const Tensor& x, const std::vector<int>& axes, int blocks) {
  const kernels::cuda::ReduceLayout L = kernels::cuda::reduce_layout(x, marks(x.dim(), axes));
  Tensor out = full(Shape{L.nout}, std::nan(""), x.dtype());
  const T* in = static_cast<const T*>(x.raw_data());
  T* o = static_cast<T*>(out.raw_data());
  testing::emu::launch(blocks, 1, kThreads, 0, [&](unsigned char*) {
    if (op == 0) rd::reduce<HostPrim, T, double, GROUP>(op, in, o, L);
    else rd::reduce<HostPrim, T, T, GROUP>(op, in, o, L);
  });
  return out;
}

Tensor cpu_reduce(int op, const Tensor& x, const std::vector<int>& axes) {
  const Tensor r = op == 0 ? sum(x, axes) : op == 1 ? max(x, axes) : min(x, axes);
  return r.reshape(Shape{r.numel()});
}

}  // namespace

TEMPLATE_TEST_CASE("reduction kernels, emulated: sum / max / min over any axes match the CPU", "[emulated]", float, double) {
  const DType dt = std::is_same_v<TestType, float> ? DType::f32 : DType::f64;
  Tensor x = testing::randn64(testing::emu::fresh_key(), Shape{5, 7, 300}).astype(dt);
  // A NaN in output (1, *) of the reduction over axis 2 (and in its block reductions): max and min keep it.
  static_cast<TestType*>(x.raw_data())[1 * 300 + 17] = TestType(NAN);
  const Tensor xt = x.transpose(0, 2);  // strided: [300, 7, 5]
  for (int op : {0, 1, 2}) {
    INFO("op " << op);
    const double tol = op == 0 ? (dt == DType::f32 ? 1e-6 : 1e-13) : 0.0;  // max / min are exact
    // A warp per output: 35 outputs of 300 over 2 blocks of 8 warps; 300 outputs of 35, strided.
    CHECK(testing::rel_error(emulated_reduce<TestType, 32>(op, x, {2}, 2), cpu_reduce(op, x, {2})) <= tol);
    CHECK(testing::rel_error(emulated_reduce<TestType, 32>(op, xt, {1, 2}, 2), cpu_reduce(op, xt, {1, 2})) <= tol);
    // A block per output: 7 outputs of 1500 over 3 blocks; all 10500 into one.
    CHECK(testing::rel_error(emulated_reduce<TestType, kThreads>(op, x, {0, 2}, 3), cpu_reduce(op, x, {0, 2})) <= tol);
    CHECK(testing::rel_error(emulated_reduce<TestType, kThreads>(op, xt, {0, 1, 2}, 1), cpu_reduce(op, xt, {0, 1, 2})) <= tol);
  }
}

TEST_CASE("reduction kernels, emulated: argmax takes the first maximum, as the CPU", "[emulated]") {
  // Values on a few levels, so rows have ties; a strided input.
  const Tensor x = (testing::randn64(RngKey::from_seed(5), Shape{6, 9, 40}) * 2.0).astype(DType::i64).astype(DType::f32);
  for (const Tensor& in : {x, x.transpose(0, 2)}) {
    for (int axis : {0, 1, 2}) {
      INFO("axis " << axis << " strided " << !in.is_contiguous());
      std::vector<bool> m(3, false);
      m[size_t(axis)] = true;
      const kernels::cuda::ReduceLayout L = kernels::cuda::reduce_layout(in, m);
      Tensor got = full(Shape{L.nout}, -1.0, DType::i64);
      testing::emu::launch(2, 1, 64, 0, [&](unsigned char*) {
        rd::argmax<HostPrim>(static_cast<const float*>(in.raw_data()), static_cast<int64_t*>(got.raw_data()), L);
      });
      const Tensor want = argmax(in, axis);
      CHECK(got.to_vector<int64_t>() == want.reshape(Shape{want.numel()}).to_vector<int64_t>());
    }
  }
}
