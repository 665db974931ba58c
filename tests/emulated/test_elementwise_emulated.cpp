// The elementwise kernels (kernels/cuda/elementwise.cuh: strided N-d binary / unary ops with broadcasting,
// the packed 16-byte paths with their tails, comparisons, where, clamp, casts) run on the CPU through the
// emulated GPU primitives of emulator.h, with the iteration layouts kernels.cpp builds (make_layout),
// against the CPU kernels (kernels/cpu/elementwise.h) on fresh random inputs: exact operations bitwise,
// transcendental ones within 1e-6 (the host's libm under both, but the two sides' formulas may round
// differently). f16 / bf16 operands against the CPU's f32 result over the widened inputs, rounded once
// (what Op::run_in_f32 gives): exact operations bitwise, the others within one 16-bit rounding step. Outputs start as NaN (or a sentinel), so an element left unwritten fails; a grid of 3
// blocks of 64 threads makes every kernel stride.
#include "kernels/cuda/elementwise.cuh"

#include <catch2/catch.hpp>

#include <cmath>

#include "cuda/cuda_test_util.h"
#include "emu_test_util.h"
#include "emulator.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/loops.h"
#include "kernels/cuda/kernels.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;
namespace ek = titanax::kernels::cuda::elementwise_kernels;
namespace kc = titanax::kernels::cpu;
using kernels::cuda::Layout;
using testing::emu::HostPrim;
using testing::emu::launch_strided;
using testing::emu::fresh_key;
using testing::emu::cptr;
using testing::emu::ptr;

namespace {

Tensor poisoned(const Shape& s, DType dt) {
  return dt == DType::bool_ || dt == DType::i32 || dt == DType::i64 ? full(s, 7.0, DType::f64).astype(dt)
                                                                    : full(s, std::nan(""), DType::f64).astype(dt);
}
bool exact(kc::BinaryOp op) {
  return op != kc::BinaryOp::pow && op != kc::BinaryOp::gelu_tanh_backward && op != kc::BinaryOp::gelu_erf_backward;
}
void check_same(const Tensor& got, const Tensor& want, bool exact_op) {
  if (exact_op) CHECK(testing::bitwise_equal(got, want));
  else CHECK(testing::rel_error(got, want) <= 1e-6);
}

}  // namespace

TEST_CASE("elementwise kernels, emulated: broadcasting, strided and packed binary ops match the CPU's", "[emulated]") {
  const RngKey key = fresh_key();
  // a [3, 1, 5] (a transposed view of [5, 1, 3]), b [4, 1] -> out [3, 4, 5]; the float4 path: 1003 elements.
  const Tensor a = abs(testing::randn64(fold_in(key, 1), Shape{5, 1, 3})).astype(DType::f32).permute({2, 1, 0});
  const Tensor b = testing::randn64(fold_in(key, 2), Shape{4, 1}).astype(DType::f32);
  const Tensor x = testing::randn64(fold_in(key, 3), Shape{1003}).astype(DType::f32);
  const Tensor y = testing::randn64(fold_in(key, 4), Shape{1003}).astype(DType::f32);
  for (kc::BinaryOp op : {kc::BinaryOp::add, kc::BinaryOp::sub, kc::BinaryOp::mul, kc::BinaryOp::div, kc::BinaryOp::maximum,
                          kc::BinaryOp::minimum, kc::BinaryOp::pow, kc::BinaryOp::relu_backward,
                          kc::BinaryOp::gelu_tanh_backward, kc::BinaryOp::gelu_erf_backward}) {
    INFO(kc::binary_name(op));
    const ek::BinaryF<float> f{int(op)};
    const Shape os{3, 4, 5};
    Tensor want = poisoned(os, DType::f32), got = poisoned(os, DType::f32);
    kc::binary(op, a, b, want);
    const Layout L = kernels::cuda::make_layout(os, {got.strides(), kc::broadcast_strides(a, os), kc::broadcast_strides(b, os)});
    launch_strided([&] { ek::binary<HostPrim>(ptr<float>(got), cptr<float>(a), cptr<float>(b), L, os.numel(), f); });
    check_same(got, want, exact(op));
    Tensor want4 = poisoned(x.shape(), DType::f32), got4 = poisoned(x.shape(), DType::f32), gotf = poisoned(x.shape(), DType::f32);
    kc::binary(op, abs(x), y, want4);
    const Tensor ax = abs(x);
    launch_strided([&] { ek::binary_packed<HostPrim>(ptr<float>(got4), cptr<float>(ax), cptr<float>(y), x.numel(), f); });
    launch_strided([&] { ek::binary_flat<HostPrim>(ptr<float>(gotf), cptr<float>(ax), cptr<float>(y), x.numel(), f); });
    check_same(got4, want4, exact(op));
    check_same(gotf, want4, exact(op));
  }
  SECTION("comparisons write bool; integers divide by zero to 0") {
    const Tensor ia = (testing::randn64(fold_in(key, 5), Shape{6, 7}) * 3.0).astype(DType::i64);
    const Tensor ib = (testing::randn64(fold_in(key, 6), Shape{7}) * 3.0).astype(DType::i64);  // zeros among them
    const Shape os{6, 7};
    const Layout L = kernels::cuda::make_layout(os, {os.contiguous_strides(), kc::broadcast_strides(ia, os), kc::broadcast_strides(ib, os)});
    for (kc::BinaryOp op : {kc::BinaryOp::lt, kc::BinaryOp::eq, kc::BinaryOp::ge}) {
      INFO(kc::binary_name(op));
      Tensor want = poisoned(os, DType::bool_), got = poisoned(os, DType::bool_);
      kc::binary(op, ia, ib, want);
      launch_strided([&] { ek::binary<HostPrim>(ptr<bool>(got), cptr<int64_t>(ia), cptr<int64_t>(ib), L, os.numel(), ek::CompareF<int64_t>{int(op)}); });
      CHECK(testing::bitwise_equal(got, want));
    }
    Tensor want = poisoned(os, DType::i64), got = poisoned(os, DType::i64);
    kc::binary(kc::BinaryOp::div, ia, ib, want);
    launch_strided([&] {
      ek::binary<HostPrim>(ptr<int64_t>(got), cptr<int64_t>(ia), cptr<int64_t>(ib), L, os.numel(), ek::BinaryF<int64_t>{int(kc::BinaryOp::div)});
    });
    CHECK(testing::bitwise_equal(got, want));
  }
}

TEST_CASE("elementwise kernels, emulated: unary ops, clamp, where and casts match the CPU's", "[emulated]") {
  const RngKey key = fresh_key();
  const Tensor x = testing::randn64(fold_in(key, 1), Shape{7, 9}).astype(DType::f32).transpose(0, 1);  // [9, 7], strided
  const Tensor v = testing::randn64(fold_in(key, 2), Shape{1001}).astype(DType::f32);
  for (kc::UnaryOp op : {kc::UnaryOp::neg, kc::UnaryOp::exp, kc::UnaryOp::tanh, kc::UnaryOp::sigmoid, kc::UnaryOp::abs,
                         kc::UnaryOp::relu, kc::UnaryOp::gelu_tanh, kc::UnaryOp::gelu_erf, kc::UnaryOp::sign}) {
    INFO(kc::unary_name(op));
    const bool exact_op = op == kc::UnaryOp::neg || op == kc::UnaryOp::abs || op == kc::UnaryOp::relu || op == kc::UnaryOp::sign;
    const ek::UnaryF<float> f{int(op)};
    Tensor want = poisoned(x.shape(), DType::f32), got = poisoned(x.shape(), DType::f32);
    kc::unary(op, x, want);
    const Layout L = kernels::cuda::make_layout(x.shape(), {got.strides(), kc::broadcast_strides(x, x.shape())});
    launch_strided([&] { ek::unary<HostPrim>(ptr<float>(got), cptr<float>(x), L, x.numel(), f); });
    check_same(got, want, exact_op);
    Tensor want4 = poisoned(v.shape(), DType::f32), got4 = poisoned(v.shape(), DType::f32);
    kc::unary(op, v, want4);
    launch_strided([&] { ek::unary_packed<HostPrim>(ptr<float>(got4), cptr<float>(v), v.numel(), f); });
    check_same(got4, want4, exact_op);
  }
  SECTION("clamp (f64, strided)") {
    const Tensor xd = x.astype(DType::f64).transpose(0, 1);
    Tensor want = poisoned(xd.shape(), DType::f64), got = poisoned(xd.shape(), DType::f64);
    kc::clamp(xd, -0.5, 0.75, want);
    const Layout L = kernels::cuda::make_layout(xd.shape(), {got.strides(), kc::broadcast_strides(xd, xd.shape())});
    launch_strided([&] { ek::unary<HostPrim>(ptr<double>(got), cptr<double>(xd), L, xd.numel(), ek::ClampF<double>{-0.5, 0.75}); });
    CHECK(testing::bitwise_equal(got, want));
  }
  SECTION("where: a condition [9, 1] and a [7] broadcast against b [9, 7]") {
    const Tensor c = gt(testing::randn64(fold_in(key, 3), Shape{9, 1}), scalar(0.0, DType::f64));
    const Tensor a = testing::randn64(fold_in(key, 4), Shape{7}).astype(DType::f32);
    const Shape os{9, 7};
    Tensor want = poisoned(os, DType::f32), got = poisoned(os, DType::f32);
    kc::where(c, a, x, want);
    const Layout L = kernels::cuda::make_layout(
        os, {got.strides(), kc::broadcast_strides(c, os), kc::broadcast_strides(a, os), kc::broadcast_strides(x, os)});
    launch_strided([&] { ek::where<HostPrim>(ptr<float>(got), cptr<bool>(c), cptr<float>(a), cptr<float>(x), L, os.numel()); });
    CHECK(testing::bitwise_equal(got, want));
  }
  SECTION("casts: f32 -> bf16 -> f32, f32 -> f16, f64 -> i32, f32 -> bool, i64 -> f32 (strided sources)") {
    const Tensor big = (testing::randn64(fold_in(key, 5), Shape{7, 9}) * 1000.0).transpose(0, 1);
    auto cast = [&](const Tensor& src, DType to, auto d, auto s) {
      using D = decltype(d);
      using S = decltype(s);
      Tensor want = poisoned(src.shape(), to), got = poisoned(src.shape(), to);
      kc::copy_cast(src, want);
      const Layout L = kernels::cuda::make_layout(src.shape(), {got.strides(), kc::broadcast_strides(src, src.shape())});
      launch_strided([&] { ek::unary<HostPrim>(ptr<D>(got), cptr<S>(src), L, src.numel(), ek::CastF<D, S>{}); });
      CHECK(testing::bitwise_equal(got, want));
      return got;
    };
    const Tensor bf = cast(x, DType::bf16, __nv_bfloat16{}, float{});
    cast(bf, DType::f32, float{}, __nv_bfloat16{});
    cast(x, DType::f16, __half{}, float{});
    cast(big, DType::i32, int32_t{}, double{});
    cast(x, DType::bool_, bool{}, float{});
    cast(big.astype(DType::i64), DType::f32, float{}, int64_t{});
  }
}

TEMPLATE_TEST_CASE("elementwise kernels, emulated: f16 / bf16 operands compute in f32 and round once", "[emulated]", __half,
                   __nv_bfloat16) {
  using T = TestType;
  using kernels::cuda::widened;
  const RngKey key = fresh_key();
  const DType dt = testing::emu::dtype_of<T>();
  // 1003 elements: 125 packs of 8 and a tail of 3; a [3, 4, 5] output from a transposed a and a broadcast b.
  const Tensor x = testing::randn64(fold_in(key, 1), Shape{1003}).astype(dt);
  const Tensor y = testing::randn64(fold_in(key, 2), Shape{1003}).astype(dt);
  const Tensor a = abs(testing::randn64(fold_in(key, 3), Shape{5, 1, 3})).astype(dt).permute({2, 1, 0});
  const Tensor b = testing::randn64(fold_in(key, 4), Shape{4, 1}).astype(dt);
  const Shape os{3, 4, 5};
  const Layout L = kernels::cuda::make_layout(os, {os.contiguous_strides(), kc::broadcast_strides(a, os), kc::broadcast_strides(b, os)});
  // The reference: the CPU's f32 kernel over the widened operands, rounded to the 16-bit dtype once.
  auto check16 = [&](const Tensor& got, const Tensor& want32, bool exact_op) {
    const Tensor want = want32.astype(dt);
    if (exact_op) CHECK(testing::bitwise_equal(got, want));
    else CHECK(testing::rel_error(got, want) <= 1e-2);
  };
  for (kc::BinaryOp op : {kc::BinaryOp::add, kc::BinaryOp::sub, kc::BinaryOp::mul, kc::BinaryOp::div, kc::BinaryOp::maximum,
                          kc::BinaryOp::minimum, kc::BinaryOp::pow, kc::BinaryOp::relu_backward, kc::BinaryOp::gelu_tanh_backward}) {
    INFO(kc::binary_name(op));
    const auto f = widened<T>(ek::BinaryF<float>{int(op)});
    Tensor want = poisoned(x.shape(), DType::f32), got = poisoned(x.shape(), dt), gotf = poisoned(x.shape(), dt);
    const Tensor ax = abs(x);  // pow's base
    kc::binary(op, ax.astype(DType::f32), y.astype(DType::f32), want);
    launch_strided([&] { ek::binary_packed<HostPrim>(ptr<T>(got), cptr<T>(ax), cptr<T>(y), x.numel(), f); });
    launch_strided([&] { ek::binary_flat<HostPrim>(ptr<T>(gotf), cptr<T>(ax), cptr<T>(y), x.numel(), f); });
    check16(got, want, exact(op));
    check16(gotf, want, exact(op));
    Tensor wants = poisoned(os, DType::f32), gots = poisoned(os, dt);
    kc::binary(op, a.astype(DType::f32), b.astype(DType::f32), wants);
    launch_strided([&] { ek::binary<HostPrim>(ptr<T>(gots), cptr<T>(a), cptr<T>(b), L, os.numel(), f); });
    check16(gots, wants, exact(op));
  }
  SECTION("comparisons of the widened values write bool") {
    for (kc::BinaryOp op : {kc::BinaryOp::lt, kc::BinaryOp::eq, kc::BinaryOp::ge}) {
      INFO(kc::binary_name(op));
      const Tensor yy = where(gt(y, x), x, y);  // equal elements among them
      Tensor want = poisoned(x.shape(), DType::bool_), got = poisoned(x.shape(), DType::bool_);
      kc::binary(op, x.astype(DType::f32), yy.astype(DType::f32), want);
      launch_strided([&] {
        ek::binary_flat<HostPrim>(ptr<bool>(got), cptr<T>(x), cptr<T>(yy), x.numel(), widened<T>(ek::CompareF<float>{int(op)}));
      });
      CHECK(testing::bitwise_equal(got, want));
    }
  }
  SECTION("unary ops, packed and strided, and clamp") {
    const Tensor xt = x.slice(0, 0, 63).reshape(Shape{7, 9}).transpose(0, 1);  // [9, 7], strided
    const Layout Lt = kernels::cuda::make_layout(xt.shape(), {xt.shape().contiguous_strides(), kc::broadcast_strides(xt, xt.shape())});
    for (kc::UnaryOp op : {kc::UnaryOp::neg, kc::UnaryOp::exp, kc::UnaryOp::tanh, kc::UnaryOp::abs, kc::UnaryOp::relu,
                           kc::UnaryOp::gelu_tanh, kc::UnaryOp::gelu_erf, kc::UnaryOp::square}) {
      INFO(kc::unary_name(op));
      const bool exact_op = op == kc::UnaryOp::neg || op == kc::UnaryOp::abs || op == kc::UnaryOp::relu || op == kc::UnaryOp::square;
      const auto f = widened<T>(ek::UnaryF<float>{int(op)});
      Tensor want = poisoned(x.shape(), DType::f32), got = poisoned(x.shape(), dt);
      kc::unary(op, x.astype(DType::f32), want);
      launch_strided([&] { ek::unary_packed<HostPrim>(ptr<T>(got), cptr<T>(x), x.numel(), f); });
      check16(got, want, exact_op);
      Tensor wantt = poisoned(xt.shape(), DType::f32), gott = poisoned(xt.shape(), dt);
      kc::unary(op, xt.astype(DType::f32), wantt);
      launch_strided([&] { ek::unary<HostPrim>(ptr<T>(gott), cptr<T>(xt), Lt, xt.numel(), f); });
      check16(gott, wantt, exact_op);
    }
    Tensor want = poisoned(x.shape(), DType::f32), got = poisoned(x.shape(), dt);
    kc::clamp(x.astype(DType::f32), -0.3, 0.7, want);
    launch_strided([&] {
      ek::unary_packed<HostPrim>(ptr<T>(got), cptr<T>(x), x.numel(), widened<T>(ek::ClampF<float>{-0.3f, 0.7f}));
    });
    CHECK(testing::bitwise_equal(got, want.astype(dt)));
  }
  SECTION("where moves 16-bit values") {
    const Tensor c = gt(testing::randn64(fold_in(key, 5), Shape{3, 1, 1}), scalar(0.0, DType::f64));
    Tensor want = poisoned(os, dt), got = poisoned(os, dt);
    kc::where(c, a, b, want);
    const Layout Lw = kernels::cuda::make_layout(
        os, {os.contiguous_strides(), kc::broadcast_strides(c, os), kc::broadcast_strides(a, os), kc::broadcast_strides(b, os)});
    launch_strided([&] { ek::where<HostPrim>(ptr<T>(got), cptr<bool>(c), cptr<T>(a), cptr<T>(b), Lw, os.numel()); });
    CHECK(testing::bitwise_equal(got, want));
  }
}
