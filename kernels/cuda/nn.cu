// Neural-network kernels: softmax / log-softmax, fused cross-entropy forward and backward, layer norm
// forward and backward (their block bodies are in kernels/cuda/rows.cuh, over the GPU's primitives here),
// the column softmax, gather / deterministic scatter-add (embedding), dropout (Philox: the CPU's mask; these
// bodies in kernels/cuda/index.cuh).
#include <cub/device/device_radix_sort.cuh>

#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/index.cuh"
#include "kernels/cuda/rows.cuh"

namespace titanax::kernels::cuda {
namespace {

using namespace row_kernels;
namespace ik = index_kernels;

// The row cache of a row kernel: its dynamic shared memory when the launch gave it some (row_launch).
template <class T>
__device__ __forceinline__ T* row_cache(unsigned char* smem, bool cached) {
  return cached ? reinterpret_cast<T*>(smem) : nullptr;
}

template <class T>
__global__ void k_softmax_rows(const T* x, T* y, int64_t rows, int64_t n, bool log, bool cached) {
  extern __shared__ __align__(16) unsigned char smem[];
  softmax_rows<DevicePrim>(x, y, rows, n, log, row_cache<T>(smem, cached));
}

template <class T>
__global__ void k_softmax_cols(const T* x, T* y, int64_t outer, int64_t n, int64_t inner, bool log) {
  softmax_cols<DevicePrim>(x, y, outer, n, inner, log);
}

template <class L>
__global__ void k_ce_labels(const L* lab, int64_t R, int64_t C, int64_t ignore, int64_t* count, ReportSlot slot) {
  ce_labels<DevicePrim>(lab, R, C, ignore, count, slot);
}

// T: the logits' storage type; the loss and its cotangent are compute_t<T> (f32 for f16 / bf16 logits).
template <class T, class L>
__global__ void k_ce_fused(const T* x, const L* lab, const compute_t<T>* ct, int64_t R, int64_t C, int64_t ignore, int red,
                           const int64_t* count, compute_t<T>* out, double* rows, T* dx, bool cached) {
  extern __shared__ __align__(16) unsigned char smem[];
  ce_fused<DevicePrim>(x, lab, ct, R, C, ignore, red, count, out, rows, dx, row_cache<T>(smem, cached));
}

template <class T>
__global__ void k_ce_total(const double* rows, int64_t R, int red, const int64_t* count, T* out) {
  ce_total<DevicePrim>(rows, R, red, count, out);
}

template <class T, class L>
__global__ void k_ce_backward(const T* x, const L* lab, const compute_t<T>* ct, int64_t R, int64_t C, int64_t ignore,
                              int red, const int64_t* count, T* dx, bool cached) {
  extern __shared__ __align__(16) unsigned char smem[];
  ce_backward<DevicePrim>(x, lab, ct, R, C, ignore, red, count, dx, row_cache<T>(smem, cached));
}

// body(p) with p the labels / indices at `p` as const int64_t* (i64) or const int32_t*.
template <class Body>
void with_index_type(bool i64, const void* p, Body body) {
  if (i64) body(static_cast<const int64_t*>(p));
  else body(static_cast<const int32_t*>(p));
}

// The labels' check and count (k_ce_labels), for both directions.
int launch_ce_labels(bool lab64, const void* lab, int64_t R, int64_t C, int64_t ignore, int64_t* count,
                     const ReportSlot& slot, cudaStream_t st) {
  with_index_type(lab64, lab, [&](auto l) { k_ce_labels<<<1, 1024, 0, st>>>(l, R, C, ignore, count, slot); });
  return int(cudaGetLastError());
}

template <class T>
__global__ void k_layer_norm(const T* x, const T* w, const T* b, int64_t R, int64_t D, double eps, T* y) {
  layer_norm<DevicePrim>(x, w, b, R, D, eps, y);
}

template <class T>
__global__ void k_layer_norm_dx(const T* dy, const T* x, const T* w, const T* res, int64_t R, int64_t D, double eps, T* dx,
                                double* stats) {
  layer_norm_dx<DevicePrim>(dy, x, w, res, R, D, eps, dx, stats);
}

// KV float4 per lane: ln_warp_vecs(D).
template <int KV>
__global__ void __launch_bounds__(kThreads) k_layer_norm_warp(const float* x, const float* w, const float* b, int64_t R,
                                                              int64_t D, double eps, float* y) {
  layer_norm_warp<DevicePrim, KV>(x, w, b, R, D, eps, y);
}

template <int KV>
__global__ void __launch_bounds__(kThreads) k_layer_norm_dx_warp(const float* dy, const float* x, const float* w,
                                                                 const float* res, int64_t R, int64_t D, double eps,
                                                                 float* dx, double* stats) {
  layer_norm_dx_warp<DevicePrim, KV>(dy, x, w, res, R, D, eps, dx, stats);
}

template <class T>
__global__ void k_layer_norm_dwdb_partial(const T* dy, const T* x, const double* stats, int64_t R, int64_t D,
                                          double* partial) {
  layer_norm_dwdb_partial<DevicePrim>(dy, x, stats, R, D, partial);
}

template <class T>
__global__ void k_layer_norm_dwdb_total(const double* partial, int64_t R, int64_t D, T* dw, T* db) {
  layer_norm_dwdb_total<DevicePrim>(partial, R, D, dw, db);
}

template <class T, class I>
__global__ void k_gather(const T* x, const I* idx, int64_t A, int64_t n, int64_t B, int64_t K, int op, ReportSlot slot,
                         T* out) {
  ik::gather<DevicePrim>(x, idx, A, n, B, K, op, slot, out);
}

template <class I>
__global__ void k_scatter_keys(const I* idx, int64_t K, int64_t n, int op, ReportSlot slot, uint64_t* keys, int64_t* ks) {
  ik::scatter_keys<DevicePrim>(idx, K, n, op, slot, keys, ks);
}

__global__ void k_row_starts(const uint64_t* sorted, int64_t K, int64_t n, int64_t* row_start) {
  ik::row_starts<DevicePrim>(sorted, K, n, row_start);
}

template <class T>
__global__ void k_scatter_add(const T* g, const int64_t* row_start, const int64_t* ks, int64_t A, int64_t n,
                              int64_t B, int64_t K, T* out) {
  ik::scatter_add<DevicePrim>(g, row_start, ks, A, n, B, K, out);
}

unsigned row_blocks(int64_t R) { return unsigned(R < 1 ? 1 : (R > 65535 * 4 ? 65535 * 4 : R)); }

// A row kernel's block size and row cache: 1024 threads for wide rows (GPT-2's 50304 logits), and the
// row in shared memory when it fits the device's opt-in limit (less 1 KB for the block reductions'
// partials), so that a kernel reading the row twice reads global memory once.
struct RowLaunch {
  unsigned threads;
  size_t smem;  // 0: no cache
};
template <class T, class K>
RowLaunch row_launch(K kernel, int64_t n, bool wants_cache) {
  int dev = 0, lim = 0;  // the current device's opt-in limit, bytes (a cached attribute: cheap to ask)
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&lim, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    lim = 0;
  const size_t bytes = size_t(n) * sizeof(T);
  RowLaunch rl{n >= 8192 ? 1024u : unsigned(kThreads), 0};
  if (wants_cache && lim > 1024 && bytes <= size_t(lim - 1024) && allow_smem(kernel, bytes) == 0) rl.smem = bytes;
  return rl;
}
template <class Body>
int floating(Dt t, Body body) {
  if (t == Dt::f32) body(float{});
  else if (t == Dt::f64) body(double{});
  else return int(cudaErrorInvalidValue);
  return int(cudaGetLastError());
}

}  // namespace

int launch_softmax(Dt t, const void* x, void* y, int64_t outer, int64_t n, int64_t inner, bool log, void* stream) {
  if (outer * n * inner == 0) return 0;
  return floating(t, [&](auto v) {
    using T = decltype(v);
    if (inner == 1) {
      const RowLaunch rl = row_launch<T>(k_softmax_rows<T>, n, true);
      k_softmax_rows<<<row_blocks(outer), rl.threads, rl.smem, as_stream(stream)>>>(
          static_cast<const T*>(x), static_cast<T*>(y), outer, n, log, rl.smem > 0);
    } else
      k_softmax_cols<<<grid_for(outer * inner), kThreads, 0, as_stream(stream)>>>(
          static_cast<const T*>(x), static_cast<T*>(y), outer, n, inner, log);
  });
}

int launch_cross_entropy_fused(Dt t, bool lab64, const void* x, const void* lab, const void* ct, int64_t R, int64_t C,
                               int64_t ignore, int red, int64_t* count, const ReportSlot& slot, void* out, double* rows,
                               void* dx, void* stream) {
  auto st = as_stream(stream);
  if (const int err = launch_ce_labels(lab64, lab, R, C, ignore, count, slot, st)) return err;
  return dispatch_floating(t, [&](auto v) {
    using T = decltype(v);
    using LT = compute_t<T>;  // the loss type
    if (R > 0) {
      // The forward alone reads each row once: no cache.
      with_index_type(lab64, lab, [&](auto l) {
        using L = std::remove_cv_t<std::remove_pointer_t<decltype(l)>>;
        const RowLaunch rl = row_launch<T>(k_ce_fused<T, L>, C, dx != nullptr);
        k_ce_fused<<<row_blocks(R), rl.threads, rl.smem, st>>>(static_cast<const T*>(x), l, static_cast<const LT*>(ct), R,
                                                               C, ignore, red, count, static_cast<LT*>(out), rows,
                                                               static_cast<T*>(dx), rl.smem > 0);
      });
    }
    if (red != 2) k_ce_total<<<1, 1024, 0, st>>>(rows, R, red, count, static_cast<LT*>(out));
  });
}

int launch_cross_entropy_backward(Dt t, bool lab64, const void* x, const void* lab, const void* ct, int64_t R,
                                  int64_t C, int64_t ignore, int red, int64_t* count, const ReportSlot& slot,
                                  void* dx, void* stream) {
  if (R * C == 0) return 0;
  auto st = as_stream(stream);
  if (const int err = launch_ce_labels(lab64, lab, R, C, ignore, count, slot, st)) return err;
  return dispatch_floating(t, [&](auto v) {
    using T = decltype(v);
    with_index_type(lab64, lab, [&](auto l) {
      using L = std::remove_cv_t<std::remove_pointer_t<decltype(l)>>;
      const RowLaunch rl = row_launch<T>(k_ce_backward<T, L>, C, true);
      k_ce_backward<<<row_blocks(R), rl.threads, rl.smem, st>>>(static_cast<const T*>(x), l,
                                                                static_cast<const compute_t<T>*>(ct), R, C, ignore, red,
                                                                count, static_cast<T*>(dx), rl.smem > 0);
    });
  });
}

namespace {
template <class T>
__global__ void k_ce_shard_max(const T* x, int64_t R, int64_t C, double* gmax) {
  ce_shard_max<DevicePrim>(x, R, C, gmax);
}
template <class T, class L>
__global__ void k_ce_shard_partials(const T* x, const L* lab, int64_t R, int64_t C, int64_t lo, const double* gmax,
                                    double* part) {
  ce_shard_partials<DevicePrim>(x, lab, R, C, lo, gmax, part);
}
template <class T, class L>
__global__ void k_ce_shard_backward(const T* x, const L* lab, const T* ct, int64_t R, int64_t C, int64_t lo,
                                    const double* stats, int64_t ignore, int red, int64_t count, T* dx) {
  ce_shard_backward<DevicePrim>(x, lab, ct, R, C, lo, stats, ignore, red, count, dx);
}
}  // namespace

int launch_ce_shard_max(Dt t, const void* x, int64_t R, int64_t C, double* gmax, void* stream) {
  if (R == 0) return 0;
  return floating(t, [&](auto v) {
    using T = decltype(v);
    k_ce_shard_max<<<row_blocks(R), kThreads, 0, as_stream(stream)>>>(static_cast<const T*>(x), R, C, gmax);
  });
}

int launch_ce_shard_partials(Dt t, bool lab64, const void* x, const void* lab, int64_t R, int64_t C, int64_t lo,
                             const double* gmax, double* part, void* stream) {
  if (R == 0) return 0;
  return floating(t, [&](auto v) {
    using T = decltype(v);
    with_index_type(lab64, lab, [&](auto l) {
      k_ce_shard_partials<<<row_blocks(R), kThreads, 0, as_stream(stream)>>>(static_cast<const T*>(x), l, R, C, lo, gmax,
                                                                              part);
    });
  });
}

int launch_ce_shard_backward(Dt t, bool lab64, const void* x, const void* lab, const void* ct, int64_t R, int64_t C,
                             int64_t lo, const double* stats, int64_t ignore, int red, int64_t count, void* dx,
                             void* stream) {
  if (R * C == 0) return 0;
  return floating(t, [&](auto v) {
    using T = decltype(v);
    with_index_type(lab64, lab, [&](auto l) {
      k_ce_shard_backward<<<row_blocks(R), kThreads, 0, as_stream(stream)>>>(static_cast<const T*>(x), l,
                                                                              static_cast<const T*>(ct), R, C, lo, stats,
                                                                              ignore, red, count, static_cast<T*>(dx));
    });
  });
}

// Whether layer norm takes the warp-per-row kernels (rows.cuh: f32, D a multiple of 4 up to 1024, every
// operand 16-byte aligned), and their grid: kThreads / 32 rows per block.
bool ln_warp_path(Dt t, int64_t D, std::initializer_list<const void*> ptrs) {
  if (t != Dt::f32 || !ln_warp_rows(D)) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}
unsigned warp_row_blocks(int64_t R) { return grid_for(R, kThreads / 32); }

int launch_layer_norm(Dt t, const void* x, const void* w, const void* b, int64_t R, int64_t D, double eps, void* y,
                      void* stream) {
  if (R * D == 0) return 0;
  if (ln_warp_path(t, D, {x, w, b, y})) {
    with_ln_warp_vecs(D, [&](auto kv) {
      k_layer_norm_warp<decltype(kv)::value><<<warp_row_blocks(R), kThreads, 0, as_stream(stream)>>>(
          static_cast<const float*>(x), static_cast<const float*>(w), static_cast<const float*>(b), R, D, eps,
          static_cast<float*>(y));
    });
    return int(cudaGetLastError());
  }
  return floating(t, [&](auto v) {
    using T = decltype(v);
    k_layer_norm<<<row_blocks(R), kThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(b), R, D, eps, static_cast<T*>(y));
  });
}

size_t layer_norm_backward_workspace(int64_t R, int64_t D) {
  return size_t(2 * R + 2 * ln_chunks(R) * D);
}

int launch_layer_norm_backward(Dt t, const void* dy, const void* x, const void* w, const void* res, int64_t R, int64_t D,
                               double eps, void* dx, void* dw, void* db, double* work, void* stream) {
  if (D == 0) return 0;
  auto st = as_stream(stream);
  double* stats = work;             // [R][2]: mean, rstd
  double* partial = work + 2 * R;   // [2][chunks][D]
  return floating(t, [&](auto v) {
    using T = decltype(v);
    if (R > 0 && ln_warp_path(t, D, {dy, x, w, res, dx}))
      with_ln_warp_vecs(D, [&](auto kv) {
        k_layer_norm_dx_warp<decltype(kv)::value><<<warp_row_blocks(R), kThreads, 0, st>>>(
            static_cast<const float*>(dy), static_cast<const float*>(x), static_cast<const float*>(w),
            static_cast<const float*>(res), R, D, eps, static_cast<float*>(dx), stats);
      });
    else if (R > 0)
      k_layer_norm_dx<<<row_blocks(R), kThreads, 0, st>>>(static_cast<const T*>(dy), static_cast<const T*>(x),
                                                          static_cast<const T*>(w), static_cast<const T*>(res), R, D,
                                                          eps, static_cast<T*>(dx), stats);
    if (dw || db) {
      const int64_t tiles = (D + 31) / 32, chunks = ln_chunks(R);
      if (chunks > 0)
        k_layer_norm_dwdb_partial<<<dim3(unsigned(tiles < 65535 ? tiles : 65535), unsigned(chunks < 65535 ? chunks : 65535)),
                                    kThreads, 0, st>>>(static_cast<const T*>(dy), static_cast<const T*>(x), stats, R, D,
                                                       partial);
      k_layer_norm_dwdb_total<<<grid_for(D), kThreads, 0, st>>>(partial, R, D, static_cast<T*>(dw), static_cast<T*>(db));
    }
  });
}

int launch_gather(Dt t, bool idx64, const void* x, const void* idx, int64_t A, int64_t n, int64_t B, int64_t K,
                  int op, const ReportSlot& slot, void* out, void* stream) {
  if (A * K * B == 0) return 0;
  return floating(t, [&](auto v) {
    using T = decltype(v);
    with_index_type(idx64, idx, [&](auto i) {
      k_gather<<<grid_for(A * K * B), kThreads, 0, as_stream(stream)>>>(static_cast<const T*>(x), i, A, n, B, K, op, slot,
                                                                        static_cast<T*>(out));
    });
  });
}

namespace {
// The scatter-add's workspace, each part 256-byte aligned: keys and sorted keys (u64 [K]), ks and sorted
// ks (i64 [K]), row_start (i64 [n + 1]), then CUB's temporary storage.
struct ScatterWork {
  uint64_t *keys, *keys_sorted;
  int64_t *ks, *ks_sorted, *row_start;
  void* cub_temp;
  size_t cub_bytes, total;
};

size_t align256(size_t b) { return (b + 255) / 256 * 256; }

// Bits of the sort keys: rows 0 .. n need floor(log2(n)) + 1 bits (at least 1).
int key_bits(int64_t n) {
  int bits = 1;
  while (bits < 64 && (uint64_t(n) >> bits) != 0) ++bits;
  return bits;
}

ScatterWork scatter_work(void* base, int64_t n, int64_t K) {
  ScatterWork w{};
  size_t cub_bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, cub_bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
                                  static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), K, 0, key_bits(n));
  char* p = static_cast<char*>(base);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    void* at = p ? p + off : nullptr;
    off += align256(bytes);
    return at;
  };
  const size_t k8 = size_t(K) * 8;
  w.keys = static_cast<uint64_t*>(take(k8));
  w.keys_sorted = static_cast<uint64_t*>(take(k8));
  w.ks = static_cast<int64_t*>(take(k8));
  w.ks_sorted = static_cast<int64_t*>(take(k8));
  w.row_start = static_cast<int64_t*>(take(size_t(n + 1) * 8));
  w.cub_temp = take(cub_bytes);
  w.cub_bytes = cub_bytes;
  w.total = off;
  return w;
}
}  // namespace

size_t scatter_add_workspace(int64_t n, int64_t K) { return scatter_work(nullptr, n, K).total; }

int launch_scatter_add(Dt t, bool idx64, const void* g, const void* idx, int64_t A, int64_t n, int64_t B, int64_t K,
                       void* work, int op, const ReportSlot& slot, void* out, void* stream) {
  if (A * n * B == 0) return 0;
  const cudaStream_t st = as_stream(stream);
  ScatterWork w = scatter_work(work, n, K);
  if (K > 0) {
    with_index_type(idx64, idx, [&](auto i) {
      k_scatter_keys<<<grid_for(K), kThreads, 0, st>>>(i, K, n, op, slot, w.keys, w.ks);
    });
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return int(e);
    // Stable (LSD radix): equal rows keep increasing k, so each row's sum runs in index order.
    if (const cudaError_t e = cub::DeviceRadixSort::SortPairs(w.cub_temp, w.cub_bytes, w.keys, w.keys_sorted, w.ks, w.ks_sorted,
                                                             K, 0, key_bits(n), st);
        e != cudaSuccess)
      return int(e);
  }
  k_row_starts<<<grid_for(n + 1), kThreads, 0, st>>>(w.keys_sorted, K, n, w.row_start);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return int(e);
  return floating(t, [&](auto v) {
    using T = decltype(v);
    k_scatter_add<<<grid_for(A * n * B), kThreads, 0, st>>>(static_cast<const T*>(g), w.row_start, w.ks_sorted, A, n, B, K,
                                                            static_cast<T*>(out));
  });
}

namespace {
template <class T, class I>
__global__ void k_one_hot(const I* lab, int64_t R, int64_t C, ReportSlot slot, T* out) {
  ik::one_hot<DevicePrim>(lab, R, C, slot, out);
}
}  // namespace

int launch_one_hot(Dt t, bool lab64, const void* lab, int64_t R, int64_t C, const ReportSlot& slot, void* out,
                   void* stream) {
  if (R * C == 0) return 0;
  return dispatch_all(t, [&](auto v) {
    using T = decltype(v);
    with_index_type(lab64, lab, [&](auto l) {
      k_one_hot<<<grid_for(R * C), kThreads, 0, as_stream(stream)>>>(l, R, C, slot, static_cast<T*>(out));
    });
  });
}

namespace {
template <class T>
__global__ void k_dropout(const T* x, T* out, int64_t n, double p, compute_t<T> scale, uint32_t k0, uint32_t k1) {
  ik::dropout<DevicePrim>(x, out, n, p, scale, k0, k1);
}
}  // namespace

int launch_dropout(Dt t, const void* x, void* out, int64_t n, double p, uint32_t k0, uint32_t k1, void* stream) {
  if (n == 0) return 0;
  const int64_t nblk = (n + 3) / 4;
  return dispatch_floating(t, [&](auto v) {
    using T = decltype(v);
    using C = compute_t<T>;
    k_dropout<<<grid_for(nblk), kThreads, 0, as_stream(stream)>>>(static_cast<const T*>(x), static_cast<T*>(out), n, p,
                                                                    C(1.0 / (1.0 - p)), k0, k1);
  });
}

}  // namespace titanax::kernels::cuda
