// A CPU emulation of the GPU primitives that kernels written against kernels/cuda/hw_policy.h use, for
// the tests in tests/emulated/. launch() runs a grid one block at a time; a block's threads are host
// threads. __syncthreads is a barrier of the block; a warp shuffle an exchange through the warp's slots
// between two barriers of the warp (every lane of a warp must take part, as on the GPU with a full mask);
// mma.sync.m16n8k16 gathers every lane's A and B registers, rebuilds the 16x16 and 16x8 matrices from the
// fragment layout the PTX ISA documents ("Matrix Fragments for mma.m16n8k16 with floating point type";
// written here independently of the kernels' loaders) and gives each lane its elements of C += A B;
// ldmatrix gathers the warp's row addresses and gives each lane its elements by the ISA's layout (lane
// 8 m + i addresses row i of matrix m; lane 4 g + c receives (g, 2c), (g, 2c + 1), transposed (2c, g),
// (2c + 1, g)); cp.async is asynchronous in the way that matters to correctness: the destination reads as
// NaN from the issue until the issuing thread waits for the copy's group, and only then holds the data,
// so a read before the wait and the barrier after it, or a copy into a buffer other warps still read,
// shows as NaN. Copies never waited for, and misaligned ldmatrix / cp.async addresses, fail the launch.
// red.global.add is an atomic add on the host (blocks run one after another, so only a block's own
// threads could race), ex2.approx.ftz an exact exp2 whose subnormal results flush to 0. report() keeps
// the first report, as the device's slot does. Dynamic shared memory starts as NaN (0xff bytes), so a
// read before a write shows. The hardware itself (timing, the real instructions,
// memory ordering) is left to the GPU tests.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda/launch.h"

namespace titanax::testing::emu {

// What the threads of one emulated block share.
struct Block {
  int threads = 0, bx = 0, by = 0, gx = 1, gy = 1;
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  std::vector<double> shfl;          // [warp][lane]
  std::vector<uint32_t> a, b;        // [warp][lane][4], [warp][lane][2]
  std::vector<const void*> rows;     // [warp][lane]: ldmatrix row addresses
  std::mutex mu;
  std::string fault;                 // the first misuse of a primitive, if any
  explicit Block(int n) : threads(n), block(std::make_unique<std::barrier<>>(n)) {
    for (int w = 0; w < n / 32; ++w) warp.push_back(std::make_unique<std::barrier<>>(32));
    shfl.assign(size_t(n), 0.0);
    a.assign(size_t(n) * 4, 0u);
    b.assign(size_t(n) * 2, 0u);
    rows.assign(size_t(n), nullptr);
  }
  void fail(const std::string& what) {
    std::lock_guard<std::mutex> g(mu);
    if (fault.empty()) fault = what;
  }
};
inline thread_local Block* t_block = nullptr;
inline thread_local int t_tid = 0;

// A thread's cp.async copies: those not yet committed, and the committed groups, oldest first.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;
  bool valid;
};
inline thread_local std::vector<AsyncCopy> t_open;
inline thread_local std::deque<std::vector<AsyncCopy>> t_groups;

inline bool aligned(const void* p, size_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

// The first report since reset_report(), as the device's report slot keeps it.
struct Reported {
  std::mutex mu;
  bool any = false;
  kernels::cuda::DeviceReport r;
};
inline Reported& reported() {
  static Reported rep;
  return rep;
}
inline void reset_report() {
  std::lock_guard<std::mutex> g(reported().mu);
  reported().any = false;
  reported().r = {};
}

inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float to_float(__half v) { return __half2float(v); }

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
  static int threads() { return t_block->threads; }
  static int block_x() { return t_block->bx; }
  static int block_y() { return t_block->by; }
  static int grid_x() { return t_block->gx; }
  static int grid_y() { return t_block->gy; }
  static void sync() { t_block->block->arrive_and_wait(); }
  static double exchange(double v, int src_lane) {
    Block& blk = *t_block;
    const int w = t_tid / 32;
    blk.shfl[size_t(t_tid)] = v;
    blk.warp[size_t(w)]->arrive_and_wait();
    const double r = blk.shfl[size_t(w * 32 + src_lane)];
    blk.warp[size_t(w)]->arrive_and_wait();
    return r;
  }
  static float shfl(float v, int src_lane) { return float(exchange(v, src_lane)); }
  static float shfl_xor(float v, int mask) { return float(exchange(v, (t_tid % 32) ^ mask)); }
  static double shfl_xor(double v, int mask) { return exchange(v, (t_tid % 32) ^ mask); }
  template <class T>
  static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], T) {
    Block& blk = *t_block;
    const int w = t_tid / 32, lane = t_tid % 32;
    std::memcpy(&blk.a[size_t(t_tid) * 4], a, sizeof a);
    std::memcpy(&blk.b[size_t(t_tid) * 2], b, sizeof b);
    blk.warp[size_t(w)]->arrive_and_wait();
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; ++L) {
      const int g = L / 4, c = L % 4;
      const uint32_t* ra = &blk.a[size_t(w * 32 + L) * 4];
      const uint32_t* rb = &blk.b[size_t(w * 32 + L) * 2];
      unpack<T>(ra[0], A[g][2 * c], A[g][2 * c + 1]);
      unpack<T>(ra[1], A[g + 8][2 * c], A[g + 8][2 * c + 1]);
      unpack<T>(ra[2], A[g][2 * c + 8], A[g][2 * c + 9]);
      unpack<T>(ra[3], A[g + 8][2 * c + 8], A[g + 8][2 * c + 9]);
      unpack<T>(rb[0], B[2 * c][g], B[2 * c + 1][g]);
      unpack<T>(rb[1], B[2 * c + 8][g], B[2 * c + 9][g]);
    }
    blk.warp[size_t(w)]->arrive_and_wait();  // every lane has read the registers before they are overwritten
    const int g = lane / 4, c = lane % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e / 2), col = 2 * c + e % 2;
      float s = 0.f;
      for (int kk = 0; kk < 16; ++kk) s += A[row][kk] * B[kk][col];
      d[e] += s;
    }
  }
  static void st32(void* p, uint32_t v) { std::memcpy(p, &v, 4); }
  static void ldsm(uint32_t (&r)[4], const void* row, bool trans) {
    Block& blk = *t_block;
    const int w = t_tid / 32, lane = t_tid % 32;
    if (!aligned(row, 16)) blk.fail("ldmatrix: a row address not 16-byte aligned");
    blk.rows[size_t(t_tid)] = row;
    blk.warp[size_t(w)]->arrive_and_wait();
    auto element = [&](int m, int i, int j) {  // element (i, j) of matrix m
      uint16_t e;
      std::memcpy(&e, static_cast<const unsigned char*>(blk.rows[size_t(w * 32 + 8 * m + i)]) + 2 * j, 2);
      return uint32_t(e);
    };
    const int g = lane / 4, c = lane % 4;
    for (int m = 0; m < 4; ++m)
      r[m] = trans ? element(m, 2 * c, g) | element(m, 2 * c + 1, g) << 16 : element(m, g, 2 * c) | element(m, g, 2 * c + 1) << 16;
    blk.warp[size_t(w)]->arrive_and_wait();  // every lane has read the addresses before they are overwritten
  }
  static void ldsm_x4(uint32_t (&r)[4], const void* row) { ldsm(r, row, false); }
  static void ldsm_x4_trans(uint32_t (&r)[4], const void* row) { ldsm(r, row, true); }
  static void cp_async(void* d, const void* s, int bytes, bool valid) {
    if (!aligned(d, size_t(bytes)) || (valid && !aligned(s, size_t(bytes))))
      t_block->fail("cp.async: an address not aligned to the copy's size");
    std::memset(d, 0xff, size_t(bytes));  // undefined (NaN) while in flight
    t_open.push_back({d, s, bytes, valid});
  }
  static void cp_async16(void* d, const void* s, bool valid) { cp_async(d, s, 16, valid); }
  static void cp_async4(void* d, const void* s, bool valid) { cp_async(d, s, 4, valid); }
  static void cp_async_commit() {
    t_groups.push_back(std::move(t_open));
    t_open.clear();
  }
  static void cp_async_wait(int pending) {
    while (t_groups.size() > size_t(pending)) {
      for (const AsyncCopy& cp : t_groups.front()) {
        if (cp.valid) std::memcpy(cp.dst, cp.src, size_t(cp.bytes));
        else std::memset(cp.dst, 0, size_t(cp.bytes));
      }
      t_groups.pop_front();
    }
  }
  static float exp2_ftz(float x) {
    const float y = std::exp2(x);
    return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
  }
  static void red_add_f32x2(float* p, float a, float b) {
    if (!aligned(p, 8)) t_block->fail("red.global.add.v2.f32: an address not 8-byte aligned");
    std::atomic_ref<float>(p[0]).fetch_add(a);
    std::atomic_ref<float>(p[1]).fetch_add(b);
  }
  static void report(const kernels::cuda::ReportSlot&, int code, int64_t index, int64_t value, int64_t bound, int64_t aux) {
    std::lock_guard<std::mutex> g(reported().mu);
    if (reported().any) return;
    reported().any = true;
    reported().r = {code, index, value, bound, aux};
  }
};

/// Runs body(smem) as a grid gx x gy of blocks of `threads` threads (a multiple of 32), one block at a
/// time; `smem_bytes` of dynamic shared memory (16-byte aligned) start as NaN. Throws std::runtime_error
/// naming the block when a primitive was misused (see above).
template <class Body>
void launch(int64_t gx, int gy, int threads, size_t smem_bytes, Body body) {
  for (int by = 0; by < gy; ++by)
    for (int64_t bx = 0; bx < gx; ++bx) {
      Block blk(threads);
      blk.bx = int(bx), blk.by = by, blk.gx = int(gx), blk.gy = gy;
      std::vector<unsigned char> smem(smem_bytes + 16, 0xff);  // 0xffff: NaN in bf16 and f16, 0xffffffff in f32
      unsigned char* base = smem.data() + (16 - reinterpret_cast<uintptr_t>(smem.data()) % 16) % 16;
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
          t_block = &blk;
          t_tid = t;
          body(base);
          if (!t_open.empty() || !t_groups.empty()) blk.fail("cp.async copies issued but never waited for");
        });
      for (auto& th : pool) th.join();
      if (!blk.fault.empty()) throw std::runtime_error("emulated block (" + std::to_string(bx) + ", " + std::to_string(by) + "): " + blk.fault);
    }
}

}  // namespace titanax::testing::emu
