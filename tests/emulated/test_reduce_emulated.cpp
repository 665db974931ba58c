// The reduction kernels (kernels/cuda/reduce.cuh) run on the CPU through the emulated GPU primitives of
// emulator.h, against the CPU's sum / max / min / argmax (ops/ops.h on CPU tensors): every plan shape (a
// warp per output, a block per output, column tiles), each with one split and with several (the
// workspace and reduce_partials' second pass), blocks looping over outputs and splits, several kept and
// reduced axes, a strided (transposed) input, NaN propagation and f16 / bf16 inputs. The layouts and
// plans come from the host's kernels::cuda::reduce_layout / reduce_plan, as the GPU's launches do.
// Outputs start as NaN, so an unwritten one fails.
#include <catch2/catch.hpp>

#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels/cuda/kernels.h"
#include "kernels/cuda/reduce.cuh"

#include "cuda/cuda_test_util.h"
#include "emu_test_util.h"
#include "emulator.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;
namespace rd = titanax::kernels::cuda::reduce_kernels;
using kernels::cuda::ReducePlan;
using testing::emu::HostPrim;

namespace {

// Blocks of 64 threads (2 warps; the GPU's are kReduceThreads): the bodies take any multiple of 32, and
// small blocks keep the emulation fast while blocks and splits still loop.
constexpr int kThreads = 64;

std::vector<bool> marks(int rank, const std::vector<int>& axes) {
  std::vector<bool> m(size_t(rank), false);
  for (int a : axes) m[size_t(a)] = true;
  return m;
}

// The emulated reduction of x over `axes` by op (0 sum, 1 max, 2 min) in plan shape `shape` with about
// `splits` splits, over a grid of `blocks` x `blocks` blocks (fewer than the items need, so blocks loop).
template <class T, class A>
Tensor emulated_with(int op, const Tensor& x, const std::vector<int>& axes, ReducePlan::Shape shape, int64_t splits, int blocks) {
  const kernels::cuda::ReduceLayout L = kernels::cuda::reduce_layout(x, marks(x.dim(), axes));
  ReducePlan P;
  P.shape = shape;
  P.chunk = std::max<int64_t>(1, (L.nred + splits - 1) / splits);
  P.splits = std::max<int64_t>(1, (L.nred + P.chunk - 1) / P.chunk);
  Tensor out = full(Shape{L.nout}, std::nan(""), DType::f64).astype(x.dtype());
  std::vector<A> work(size_t(P.splits * L.nout), A(NAN));
  const T* in = static_cast<const T*>(x.raw_data());
  T* o = static_cast<T*>(out.raw_data());
  testing::emu::launch(blocks, shape == ReducePlan::kCols ? blocks : 1, kThreads, 0, [&](unsigned char*) {
    if (shape == ReducePlan::kRowsWarp) rd::reduce_rows<HostPrim, T, A, 32>(op, in, o, work.data(), L, P.splits, P.chunk);
    else if (shape == ReducePlan::kRowsBlock) rd::reduce_rows<HostPrim, T, A, kThreads>(op, in, o, work.data(), L, P.splits, P.chunk);
    else rd::reduce_cols<HostPrim, T, A>(op, in, o, work.data(), L, P.splits, P.chunk);
  });
  if (P.splits > 1)
    testing::emu::launch(blocks, 1, kThreads, 0, [&](unsigned char*) { rd::reduce_partials<HostPrim, T, A>(op, work.data(), o, L.nout, P.splits); });
  return out;
}
template <class T>
Tensor emulated_reduce(int op, const Tensor& x, const std::vector<int>& axes, ReducePlan::Shape shape, int64_t splits, int blocks) {
  if (op == 0) return emulated_with<T, double>(op, x, axes, shape, splits, blocks);
  return emulated_with<T, kernels::cuda::compute_t<T>>(op, x, axes, shape, splits, blocks);
}

Tensor cpu_reduce(int op, const Tensor& x, const std::vector<int>& axes) {
  const Tensor r = op == 0 ? sum(x, axes) : op == 1 ? max(x, axes) : min(x, axes);
  return r.reshape(Shape{r.numel()});
}

}  // namespace

TEMPLATE_TEST_CASE("reduction kernels, emulated: sum / max / min over any axes, every plan shape, one or many splits",
                   "[emulated]", float, double, __nv_bfloat16, __half) {
  using T = TestType;
  const DType dt = testing::emu::dtype_of<T>();
  Tensor x = testing::randn64(testing::emu::fresh_key(), Shape{3, 5, 70}).astype(dt);
  // A NaN at (0, 1, 17), so in output (0, 1) of the reduction over axis 2 and in one output of every other
  // reduction here: max and min keep it.
  Tensor nan = full(Shape{1}, std::nan(""), DType::f64).astype(dt);
  std::memcpy(static_cast<char*>(x.raw_data()) + (1 * 70 + 17) * itemsize(dt), nan.raw_data(), itemsize(dt));
  const Tensor xt = x.transpose(0, 2);  // strided: [70, 5, 3]
  using S = ReducePlan;
  for (int op : {0, 1, 2}) {
    for (int64_t splits : {1, 3}) {
      INFO("op " << op << " splits " << splits);
      // Sums: double accumulation in another order than the CPU's; in 16 bits, one rounding step.
      const double tol = op != 0 ? 0.0 : is_half(dt) ? 1e-2 : dt == DType::f32 ? 1e-6 : 1e-13;
      // A warp per output: 15 outputs of 70 over 2 blocks of 2 warps; 70 outputs of 15, strided.
      CHECK(testing::rel_error(emulated_reduce<T>(op, x, {2}, S::kRowsWarp, splits, 2), cpu_reduce(op, x, {2})) <= tol);
      CHECK(testing::rel_error(emulated_reduce<T>(op, xt, {1, 2}, S::kRowsWarp, splits, 2), cpu_reduce(op, xt, {1, 2})) <= tol);
      // A block per output: 5 outputs of 210 over 3 blocks; all 1050 into one.
      CHECK(testing::rel_error(emulated_reduce<T>(op, x, {0, 2}, S::kRowsBlock, splits, 3), cpu_reduce(op, x, {0, 2})) <= tol);
      CHECK(testing::rel_error(emulated_reduce<T>(op, xt, {0, 1, 2}, S::kRowsBlock, splits + 4, 1), cpu_reduce(op, xt, {0, 1, 2})) <= tol);
      // Column tiles: the 350 contiguous outputs of 3 rows (axes 1 and 2 merge), tiles and splits both
      // looping; 70 outputs of 15 (axes 0 and 1 merge).
      CHECK(testing::rel_error(emulated_reduce<T>(op, x, {0}, S::kCols, splits, 2), cpu_reduce(op, x, {0})) <= tol);
      CHECK(testing::rel_error(emulated_reduce<T>(op, x, {0, 1}, S::kCols, splits + 1, 2), cpu_reduce(op, x, {0, 1})) <= tol);
    }
  }
}

TEST_CASE("reduction plans: merged axes, column tiles for contiguous outputs, splits for long reductions", "[emulated]") {
  using S = ReducePlan;
  namespace kc = kernels::cuda;
  auto plan = [](const Shape& s, const std::vector<int>& axes, bool transposed = false) {
    const Tensor x = transposed ? empty(s, DType::f32).transpose(0, 1) : empty(s, DType::f32);
    const kc::ReduceLayout L = kc::reduce_layout(x, marks(x.dim(), axes));
    const ReducePlan P = kc::reduce_plan(L);
    INFO("shape " << s.str() << " axes " << axes.size() << " -> splits " << P.splits << " chunk " << P.chunk);
    CHECK(P.splits >= 1);
    CHECK(P.chunk * P.splits >= L.nred);        // every element in a split
    CHECK((P.splits - 1) * P.chunk < L.nred);   // and no split empty
    return std::make_pair(L, P);
  };
  // A bias gradient: the sum over rows of [16384, 3072] (GPT-2's MLP): columns, split to fill the GPU.
  auto [lb, pb] = plan(Shape{16384, 3072}, {0});
  CHECK(pb.shape == S::kCols);
  CHECK(pb.splits > 1);
  // [B, T, C] summed over B and T: the two reduced axes merge into one.
  auto [lm, pm] = plan(Shape{16, 1024, 768}, {0, 1});
  CHECK(lm.nr == 1);
  CHECK(lm.nk == 1);
  CHECK(pm.shape == S::kCols);
  // A full reduction of 38.6M elements (a norm of GPT-2's embedding gradient): blocks, 1024 splits.
  auto [lf, pf] = plan(Shape{50304, 768}, {0, 1});
  CHECK(lf.nr == 1);
  CHECK(pf.shape == S::kRowsBlock);
  CHECK(pf.splits == 1024);
  // Rows of 768 (a row sum): a warp per row, no split.
  auto [lr, pr] = plan(Shape{4096, 768}, {1});
  CHECK(pr.shape == S::kRowsWarp);
  CHECK(pr.splits == 1);
  // A transposed input: the kept axis is not contiguous, the reduced one is.
  auto [lt, pt] = plan(Shape{300, 200}, {0}, true);
  CHECK(lt.rstride[0] == 1);
  CHECK(pt.shape == S::kRowsWarp);
  // Few tiles of long columns: about 1000 splits of 129 rows, where rounding the chunk up would leave
  // the last splits empty.
  auto [lc, pc] = plan(Shape{130000, 32}, {0});
  CHECK(pc.shape == S::kCols);
  CHECK(pc.splits > 512);
  // Small reductions take one split.
  CHECK(plan(Shape{128, 512}, {0}).second.splits == 1);
  CHECK(plan(Shape{10}, {0}).second.splits == 1);
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
