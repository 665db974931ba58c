// scaled_dot_product_attention on the GPU (kernels/cuda/attention.cu) against the CPU (kernels/cpu/
// attention.h, itself checked against matmul + softmax in tests/unit/test_attention.cpp), on fresh random
// inputs of GPT shapes (several key and query tiles, ragged last tiles, head dims 64 and 128, Tq != Tk):
// forward and gradients in f32 within 1e-4 (the kernels sum in another order; the op table harness in
// test_cuda.cpp covers the small cases at 1e-5), bf16 / f16 within 1e-2 of the CPU's f32 on the same
// rounded inputs. Every CUDA allocation is poisoned with NaN (test_cuda.cpp), so an unwritten element fails.
// bf16 / f16 with head dim 64 or 128 run on the tensor-core kernels (attention_mma.cu) by default; they are
// also checked with those turned off (the FP32 kernels), on GPT-2's shape, and with misaligned operands
// (which fall back to the FP32 kernels). The default (deterministic) backward repeats bitwise, and the fused
// one with atomic dq (set_attention_deterministic(false)) matches the CPU with dk / dv bitwise the default's.
// q, k, v cut from one projection (views) and the cotangent of a permuted o are read in place (no copy
// on the tape), on both kernel families. The packed op (GPT's since 2026-12-06) matches the CPU, gives
// the unpacked op's bits on its parts, and traces with no copy or concat beside it.
#include <catch2/catch.hpp>

#include <chrono>
#include <string>
#include <vector>

#include <titanax/titanax.h>

#include "cuda_test_util.h"
#include "kernels/cuda/kernels.h"
#include "op_cases.h"
#include "unit/jit_test_util.h"

using namespace titanax;
using testing::rel_error;

namespace {

struct Result {
  Tensor o, dq, dk, dv;
};

// o and the gradients of sum(o * ct) on `dev`, in the inputs' dtype.
Result run(const Tensor& q0, const Tensor& k0, const Tensor& v0, const Tensor& ct, bool causal, Device dev) {
  Tensor q = q0.to(dev), k = k0.to(dev), v = v0.to(dev);
  for (Tensor* t : {&q, &k, &v}) t->set_requires_grad();
  Tensor o = scaled_dot_product_attention(q, k, v, causal);
  TensorList g = grad(o, {q, k, v}, BackwardOptions{.seed = ct.to(dev)});
  return {o.detach(), g[0], g[1], g[2]};
}

// q, k, v [B, H, T, D]: views of a packed qkv [B, T, 3, H, D] permuted and unbound (the unpacked op's cut).
TensorList cut_qkv(const Tensor& qkv) { return unbind(qkv.permute({2, 0, 3, 1, 4}), 0); }

uint64_t seed_now() { return uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count()); }

struct Case {
  Shape q, kv;
  bool causal;
};

// Fresh inputs rounded to t once, and the CPU reference on the same values in f32.
struct Inputs {
  Tensor q, k, v, ct;
  Result want;
  Inputs(RngKey key, const Case& c, DType t)
      : q(testing::randn64(fold_in(key, 1), c.q).astype(t)), k(testing::randn64(fold_in(key, 2), c.kv).astype(t)),
        v(testing::randn64(fold_in(key, 3), c.kv).astype(t)), ct(testing::randn64(fold_in(key, 4), c.q).astype(t)),
        want(run(q.astype(DType::f32), k.astype(DType::f32), v.astype(DType::f32), ct.astype(DType::f32), c.causal,
                 Device::cpu())) {}
};

}  // namespace

TEST_CASE("cuda attention: forward and gradients match the CPU (f32, bf16, f16; causal and full)") {
  const uint64_t seed = seed_now();
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  for (const Case& c : {Case{{2, 3, 300, 64}, {2, 3, 300, 64}, true}, Case{{2, 3, 300, 64}, {2, 3, 300, 64}, false},
                        Case{{1, 2, 77, 128}, {1, 2, 200, 128}, false}, Case{{3, 150, 40}, {3, 90, 40}, true}}) {
    for (DType t : {DType::f32, DType::bf16, DType::f16}) {
      INFO("q " << c.q.str() << " kv " << c.kv.str() << " causal " << c.causal << " " << dtype_name(t));
      const Inputs in(key, c, t);
      const Result& want = in.want;
      const Result got = run(in.q, in.k, in.v, in.ct, c.causal, Device::cuda(0));
      CHECK(got.o.dtype() == t);
      const double tol = t == DType::f32 ? 1e-4 : 1e-2;
      CHECK(rel_error(got.o, want.o) <= tol);
      CHECK(rel_error(got.dq, want.dq) <= tol);
      CHECK(rel_error(got.dk, want.dk) <= tol);
      CHECK(rel_error(got.dv, want.dv) <= tol);
    }
  }
}

TEST_CASE("cuda attention: head dimensions above 128 and f64 are clear errors") {
  const Device g = Device::cuda(0);
  const Tensor big = zeros(Shape{1, 4, 129}, DType::f32, g);
  CHECK_THROWS_AS(scaled_dot_product_attention(big, big, big), ShapeError);
  const Tensor d64 = zeros(Shape{1, 4, 8}, DType::f64, g);
  CHECK_THROWS_AS(scaled_dot_product_attention(d64, d64, d64), DTypeError);
}

TEST_CASE("cuda attention: tensor-core and FP32 kernels both match the CPU (GPT-2's shape, ragged tiles, misaligned operands)") {
  const uint64_t seed = seed_now();
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  for (const Case& c : {Case{{1, 12, 1024, 64}, {1, 12, 1024, 64}, true}, Case{{2, 2, 130, 128}, {2, 2, 70, 128}, true},
                        Case{{2, 2, 65, 64}, {2, 2, 191, 64}, false}}) {
    for (DType t : {DType::bf16, DType::f16}) {
      INFO("q " << c.q.str() << " kv " << c.kv.str() << " causal " << c.causal << " " << dtype_name(t));
      const Inputs in(key, c, t);
      const Result& want = in.want;
      Result got[2];
      for (int mma = 0; mma < 2; ++mma) {
        INFO((mma ? "tensor cores" : "FP32 kernels"));
        kernels::cuda::set_attention_tensor_cores(mma == 1);
        got[mma] = run(in.q, in.k, in.v, in.ct, c.causal, Device::cuda(0));
        CHECK(rel_error(got[mma].o, want.o) <= 1e-2);
        CHECK(rel_error(got[mma].dq, want.dq) <= 1e-2);
        CHECK(rel_error(got[mma].dk, want.dk) <= 1e-2);
        CHECK(rel_error(got[mma].dv, want.dv) <= 1e-2);
      }
      kernels::cuda::set_attention_tensor_cores(true);
      // The switch really changes kernels: the tensor cores round P to 16 bits before P V.
      const Tensor a = got[0].o.to(Device::cpu()).astype(DType::f32), b = got[1].o.to(Device::cpu()).astype(DType::f32);
      CHECK(a.to_vector<float>() != b.to_vector<float>());
    }
  }
  SECTION("operands not 16-byte aligned take the FP32 kernels, with the same results") {
    const Shape s{1, 2, 100, 64};
    const int64_t n = s.numel();
    auto shifted = [&](uint64_t i) {  // a contiguous view one element into its buffer: 2 bytes off
      const Tensor flat = testing::randn64(fold_in(key, 10 + i), Shape{n + 1}).astype(DType::bf16);
      return flat.slice(0, 1, n + 1).reshape(s);
    };
    const Tensor q = shifted(0), k = shifted(1), v = shifted(2), ct = shifted(3);
    const Result want = run(q.astype(DType::f32), k.astype(DType::f32), v.astype(DType::f32), ct.astype(DType::f32), true,
                            Device::cpu());
    const Tensor dq = q.to(Device::cuda(0)), dk = k.to(Device::cuda(0)), dv = v.to(Device::cuda(0));
    // to() copies into fresh (aligned) memory: cut the misaligned views on the device instead.
    auto device_shifted = [&](const Tensor& t) {
      Tensor flat = zeros(Shape{n + 1}, t.dtype(), Device::cuda(0));
      Tensor view = flat.slice(0, 1, n + 1).reshape(s);
      copy_(view, t);
      return view;
    };
    Tensor gq = device_shifted(dq), gk = device_shifted(dk), gv = device_shifted(dv);
    for (Tensor* x : {&gq, &gk, &gv}) x->set_requires_grad();
    const Tensor o = scaled_dot_product_attention(gq, gk, gv, true);
    const TensorList g = grad(o, {gq, gk, gv}, BackwardOptions{.seed = device_shifted(ct.to(Device::cuda(0)))});
    CHECK(rel_error(o, want.o) <= 1e-2);
    CHECK(rel_error(g[0], want.dq) <= 1e-2);
    CHECK(rel_error(g[1], want.dk) <= 1e-2);
    CHECK(rel_error(g[2], want.dv) <= 1e-2);
  }
}

TEST_CASE("cuda attention: the default backward repeats bitwise; FA2's fused backward (atomic dq) matches the CPU; "
          "16 or 32 rows per warp give the same o and gradients") {
  const uint64_t seed = seed_now();
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  REQUIRE(kernels::cuda::attention_deterministic());
  for (const Case& c : {Case{{2, 12, 1024, 64}, {2, 12, 1024, 64}, true}, Case{{2, 2, 130, 128}, {2, 2, 70, 128}, true},
                        Case{{2, 2, 65, 64}, {2, 2, 191, 64}, false}}) {
    INFO("q " << c.q.str() << " kv " << c.kv.str() << " causal " << c.causal);
    const Inputs in(key, c, DType::bf16);
    const Result det[2] = {run(in.q, in.k, in.v, in.ct, c.causal, Device::cuda(0)),
                           run(in.q, in.k, in.v, in.ct, c.causal, Device::cuda(0))};
    CHECK(testing::bitwise_equal(det[0].dq, det[1].dq));
    CHECK(testing::bitwise_equal(det[0].dk, det[1].dk));
    kernels::cuda::set_attention_deterministic(false);
    const Result fused = run(in.q, in.k, in.v, in.ct, c.causal, Device::cuda(0));
    kernels::cuda::set_attention_deterministic(true);
    CHECK(rel_error(fused.dq, in.want.dq) <= 1e-2);
    CHECK(rel_error(fused.dk, in.want.dk) <= 1e-2);
    CHECK(rel_error(fused.dv, in.want.dv) <= 1e-2);
    // dk and dv are the deterministic kernel's computation, in the same order.
    CHECK(testing::bitwise_equal(fused.dk, det[0].dk));
    CHECK(testing::bitwise_equal(fused.dv, det[0].dv));
    // 16 rows per warp instead of 32 (queries in the forward and dq, keys in dk / dv): bitwise the same.
    kernels::cuda::set_attention_rows_per_warp(16);
    const Result narrow = run(in.q, in.k, in.v, in.ct, c.causal, Device::cuda(0));
    kernels::cuda::set_attention_rows_per_warp(32);
    CHECK(testing::bitwise_equal(narrow.o, det[0].o));
    CHECK(testing::bitwise_equal(narrow.dq, det[0].dq));
    CHECK(testing::bitwise_equal(narrow.dk, det[0].dk));
    CHECK(testing::bitwise_equal(narrow.dv, det[0].dv));
  }
  CHECK_THROWS_AS(kernels::cuda::set_attention_rows_per_warp(24), ValueError);
}

TEST_CASE("cuda attention: a scale <= 0 (the tensor-core forward takes the row max unscaled) still matches the CPU") {
  const uint64_t seed = seed_now();
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  const Shape s{1, 2, 130, 64};
  auto fresh = [&](uint64_t i) { return testing::randn64(fold_in(key, i), s).astype(DType::bf16); };
  const Tensor q = fresh(1), k = fresh(2), v = fresh(3);
  for (double scale : {-0.3, 0.0, 0.125}) {
    INFO("scale " << scale);
    const Tensor want = scaled_dot_product_attention(q.astype(DType::f32), k.astype(DType::f32), v.astype(DType::f32),
                                                     true, scale);
    const Tensor got = scaled_dot_product_attention(q.to(Device::cuda(0)), k.to(Device::cuda(0)), v.to(Device::cuda(0)),
                                                    true, scale);
    CHECK(rel_error(got, want) <= 1e-2);
  }
}

TEST_CASE("cuda attention: q, k, v views of one projection and the permuted cotangent are read in place; "
          "a view the kernels cannot read is copied once") {
  const uint64_t seed = seed_now();
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  const int64_t B = 2, T = 130, H = 3, D = 64;
  // [B, T, 3, H, D] cut into q, k, v [B, H, T, D] (views) as engine/gpt.cpp does; o goes back to [B, T, H * D],
  // so its cotangent reaches the backward as a [B, H, T, D] permute too. `transposed` hands q over as the
  // transpose of a [B, H, D, T] tensor instead: its features are not contiguous.
  auto step = [&](bool transposed) {
    return [=](const TensorList& in) {
      Tensor qkv = in[0].detach();
      qkv.set_requires_grad();
      const TensorList cut = cut_qkv(qkv);
      const Tensor q = transposed ? cut[0].transpose(2, 3).contiguous().transpose(2, 3) : cut[0];
      const Tensor o = scaled_dot_product_attention(q, cut[1], cut[2], true).permute({0, 2, 1, 3}).reshape(Shape{B, T, H * D});
      return TensorList{o.detach(), grad(sum(o * in[1]), {qkv})[0]};
    };
  };
  const Tensor qkv = testing::randn64(fold_in(key, 1), Shape{B, T, 3, H, D}).astype(DType::bf16);
  const Tensor ct = testing::randn64(fold_in(key, 2), Shape{B, T, H * D}).astype(DType::bf16);
  const TensorList want = step(false)({qkv.astype(DType::f32), ct.astype(DType::f32)});
  const Device g = Device::cuda(0);
  for (bool transposed : {false, true}) {
    for (bool mma : {true, false}) {
      INFO("q transposed " << transposed << ", " << (mma ? "tensor cores" : "FP32 kernels"));
      kernels::cuda::set_attention_tensor_cores(mma);
      const TensorList got = step(transposed)({qkv.to(g), ct.to(g)});
      kernels::cuda::set_attention_tensor_cores(true);
      CHECK(rel_error(got[0], want[0]) <= 1e-2);
      CHECK(rel_error(got[1], want[1]) <= 1e-2);
    }
    // Which inputs of the attention ops a copy produced: only the transposed q, once, for both ops.
    const jit::Graph gr = jit::trace(step(transposed), {qkv.to(g), ct.to(g)});
    const std::vector<int> producer = testing::producers(gr);
    int ops = 0;
    for (const auto& n : gr.nodes) {
      const std::string name = n.op->name();
      const bool fwd = name == "scaled_dot_product_attention";
      if (!fwd && name != "scaled_dot_product_attention_backward") continue;
      ++ops;
      for (size_t k : fwd ? std::vector<size_t>{0, 1, 2} : std::vector<size_t>{0, 1, 2, 5}) {  // q, k, v (, dout)
        INFO(name << " input " << k);
        const int p = producer[size_t(n.inputs[k])];
        REQUIRE(p >= 0);
        CHECK((std::string(gr.nodes[size_t(p)].op->name()) == "copy") == (transposed && k == 0));
      }
    }
    CHECK(ops == 2);
  }
}

TEST_CASE("cuda attention on a packed qkv: no copy on either side; the same bits as the unpacked op on its parts; "
          "the CPU's values") {
  const uint64_t seed = seed_now();
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  const int64_t B = 2, T = 130, H = 3, D = 64;
  // o and the packed gradient of sum(o * ct) for qkv [B, T, 3, H, D]: by the packed op, or by the unpacked
  // op on the [B, H, T, D] views of its parts (o moved back to [B, T, H, D]).
  auto step = [&](bool packed) {
    return [=](const TensorList& in) {
      Tensor qkv = in[0].detach();
      qkv.set_requires_grad();
      Tensor o;
      if (packed) {
        o = scaled_dot_product_attention_qkvpacked(qkv, true);
      } else {
        const TensorList cut = cut_qkv(qkv);
        o = scaled_dot_product_attention(cut[0], cut[1], cut[2], true).permute({0, 2, 1, 3});
      }
      return TensorList{o.contiguous().detach(), grad(sum(o * in[1]), {qkv})[0]};
    };
  };
  const Tensor qkv = testing::randn64(fold_in(key, 1), Shape{B, T, 3, H, D}).astype(DType::bf16);
  const Tensor ct = testing::randn64(fold_in(key, 2), Shape{B, T, H, D}).astype(DType::bf16);
  const TensorList want = step(true)({qkv.astype(DType::f32), ct.astype(DType::f32)});
  const Device g = Device::cuda(0);
  for (bool mma : {true, false}) {
    INFO((mma ? "tensor cores" : "FP32 kernels"));
    kernels::cuda::set_attention_tensor_cores(mma);
    const TensorList got = step(true)({qkv.to(g), ct.to(g)}), parts = step(false)({qkv.to(g), ct.to(g)});
    kernels::cuda::set_attention_tensor_cores(true);
    CHECK(rel_error(got[0], want[0]) <= 1e-2);
    CHECK(rel_error(got[1], want[1]) <= 1e-2);
    CHECK(rel_error(got[0], parts[0]) == 0.0);  // the same kernels on the same rows (deterministic backward)
    CHECK(rel_error(got[1], parts[1]) == 0.0);
  }
  // Traced: the two attention ops and nothing that copies around them.
  const jit::Graph gr = jit::trace(step(true), {qkv.to(g), ct.to(g)});
  CHECK(testing::count_op(gr, "scaled_dot_product_attention_qkvpacked") == 1);
  CHECK(testing::count_op(gr, "scaled_dot_product_attention_qkvpacked_backward") == 1);
  CHECK(testing::count_op(gr, "copy") == 0);
  CHECK(testing::count_op(gr, "concat") == 0);
}
