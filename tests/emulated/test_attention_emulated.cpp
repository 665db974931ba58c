// The attention kernels, tensor-core (kernels/cuda/attention_mma.cuh) and FP32 (attention_fp32.cuh), run on
// the CPU through an emulation of the GPU primitives they are written against (kernels/cuda/hw_policy.h),
// so CI checks the kernels' tiling, fragment indexing, masking, online softmax and shared-memory layout
// without a GPU. Each block runs as 128 host threads: __syncthreads is a barrier of the block, a warp
// shuffle an exchange through the warp's slots between two barriers of the warp, and
// mma.sync.m16n8k16 gathers every lane's A and B registers, rebuilds the 16x16
// and 16x8 matrices from the fragment layout the PTX ISA documents ("Matrix Fragments for mma.m16n8k16
// with floating point type"; written here independently of the kernels' loaders) and gives each lane its
// elements of C += A B. Shared memory and the outputs start as NaN, so an element read before it is
// written, or never written, fails. The results are compared with the CPU attention (kernels/cpu) on the
// same inputs within 1e-2 (f32 through the FP32 kernels: 1e-4), as tests/cuda/test_cuda_attention.cpp
// compares the GPU; the hardware itself (timing, the real instructions) is left to that GPU test.
#include <catch2/catch.hpp>

#include <barrier>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "kernels/cuda/attention_fp32.cuh"
#include "kernels/cuda/attention_mma.cuh"

#include "autodiff/autodiff.h"
#include "cuda/cuda_test_util.h"
#include "op_cases.h"
#include "ops/ops.h"

using namespace titanax;
namespace ma = titanax::kernels::cuda::mma_attention;
namespace fa = titanax::kernels::cuda::fp32_attention;

namespace {

constexpr int kThreads = ma::kMmaThreads, kWarps = kThreads / 32;

// What the threads of one emulated block share.
struct Block {
  int bx = 0, by = 0, gy = 1;
  std::barrier<> block{kThreads};
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  float shfl[kWarps][32] = {};
  uint32_t a[kWarps][32][4] = {}, b[kWarps][32][2] = {};
  Block() {
    for (int w = 0; w < kWarps; ++w) warp.push_back(std::make_unique<std::barrier<>>(32));
  }
};
thread_local Block* t_block = nullptr;
thread_local int t_tid = 0;

float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
float to_float(__half v) { return __half2float(v); }

// The two 16-bit elements of a register as floats (the lower index in the low half).
template <class T>
void unpack(uint32_t u, float& lo, float& hi) {
  T v[2];
  std::memcpy(v, &u, 4);
  lo = to_float(v[0]);
  hi = to_float(v[1]);
}

struct HostPrim {
  static int thread() { return t_tid; }
  static int block_x() { return t_block->bx; }
  static int block_y() { return t_block->by; }
  static int grid_y() { return t_block->gy; }
  static void sync() { t_block->block.arrive_and_wait(); }
  static float shfl_xor(float v, int mask) { return shfl(v, (t_tid % 32) ^ mask); }
  static float shfl(float v, int src_lane) {
    Block& blk = *t_block;
    const int w = t_tid / 32, lane = t_tid % 32;
    blk.shfl[w][lane] = v;
    blk.warp[w]->arrive_and_wait();
    const float r = blk.shfl[w][src_lane];
    blk.warp[w]->arrive_and_wait();
    return r;
  }
  template <class T>
  static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], T) {
    Block& blk = *t_block;
    const int w = t_tid / 32, lane = t_tid % 32;
    std::memcpy(blk.a[w][lane], a, sizeof a);
    std::memcpy(blk.b[w][lane], b, sizeof b);
    blk.warp[w]->arrive_and_wait();
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; ++L) {
      const int g = L / 4, c = L % 4;
      unpack<T>(blk.a[w][L][0], A[g][2 * c], A[g][2 * c + 1]);
      unpack<T>(blk.a[w][L][1], A[g + 8][2 * c], A[g + 8][2 * c + 1]);
      unpack<T>(blk.a[w][L][2], A[g][2 * c + 8], A[g][2 * c + 9]);
      unpack<T>(blk.a[w][L][3], A[g + 8][2 * c + 8], A[g + 8][2 * c + 9]);
      unpack<T>(blk.b[w][L][0], B[2 * c][g], B[2 * c + 1][g]);
      unpack<T>(blk.b[w][L][1], B[2 * c + 8][g], B[2 * c + 9][g]);
    }
    blk.warp[w]->arrive_and_wait();  // every lane has read the registers before they are overwritten
    const int g = lane / 4, c = lane % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e / 2), col = 2 * c + e % 2;
      float s = 0.f;
      for (int kk = 0; kk < 16; ++kk) s += A[row][kk] * B[kk][col];
      d[e] += s;
    }
  }
  static uint32_t ld32(const void* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
  }
  static void st32(void* p, uint32_t v) { std::memcpy(p, &v, 4); }
  static void copy16(void* d, const void* s) { std::memcpy(d, s, 16); }
  static void zero16(void* d) { std::memset(d, 0, 16); }
};

// Runs body(smem) as a grid gx x gy of 128-thread blocks, one block at a time; shared memory starts as NaN.
template <class Body>
void launch(int64_t gx, int gy, size_t smem_bytes, Body body) {
  for (int by = 0; by < gy; ++by)
    for (int64_t bx = 0; bx < gx; ++bx) {
      Block blk;
      blk.bx = int(bx), blk.by = by, blk.gy = gy;
      std::vector<unsigned char> smem(smem_bytes + 16, 0xff);  // 0xffff: NaN in bf16 and f16
      unsigned char* base = smem.data() + (16 - reinterpret_cast<uintptr_t>(smem.data()) % 16) % 16;
      std::vector<std::thread> threads;
      for (int t = 0; t < kThreads; ++t)
        threads.emplace_back([&, t] {
          t_block = &blk;
          t_tid = t;
          body(base);
        });
      for (auto& th : threads) th.join();
    }
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
};

// The problem's buffers (inputs rounded to T once; outputs and lse NaN before the kernels run), and the
// CPU's results on the same values in f32.
template <class T>
struct Buffers {
  Problem pb;
  Tensor q, k, v, ct, o, dq, dk, dv, lse;
  Tensor o_ref;
  TensorList g_ref;
  double scale;
  Buffers(const Problem& p, RngKey key) : pb(p), scale(1.0 / std::sqrt(double(p.D))) {
    const DType dt = Dtype<T>::value;
    const Shape sq{pb.N, pb.Tq, pb.D}, sk{pb.N, pb.Tk, pb.D};
    q = testing::randn64(fold_in(key, 1), sq).astype(dt), k = testing::randn64(fold_in(key, 2), sk).astype(dt);
    v = testing::randn64(fold_in(key, 3), sk).astype(dt), ct = testing::randn64(fold_in(key, 4), sq).astype(dt);
    Tensor q32 = q.astype(DType::f32), k32 = k.astype(DType::f32), v32 = v.astype(DType::f32);
    for (Tensor* t : {&q32, &k32, &v32}) t->set_requires_grad();
    o_ref = scaled_dot_product_attention(q32, k32, v32, pb.causal);
    g_ref = grad(o_ref, {q32, k32, v32}, BackwardOptions{.seed = ct.astype(DType::f32)});
    o_ref = o_ref.detach();
    auto nan_like = [&](const Shape& s) { return full(s, std::nan(""), DType::f32).astype(dt); };
    o = nan_like(sq), dq = nan_like(sq), dk = nan_like(sk), dv = nan_like(sk);
    lse = full(Shape{pb.N, pb.Tq}, std::nan(""), DType::f32);
  }
  static const T* in(const Tensor& t) { return static_cast<const T*>(t.raw_data()); }
  static T* out(Tensor& t) { return static_cast<T*>(t.raw_data()); }
  float* lse_out() { return static_cast<float*>(lse.raw_data()); }
  // delta_i = sum_d dout_id o_id from the emulated o (what the GPU's delta kernel computes), after forward.
  Tensor delta() const { return sum(ct.astype(DType::f32) * o.astype(DType::f32), {-1}).contiguous(); }
  void check_forward(double tol) const { CHECK(testing::rel_error(o, o_ref) <= tol); }
  void check_backward(double tol) const {
    const Tensor grads[3] = {dq, dk, dv};
    const char* names[3] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; ++i) {
      INFO(names[i]);
      CHECK(testing::rel_error(grads[i], g_ref[size_t(i)]) <= tol);
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
  launch(blocks(pb.Tq, ma::kMmaRows), pb.grid_y, ma::fwd_smem_bytes<T, D>(), [&](unsigned char* smem) {
    ma::forward<HostPrim, T, D>(B::in(b.q), B::in(b.k), B::in(b.v), B::out(b.o), b.lse_out(), pb.N, pb.Tq, pb.Tk, pb.causal,
                                sl2, smem);
  });
  b.check_forward(1e-2);
  const Tensor delta = b.delta();
  const float* dl = static_cast<const float*>(delta.raw_data());
  launch(blocks(pb.Tq, ma::kMmaRows), pb.grid_y, ma::dq_smem_bytes<T, D>(), [&](unsigned char* smem) {
    ma::backward_dq<HostPrim, T, D>(B::in(b.q), B::in(b.k), B::in(b.v), B::in(b.ct), b.lse_out(), dl, B::out(b.dq), pb.N,
                                    pb.Tq, pb.Tk, pb.causal, sl2, float(b.scale), smem);
  });
  launch(blocks(pb.Tk, ma::kMmaRows), pb.grid_y, ma::dkdv_smem_bytes<T, D>(), [&](unsigned char* smem) {
    ma::backward_dkdv<HostPrim, T, D>(B::in(b.q), B::in(b.k), B::in(b.v), B::in(b.ct), b.lse_out(), dl, B::out(b.dk),
                                      B::out(b.dv), pb.N, pb.Tq, pb.Tk, pb.causal, sl2, float(b.scale), smem);
  });
  b.check_backward(1e-2);
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
    fa::forward<HostPrim, T, DC>(B::in(b.q), B::in(b.k), B::in(b.v), B::out(b.o), b.lse_out(), pb.N, pb.Tq, pb.Tk, D, pb.causal,
                                 float(b.scale), f32(smem));
  });
  b.check_forward(tol);
  const Tensor delta = b.delta();
  const float* dl = static_cast<const float*>(delta.raw_data());
  launch(blocks(pb.Tq, fa::kBlockRows), pb.grid_y, smem_of(fa::dq_smem_floats(D)), [&](unsigned char* smem) {
    fa::backward_dq<HostPrim, T, DC>(B::in(b.q), B::in(b.k), B::in(b.v), B::in(b.ct), b.lse_out(), dl, B::out(b.dq), pb.N,
                                     pb.Tq, pb.Tk, D, pb.causal, float(b.scale), f32(smem));
  });
  launch(blocks(pb.Tk, fa::kBlockRows), pb.grid_y, smem_of(fa::dkdv_smem_floats(D)), [&](unsigned char* smem) {
    fa::backward_dkdv<HostPrim, T, DC>(B::in(b.q), B::in(b.k), B::in(b.v), B::in(b.ct), b.lse_out(), dl, B::out(b.dk),
                                       B::out(b.dv), pb.N, pb.Tq, pb.Tk, D, pb.causal, float(b.scale), f32(smem));
  });
  b.check_backward(tol);
}

}  // namespace

TEST_CASE("tensor-core attention, emulated on the CPU: forward and backward match the CPU kernels", "[emulated]") {
  const uint64_t seed = uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  SECTION("bf16, D 64, causal, Tq != Tk, ragged tiles, blocks looping over n") {
    check_mma<__nv_bfloat16, 64>({2, 130, 70, 64, true, 1}, key);
  }
  SECTION("f16, D 64, full attention, more keys than queries") { check_mma<__half, 64>({1, 65, 150, 64, false, 1}, key); }
  SECTION("bf16, D 128, causal") { check_mma<__nv_bfloat16, 128>({1, 70, 70, 128, true, 1}, key); }
  SECTION("f16, D 64, causal, the last query row alone in its key tile") { check_mma<__half, 64>({1, 65, 65, 64, true, 1}, key); }
}

TEST_CASE("FP32 attention kernels, emulated on the CPU: forward and backward match the CPU kernels", "[emulated]") {
  const uint64_t seed = uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
  INFO("seed " << seed);
  const RngKey key = RngKey::from_seed(seed);
  SECTION("f32, D 40 (a partial lane chunk), causal, Tq != Tk, blocks looping over n") {
    check_fp32<float, 2>({2, 50, 37, 40, true, 1}, key);
  }
  SECTION("f32, D 64, full attention, more keys than queries") { check_fp32<float, 2>({1, 33, 70, 64, false, 1}, key); }
  SECTION("bf16, D 128, causal") { check_fp32<__nv_bfloat16, 4>({1, 40, 40, 128, true, 1}, key); }
  SECTION("f16, D 24, causal, a query row alone in its tile") { check_fp32<__half, 1>({1, 33, 33, 24, true, 1}, key); }
}
