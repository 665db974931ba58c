// The attention kernels, tensor-core (kernels/cuda/attention_mma.cuh) and FP32 (attention_fp32.cuh), run on
// the CPU through the emulated GPU primitives of emulator.h (128 host threads per block; the mma rebuilt
// from the PTX ISA's fragment layout), so CI checks the kernels' tiling, fragment indexing, masking,
// online softmax and shared-memory layout without a GPU. Shared memory and the outputs start as NaN, so an
// element read before it is written, or never written, fails. The results are compared with the CPU
// attention (kernels/cpu) on the same inputs within 1e-2 (f32 through the FP32 kernels: 1e-4), as
// tests/cuda/test_cuda_attention.cpp compares the GPU. The tensor-core backward runs twice: the
// deterministic kernels, then FA2's fused one (dq by atomic adds), whose dk / dv must be bitwise the same.
// Problems with heads lay every operand out as a view (kernels::cuda::attention_rows gives the kernels their
// rows): a slot of a [B, T, slots, heads, D] buffer permuted to [B, heads, T, D], as GPT cuts q, k and v from
// one projection, with a slot count of its own so that no two operands of one length share strides; the
// rest of each buffer is NaN, so a row read from or written to the wrong place fails.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "kernels/cuda/attention_fp32.cuh"
#include "kernels/cuda/attention_mma.cuh"

#include "autodiff/autodiff.h"
#include "kernels/cuda/kernels.h"
#include "cuda/cuda_test_util.h"
#include "emu_test_util.h"
#include "emulator.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;
namespace ma = titanax::kernels::cuda::mma_attention;
namespace fa = titanax::kernels::cuda::fp32_attention;

namespace {

using testing::emu::HostPrim;
using testing::emu::fresh_key;

// A grid of the attention kernels' 128-thread blocks.
template <class Body>
void launch(int64_t gx, int gy, size_t smem_bytes, Body body) {
  testing::emu::launch(gx, gy, 128, smem_bytes, body);
}

template <class T>
struct Dtype;
template <>
struct Dtype<float> {
  static constexpr DType value = DType::f32;
};
template <>
struct Dtype<__nv_bfloat16> {
  static constexpr DType value = DType::bf16;
};
template <>
struct Dtype<__half> {
  static constexpr DType value = DType::f16;
};

struct Problem {
  int64_t N, Tq, Tk, D;
  bool causal;
  int grid_y;  // < N: blocks loop over n
  // Every score negative (q >= 0, k <= 0): a key past Tk (a zero row, score 0) let through would
  // outweigh the real ones, so a mask off by one key fails far beyond the tolerance.
  bool negative_scores = false;
  // > 0: the operands are [N / heads, heads, T, D] views (see the top of the file); 0: contiguous [N, T, D].
  int64_t heads = 0;
};

// A [B, heads, T, D] view of slot `slot` of a NaN [B, T, slots, heads, D] buffer of dtype dt.
Tensor strided_view(int64_t B, int64_t heads, int64_t T, int64_t D, int64_t slots, int64_t slot, DType dt) {
  const Tensor base = full(Shape{B, T, slots, heads, D}, std::nan(""), DType::f32).astype(dt);
  return unbind(base.permute({2, 0, 3, 1, 4}), 0)[size_t(slot)];
}
// x's values in `view` (a strided view, written in place); returns view.
Tensor fill_view(Tensor view, const Tensor& x) {
  copy_(view, x);
  return view;
}

// The magnitude of the terms dq is summed from, per element: scale * sum_j |dS_ij| |k_jd|, where
// dS = P * (dP - delta) (f64 from the f32 inputs; causal: key j <= query i, as kernels/cpu). Since
// sum_j dS_ij = 0, a component all keys share cancels from dq exactly, and where it is large
// (negative_scores: k <= 0) dq is a small difference of large terms. The tensor cores take dS rounded
// to T, as FA2 does; that rounding (2^-9 of |dS| in bf16) does not cancel. The error of a rounded dot
// product is bounded relative to sum |x| |y| (Higham, "Accuracy and Stability of Numerical
// Algorithms", 2nd ed., sec. 3.1), so dq's error is measured against the largest of these.
Tensor dq_terms(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& ct, const Tensor& o, double scale,
                bool causal) {
  const int64_t D = q.shape()[q.dim() - 1], Tq = q.shape()[q.dim() - 2], Tk = k.shape()[k.dim() - 2];
  const int64_t N = q.numel() / (Tq * D);
  auto host = [](const Tensor& t) { return t.astype(DType::f64).contiguous().to_vector<double>(); };
  const std::vector<double> Q = host(q), K = host(k), V = host(v), C = host(ct), O = host(o);
  std::vector<double> out(static_cast<size_t>(N * Tq * D), 0.0), p(static_cast<size_t>(Tk));
  auto dot = [D](const double* a, const double* b) {
    double acc = 0;
    for (int64_t d = 0; d < D; ++d) acc += a[d] * b[d];
    return acc;
  };
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < Tq; ++i) {
      const double* qi = &Q[size_t((n * Tq + i) * D)];
      const double* ci = &C[size_t((n * Tq + i) * D)];
      const int64_t kend = causal ? std::min(Tk, i + 1) : Tk;
      double m = -INFINITY, z = 0;
      for (int64_t j = 0; j < kend; ++j) {
        p[size_t(j)] = scale * dot(qi, &K[size_t((n * Tk + j) * D)]);
        m = std::max(m, p[size_t(j)]);
      }
      for (int64_t j = 0; j < kend; ++j) {
        p[size_t(j)] = std::exp(p[size_t(j)] - m);
        z += p[size_t(j)];
      }
      const double delta = dot(ci, &O[size_t((n * Tq + i) * D)]);
      for (int64_t j = 0; j < kend; ++j) {
        const double ds = std::fabs(p[size_t(j)] / z * (dot(ci, &V[size_t((n * Tk + j) * D)]) - delta));
        for (int64_t d = 0; d < D; ++d) out[size_t((n * Tq + i) * D + d)] += scale * ds * std::fabs(K[size_t((n * Tk + j) * D + d)]);
      }
    }
  return from_vector(out, q.shape());
}

// The problem's buffers (inputs rounded to T once; outputs and lse NaN before the kernels run), and the
// CPU's results on the same values in f32.
template <class T>
struct Buffers {
  Problem pb;
  Tensor q, k, v, ct, o, dq, dk, dv, lse;
  Tensor o_ref;
  TensorList g_ref;
  double dq_scale = 0;  // the largest of dq_terms
  double scale;
  kernels::cuda::AttentionLayout L;
  Buffers(const Problem& p, RngKey key) : pb(p), scale(1.0 / std::sqrt(double(p.D))) {
    const DType dt = Dtype<T>::value;
    const int64_t H = pb.heads > 0 ? pb.heads : 1, B = pb.N / H;
    REQUIRE(B * H == pb.N);
    const Shape sq = pb.heads > 0 ? Shape{B, H, pb.Tq, pb.D} : Shape{pb.N, pb.Tq, pb.D},
                sk = pb.heads > 0 ? Shape{B, H, pb.Tk, pb.D} : Shape{pb.N, pb.Tk, pb.D};
    q = testing::randn64(fold_in(key, 1), sq), k = testing::randn64(fold_in(key, 2), sk);
    if (pb.negative_scores) q = abs(q), k = neg(abs(k));
    q = q.astype(dt), k = k.astype(dt);
    v = testing::randn64(fold_in(key, 3), sk).astype(dt), ct = testing::randn64(fold_in(key, 4), sq).astype(dt);
    Tensor q32 = q.astype(DType::f32), k32 = k.astype(DType::f32), v32 = v.astype(DType::f32);
    for (Tensor* t : {&q32, &k32, &v32}) t->set_requires_grad();
    o_ref = scaled_dot_product_attention(q32, k32, v32, pb.causal);
    g_ref = grad(o_ref, {q32, k32, v32}, BackwardOptions{.seed = ct.astype(DType::f32)});
    o_ref = o_ref.detach();
    dq_scale = max(dq_terms(q32.detach(), k32.detach(), v32.detach(), ct, o_ref, scale, pb.causal)).item();
    auto nan_like = [&](const Shape& s) { return full(s, std::nan(""), DType::f32).astype(dt); };
    o = nan_like(sq), dq = nan_like(sq), dk = nan_like(sk), dv = nan_like(sk);
    lse = full(Shape{pb.N, pb.Tq}, std::nan(""), DType::f32);
    if (pb.heads > 0) {
      const int64_t D = pb.D;
      q = fill_view(strided_view(B, H, pb.Tq, D, 3, 0, dt), q);
      k = fill_view(strided_view(B, H, pb.Tk, D, 4, 1, dt), k);
      v = fill_view(strided_view(B, H, pb.Tk, D, 2, 1, dt), v);
      ct = fill_view(strided_view(B, H, pb.Tq, D, 2, 0, dt), ct);
      o = strided_view(B, H, pb.Tq, D, 1, 0, dt), dq = strided_view(B, H, pb.Tq, D, 4, 3, dt);
      dk = strided_view(B, H, pb.Tk, D, 3, 2, dt), dv = strided_view(B, H, pb.Tk, D, 1, 0, dt);
      for (const Tensor* t : {&q, &k, &v, &ct, &o, &dq, &dk, &dv}) REQUIRE_FALSE(t->is_contiguous());
    }
    auto rows = [](const Tensor& t) {
      const std::optional<kernels::cuda::AttnRows> r = kernels::cuda::attention_rows(t);
      REQUIRE(r.has_value());
      return *r;
    };
    L = {rows(q), rows(k), rows(v), rows(o), rows(ct), rows(dq), rows(dk), rows(dv)};
  }
  static const T* in(const Tensor& t) { return static_cast<const T*>(t.raw_data()); }
  static T* out(Tensor& t) { return static_cast<T*>(t.raw_data()); }
  float* lse_out() { return static_cast<float*>(lse.raw_data()); }
  // delta_i = sum_d dout_id o_id from the emulated o by the backward's delta kernel (attention_delta: 2
  // blocks of 4 warps striding over the rows), checked against the host's sum; after forward.
  Tensor delta() const {
    const Tensor want = sum(ct.astype(DType::f32) * o.astype(DType::f32), {-1}).contiguous();
    Tensor got = full(want.shape(), std::nan(""), DType::f32);
    testing::emu::launch(2, 1, 128, 0, [&](unsigned char*) {
      fa::attention_delta<HostPrim>(in(o), in(ct), L, static_cast<float*>(got.raw_data()), pb.N, pb.Tq, int(pb.D));
    });
    CHECK(testing::rel_error(got, want) <= 1e-5);
    return got;
  }
  void check_forward(double tol) const { CHECK(testing::rel_error(o, o_ref) <= tol); }
  void check_backward(double tol) const {
    const Tensor grads[3] = {dq, dk, dv};
    const char* names[3] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; ++i) {
      INFO(names[i]);
      const double err = testing::rel_error(grads[i], g_ref[size_t(i)]);
      if (i > 0) {
        CHECK(err <= tol);
        continue;
      }
      // dq: relative to the terms it is summed from (dq_terms), no looser than that when they do not cancel.
      const double dq_max = max(abs(g_ref[0])).item();
      INFO("error " << err << " of max |dq| " << dq_max << "; the terms' max " << dq_scale);
      CHECK(err * std::max(dq_max, 1e-30) <= tol * std::max(dq_max, dq_scale));
    }
  }
};

int64_t blocks(int64_t rows, int per_block) { return (rows + per_block - 1) / per_block; }

// The tensor-core kernels (head dim D, a template parameter).
template <class T, int D>
void check_mma(const Problem& pb, RngKey key) {
  REQUIRE(pb.D == D);
  Buffers<T> b(pb, key);
  using B = Buffers<T>;
  const float sl2 = float(b.scale) * ma::kLog2e;
  launch(blocks(pb.Tq, ma::block_rows<ma::mtiles<D>()>()), pb.grid_y, ma::fwd_smem_bytes<T, D>(), [&](unsigned char* smem) {
    ma::forward<HostPrim, T, D>(B::in(b.q), B::in(b.k), B::in(b.v), B::out(b.o), b.lse_out(), b.L, pb.N, pb.Tq, pb.Tk,
                                pb.causal, sl2, smem);
  });
  b.check_forward(1e-2);
  if constexpr (ma::mtiles<D>() > 1) {  // 16 rows per warp instead: bitwise the same o and lse
    const Tensor o_wide = b.o.clone();
    fill_(b.o, std::nan(""));
    Tensor lse = full(b.lse.shape(), std::nan(""), DType::f32);
    launch(blocks(pb.Tq, ma::block_rows<1>()), pb.grid_y, ma::fwd_smem_bytes<T, D, 1>(), [&](unsigned char* smem) {
      ma::forward<HostPrim, T, D, 1>(B::in(b.q), B::in(b.k), B::in(b.v), B::out(b.o), static_cast<float*>(lse.raw_data()),
                                     b.L, pb.N, pb.Tq, pb.Tk, pb.causal, sl2, smem);
    });
    CHECK(testing::bitwise_equal(o_wide, b.o));
    CHECK(testing::bitwise_equal(lse, b.lse));
  }
  const Tensor delta = b.delta();
  const float* dl = static_cast<const float*>(delta.raw_data());
  launch(blocks(pb.Tq, ma::block_rows<ma::mtiles<D>()>()), pb.grid_y, ma::dq_smem_bytes<T, D>(), [&](unsigned char* smem) {
    ma::backward_dq<HostPrim, T, D>(B::in(b.q), B::in(b.k), B::in(b.v), B::in(b.ct), b.lse_out(), dl, B::out(b.dq), b.L,
                                    pb.N, pb.Tq, pb.Tk, pb.causal, sl2, float(b.scale), smem);
  });
  if constexpr (ma::mtiles<D>() > 1) {  // 16 rows per warp instead: bitwise the same dq
    const Tensor dq_wide = b.dq.clone();
    fill_(b.dq, std::nan(""));
    launch(blocks(pb.Tq, ma::block_rows<1>()), pb.grid_y, ma::dq_smem_bytes<T, D, 1>(), [&](unsigned char* smem) {
      ma::backward_dq<HostPrim, T, D, 1>(B::in(b.q), B::in(b.k), B::in(b.v), B::in(b.ct), b.lse_out(), dl, B::out(b.dq), b.L,
                                         pb.N, pb.Tq, pb.Tk, pb.causal, sl2, float(b.scale), smem);
    });
    CHECK(testing::bitwise_equal(dq_wide, b.dq));
  }
  // dk and dv by backward_dkdv with M m-tiles per warp into NaN-poisoned outputs; fused (FA2's backward),
  // dq too, added by atomics into a zeroed f32 accumulator, then scaled and rounded.
  auto dkdv = [&](auto fused, auto mtiles) {
    constexpr bool F = decltype(fused)::value;
    constexpr int M = decltype(mtiles)::value;
    for (Tensor* t : {&b.dk, &b.dv}) fill_(*t, std::nan(""));
    std::vector<float> dq_accum(F ? size_t(pb.N * pb.Tq * D) : 0, 0.f);
    const size_t bytes = F ? ma::dkdv_dq_smem_bytes<T, D, M>() : ma::dkdv_smem_bytes<T, D, M>();
    launch(blocks(pb.Tk, ma::block_rows<M>()), pb.grid_y, bytes, [&](unsigned char* smem) {
      ma::backward_dkdv<HostPrim, T, D, F, M>(B::in(b.q), B::in(b.k), B::in(b.v), B::in(b.ct), b.lse_out(), dl, B::out(b.dk),
                                              B::out(b.dv), b.L, pb.N, pb.Tq, pb.Tk, pb.causal, sl2, float(b.scale), smem,
                                              dq_accum.data());
    });
    if constexpr (F) {
      fill_(b.dq, std::nan(""));
      launch(3, 1, 0, [&](unsigned char*) {  // fewer threads than quads: the grid-stride loop
        ma::dq_from_accum<HostPrim, T>(dq_accum.data(), B::out(b.dq), b.L, pb.N, pb.Tq, D, float(b.scale));
      });
    }
  };
  constexpr int M = ma::mtiles<D>();
  dkdv(std::false_type{}, std::integral_constant<int, M>{});
  b.check_backward(1e-2);
  // The fused backward computes dk / dv as the deterministic kernel does: bitwise the same.
  const Tensor dk = b.dk.clone(), dv = b.dv.clone();
  dkdv(std::true_type{}, std::integral_constant<int, M>{});
  b.check_backward(1e-2);
  CHECK(testing::bitwise_equal(b.dk, dk));
  CHECK(testing::bitwise_equal(b.dv, dv));
  if constexpr (M > 1) {  // 16 keys per warp instead: bitwise the same dk / dv, fused or not
    for (bool fused : {false, true}) {
      INFO("one m-tile per warp, fused " << fused);
      if (fused) dkdv(std::true_type{}, std::integral_constant<int, 1>{});
      else dkdv(std::false_type{}, std::integral_constant<int, 1>{});
      b.check_backward(1e-2);
      CHECK(testing::bitwise_equal(b.dk, dk));
      CHECK(testing::bitwise_equal(b.dv, dv));
    }
  }
}

// The FP32 (CUDA-core) kernels; DC = ceil(D / 32) lanes' feature chunks. f32 within 1e-4 of the CPU, as
// tests/cuda/test_cuda_attention.cpp; 16-bit within 1e-2.
template <class T, int DC>
void check_fp32(const Problem& pb, RngKey key) {
  REQUIRE((pb.D + 31) / 32 == DC);
  Buffers<T> b(pb, key);
  using B = Buffers<T>;
  const int D = int(pb.D);
  const double tol = std::is_same_v<T, float> ? 1e-4 : 1e-2;
  auto smem_of = [](size_t floats) { return floats * sizeof(float); };
  auto f32 = [](unsigned char* smem) { return reinterpret_cast<float*>(smem); };
  launch(blocks(pb.Tq, fa::kBlockRows), pb.grid_y, smem_of(fa::fwd_smem_floats(D)), [&](unsigned char* smem) {
    fa::forward<HostPrim, T, DC>(B::in(b.q), B::in(b.k), B::in(b.v), B::out(b.o), b.lse_out(), b.L, pb.N, pb.Tq, pb.Tk, D,
                                 pb.causal, float(b.scale), f32(smem));
  });
  b.check_forward(tol);
  const Tensor delta = b.delta();
  const float* dl = static_cast<const float*>(delta.raw_data());
  launch(blocks(pb.Tq, fa::kBlockRows), pb.grid_y, smem_of(fa::dq_smem_floats(D)), [&](unsigned char* smem) {
    fa::backward_dq<HostPrim, T, DC>(B::in(b.q), B::in(b.k), B::in(b.v), B::in(b.ct), b.lse_out(), dl, B::out(b.dq), b.L,
                                     pb.N, pb.Tq, pb.Tk, D, pb.causal, float(b.scale), f32(smem));
  });
  launch(blocks(pb.Tk, fa::kBlockRows), pb.grid_y, smem_of(fa::dkdv_smem_floats(D)), [&](unsigned char* smem) {
    fa::backward_dkdv<HostPrim, T, DC>(B::in(b.q), B::in(b.k), B::in(b.v), B::in(b.ct), b.lse_out(), dl, B::out(b.dk),
                                       B::out(b.dv), b.L, pb.N, pb.Tq, pb.Tk, D, pb.causal, float(b.scale), f32(smem));
  });
  b.check_backward(tol);
}

}  // namespace

TEST_CASE("tensor-core attention, emulated on the CPU: forward and backward match the CPU kernels", "[emulated]") {
  const RngKey key = fresh_key();
  SECTION("bf16, D 64, causal, Tq != Tk, ragged tiles, blocks looping over n") {
    check_mma<__nv_bfloat16, 64>({2, 130, 70, 64, true, 1}, key);
  }
  SECTION("f16, D 64, full attention, more keys than queries") { check_mma<__half, 64>({1, 65, 150, 64, false, 1}, key); }
  SECTION("bf16, D 128, causal") { check_mma<__nv_bfloat16, 128>({1, 70, 70, 128, true, 1}, key); }
  SECTION("f16, D 64, causal, Tq = Tk over two forward blocks (128 rows: two m-tiles per warp)") {
    check_mma<__half, 64>({1, 200, 200, 64, true, 1}, key);
  }
  SECTION("f16, D 64, causal, the last query row alone in its key tile") { check_mma<__half, 64>({1, 65, 65, 64, true, 1}, key); }
  SECTION("bf16, D 64, causal, Tq != Tk, GPT's strided views (2 batches x 3 heads), blocks looping over n") {
    check_mma<__nv_bfloat16, 64>({6, 130, 70, 64, true, 4, false, 3}, key);
  }
  SECTION("f16, D 128, full attention, strided views (3 batches x 2 heads)") {
    check_mma<__half, 128>({6, 40, 70, 128, false, 6, false, 2}, key);
  }
  SECTION("bf16, D 64, causal and full, every score negative, ragged key tiles") {
    check_mma<__nv_bfloat16, 64>({1, 100, 70, 64, true, 1, true}, key);
    check_mma<__nv_bfloat16, 64>({1, 70, 100, 64, false, 1, true}, key);
  }
}

TEST_CASE("FP32 attention kernels, emulated on the CPU: forward and backward match the CPU kernels", "[emulated]") {
  const RngKey key = fresh_key();
  SECTION("f32, D 40 (a partial lane chunk), causal, Tq != Tk, blocks looping over n") {
    check_fp32<float, 2>({2, 50, 37, 40, true, 1}, key);
  }
  SECTION("f32, D 64, full attention, more keys than queries") { check_fp32<float, 2>({1, 33, 70, 64, false, 1}, key); }
  SECTION("bf16, D 128, causal") { check_fp32<__nv_bfloat16, 4>({1, 40, 40, 128, true, 1}, key); }
  SECTION("f16, D 24, causal, a query row alone in its tile") { check_fp32<__half, 1>({1, 33, 33, 24, true, 1}, key); }
  SECTION("f32, D 40, causal, Tq != Tk, strided views (2 batches x 3 heads), blocks looping over n") {
    check_fp32<float, 2>({6, 50, 37, 40, true, 4, false, 3}, key);
  }
}

TEST_CASE("attention_rows: which views the attention kernels read in place, and their rows", "[emulated]") {
  using kernels::cuda::AttnRows;
  auto rows = [](const Tensor& t) { return kernels::cuda::attention_rows(t); };
  auto same = [](const std::optional<AttnRows>& r, AttnRows want) {
    REQUIRE(r.has_value());
    CHECK(r->heads == want.heads);
    CHECK(r->batch == want.batch);
    CHECK(r->head == want.head);
    CHECK(r->row == want.row);
  };
  const int64_t B = 2, T = 5, H = 3, D = 8;
  // Contiguous: [N, T, D], and [B, H, T, D] whose two leading axes merge into one of B * H.
  same(rows(zeros(Shape{4, T, D})), {1, T * D, 0, D});
  same(rows(zeros(Shape{B, H, T, D})), {1, T * D, 0, D});
  same(rows(zeros(Shape{T, D})), {1, 0, 0, D});
  // q, k, v of one projection (GPT's layout): [B, T, 3, H, D] permuted to [3, B, H, T, D] and unbound.
  const TensorList qkv = unbind(zeros(Shape{B, T, 3, H, D}).permute({2, 0, 3, 1, 4}), 0);
  for (const Tensor& x : qkv) same(rows(x), {H, T * 3 * H * D, D, 3 * H * D});
  // A [B, T, H, D] permuted to [B, H, T, D] (an attention output's cotangent); with one row per matrix that
  // is [B * H, 1, D] in memory.
  same(rows(zeros(Shape{B, T, H, D}).permute({0, 2, 1, 3})), {H, T * H * D, D, H * D});
  same(rows(zeros(Shape{B, 1, H, D}).permute({0, 2, 1, 3})), {1, D, 0, 0});
  // k, v shared by every head (expand: stride 0) are read in place too.
  same(rows(zeros(Shape{B, 1, T, D}).expand(Shape{B, H, T, D})), {H, T * D, 0, D});
  // Not in place: features not contiguous, three strided leading axes.
  CHECK_FALSE(rows(zeros(Shape{B, H, D, T}).transpose(2, 3)).has_value());
  CHECK_FALSE(rows(zeros(Shape{B, T, H, 2, D}).permute({3, 0, 2, 1, 4})).has_value());
  // ... but two of them merge where one steps over the other: [B, 2, H, T, D] from [B, 2, T, H, D].
  same(rows(zeros(Shape{B, 2, T, H, D}).permute({0, 1, 3, 2, 4})), {H, T * H * D, D, H * D});
  CHECK_FALSE(rows(zeros(Shape{D})).has_value());
}
