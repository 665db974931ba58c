// The max-pooling kernels (kernels/cuda/pool.cuh) run on the CPU through the emulated GPU primitives of
// emulator.h, against the CPU's max pooling (kernels/cpu/conv.h; oneDNN for f32, the reference loops for
// f64) on fresh random inputs (f32 without exact ties, f64 full of them): y bitwise, dx bitwise in f64 and
// within 1e-6 in f32 (oneDNN sums overlapping windows in its own order), for overlapping windows with
// padding, non-overlapping ones and a stride larger than the window. Outputs start as NaN; a grid of 3
// blocks of 64 threads makes the kernels stride.
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "kernels/cuda/pool.cuh"

#include "cuda/cuda_test_util.h"
#include "emu_test_util.h"
#include "emulator.h"
#include "kernels/cpu/conv.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;
using testing::emu::HostPrim;

TEMPLATE_TEST_CASE("max pooling kernels, emulated: y and dx match the CPU's", "[emulated]", float, double) {
  const RngKey key = testing::emu::fresh_key();
  const DType dt = std::is_same_v<TestType, float> ? DType::f32 : DType::f64;
  // {N, C, H, W, KH, KW, SH, SW, PH, PW}
  for (const kernels::cpu::Pool2dGeom& g : {kernels::cpu::Pool2dGeom{2, 3, 9, 8, 3, 3, 2, 2, 1, 1},
                                            kernels::cpu::Pool2dGeom{1, 2, 8, 8, 2, 2, 2, 2, 0, 0},
                                            kernels::cpu::Pool2dGeom{1, 2, 10, 7, 2, 3, 3, 2, 1, 1}}) {
    INFO("H " << g.H << " W " << g.W << " kernel " << g.KH << "x" << g.KW << " stride " << g.SH << "x" << g.SW << " pad "
              << g.PH << "x" << g.PW);
    const Shape xs{g.N, g.C, g.H, g.W}, ys{g.N, g.C, g.OH(), g.OW()};
    // f64 also takes integers in [-2, 2], full of exact ties: each window's first maximum wins, as the CPU's.
    std::vector<double> xv = testing::randn64(fold_in(key, 1), xs).to_vector<double>();
    if (dt == DType::f64)
      for (double& e : xv) e = std::round(e);
    const Tensor x = from_vector(xv, xs).astype(dt);
    const Tensor dy = testing::randn64(fold_in(key, 2), ys).astype(dt);
    Tensor y_want = zeros(ys, dt), dx_want = zeros(xs, dt);
    Tensor cws = zeros(Shape{kernels::cpu::max_pool2d_workspace_bytes(g, dt)}, DType::u8);
    kernels::cpu::max_pool2d_forward(x, g, y_want, cws);
    kernels::cpu::max_pool2d_backward(dy, cws, g, dx_want);
    const kernels::cuda::Pool2dParams p{g.N, g.C, g.H, g.W, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.OH(), g.OW()};
    Tensor y = full(ys, std::nan(""), DType::f64).astype(dt), dx = full(xs, std::nan(""), DType::f64).astype(dt);
    Tensor ws = full(ys, -7.0, DType::f64).astype(DType::i32);
    testing::emu::launch(3, 1, 64, 0, [&](unsigned char*) {
      kernels::cuda::pool_kernels::max_pool2d<HostPrim>(static_cast<const TestType*>(x.raw_data()),
                                                        static_cast<TestType*>(y.raw_data()),
                                                        static_cast<int32_t*>(ws.raw_data()), p, ys.numel());
    });
    testing::emu::launch(3, 1, 64, 0, [&](unsigned char*) {
      kernels::cuda::pool_kernels::max_pool2d_backward<HostPrim>(static_cast<const TestType*>(dy.raw_data()),
                                                                 static_cast<const int32_t*>(ws.raw_data()),
                                                                 static_cast<TestType*>(dx.raw_data()), p, xs.numel());
    });
    CHECK(testing::bitwise_equal(y, y_want));
    // f64: the CPU's reference loops, the same sums in the same order. f32: oneDNN, which adds the
    // contributions of overlapping windows in an order of its own.
    if (dt == DType::f64) CHECK(testing::bitwise_equal(dx, dx_want));
    else CHECK(testing::rel_error(dx, dx_want) <= 1e-6);
  }
}
