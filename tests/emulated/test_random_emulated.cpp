// The sampling kernels (kernels/cuda/random.cuh: random_uniform / random_normal on a CUDA device) run on
// the CPU through the emulated GPU primitives of emulator.h, against the CPU's kernels/cpu/random.cpp for
// the same fresh key: bitwise, in every output dtype (here both sides use the host's logf / cosf / sinf;
// on a GPU the normal samples may differ in the last bit: tests/cuda). Lengths that are not a multiple
// of 4 end in a partial Philox block; outputs start as NaN, so an unwritten element fails.
#include <catch2/catch.hpp>

#include "kernels/cuda/random.cuh"

#include "cuda/cuda_test_util.h"
#include "emu_test_util.h"
#include "emulator.h"
#include "kernels/cpu/random.h"
#include "ops/ops.h"

using namespace titanax;
namespace rk = titanax::kernels::cuda::random_kernels;
using testing::emu::cptr;
using testing::emu::launch_strided;
using testing::emu::nan_tensor;
using testing::emu::ptr;

TEMPLATE_TEST_CASE("sampling kernels, emulated: the CPU's uniform and normal samples for the same key", "[emulated]", float,
                   double, __nv_bfloat16, __half) {
  using T = TestType;
  const DType dt = testing::emu::dtype_of<T>();
  const RngKey key = testing::emu::fresh_key();
  for (int64_t n : {1, 6, 1001}) {
    INFO("n " << n);
    for (bool normal : {false, true}) {
      INFO((normal ? "normal" : "uniform"));
      // The CPU: f32 / f64 directly, 16-bit dtypes sampled in f32 and rounded (ops/random.cpp).
      Tensor want = nan_tensor(Shape{n}, is_half(dt) ? DType::f32 : dt);
      normal ? kernels::cpu::fill_normal(want, key) : kernels::cpu::fill_uniform(want, key);
      Tensor got = nan_tensor(Shape{n}, dt);
      launch_strided([&] {
        if (normal) rk::fill_normal<testing::emu::HostPrim>(ptr<T>(got), n, key.k0, key.k1);
        else rk::fill_uniform<testing::emu::HostPrim>(ptr<T>(got), n, key.k0, key.k1);
      });
      CHECK(testing::bitwise_equal(got, want.astype(dt)));
    }
  }
}
