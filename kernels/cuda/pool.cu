// Max pooling over NCHW planes (kernels/cuda/launch.h: launch_max_pool2d, launch_max_pool2d_backward):
// the formulas of the CPU's reference path (kernels/cpu/conv.cpp pool_fwd_ref / pool_bwd_ref), so f64
// results equal the CPU's bitwise and f32 ones equal them up to oneDNN's choice among exact ties.
#include "kernels/cuda/common.cuh"

namespace titanax::kernels::cuda {
namespace {

// One thread per output element: the maximum over the window's in-range elements (the first NaN wins,
// else the first maximum in row-major window order) and its offset in the H x W plane.
template <class T>
__global__ void k_max_pool2d(const T* x, T* y, int32_t* ws, Pool2dParams g, int64_t total) {
  const int64_t OH = g.OH, OW = g.OW;
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < total; o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = o % OW, i = (o / OW) % OH, plane = o / (OW * OH);
    const T* xp = x + plane * g.H * g.W;
    T best = -T(INFINITY);  // as the CPU (every window holds an element: padding <= kernel / 2)
    int32_t at = -1;
    for (int64_t p = 0; p < g.KH; ++p) {
      const int64_t ih = i * g.SH - g.PH + p;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t q = 0; q < g.KW; ++q) {
        const int64_t iw = j * g.SW - g.PW + q;
        if (iw < 0 || iw >= g.W) continue;
        const T v = xp[ih * g.W + iw];
        if (at < 0 || v > best || (v != v && best == best)) {
          best = v;
          at = int32_t(ih * g.W + iw);
        }
      }
    }
    y[o] = best;
    ws[o] = at;
  }
}

// One thread per input element: the sum of dy over the windows that cover it and chose it, in increasing
// output order (the CPU's order), without atomics.
template <class T>
__global__ void k_max_pool2d_backward(const T* dy, const int32_t* ws, T* dx, Pool2dParams g, int64_t total) {
  const int64_t OH = g.OH, OW = g.OW;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = e % g.W, h = (e / g.W) % g.H, plane = e / (g.W * g.H);
    const int32_t me = int32_t(h * g.W + w);
    // Output rows i with i*SH - PH <= h <= i*SH - PH + KH - 1, columns likewise.
    const int64_t i0 = max(int64_t(0), (h + g.PH - g.KH + g.SH) / g.SH), i1 = min(OH - 1, (h + g.PH) / g.SH);
    const int64_t j0 = max(int64_t(0), (w + g.PW - g.KW + g.SW) / g.SW), j1 = min(OW - 1, (w + g.PW) / g.SW);
    T acc = T(0);
    const int64_t base = plane * OH * OW;
    for (int64_t i = i0; i <= i1; ++i)
      for (int64_t j = j0; j <= j1; ++j)
        if (ws[base + i * OW + j] == me) acc += dy[base + i * OW + j];
    dx[e] = acc;
  }
}

}  // namespace

int launch_max_pool2d(Dt t, const void* x, void* y, int32_t* ws, const Pool2dParams& g, void* stream) {
  const int64_t total = g.N * g.C * g.OH * g.OW;
  if (total == 0) return 0;
  auto st = as_stream(stream);
  if (t == Dt::f32) k_max_pool2d<<<grid_for(total), kThreads, 0, st>>>(static_cast<const float*>(x), static_cast<float*>(y), ws, g, total);
  else if (t == Dt::f64) k_max_pool2d<<<grid_for(total), kThreads, 0, st>>>(static_cast<const double*>(x), static_cast<double*>(y), ws, g, total);
  else return int(cudaErrorInvalidValue);
  return int(cudaGetLastError());
}

int launch_max_pool2d_backward(Dt t, const void* dy, const int32_t* ws, void* dx, const Pool2dParams& g, void* stream) {
  const int64_t total = g.N * g.C * g.H * g.W;
  if (total == 0) return 0;
  auto st = as_stream(stream);
  if (t == Dt::f32)
    k_max_pool2d_backward<<<grid_for(total), kThreads, 0, st>>>(static_cast<const float*>(dy), ws, static_cast<float*>(dx), g, total);
  else if (t == Dt::f64)
    k_max_pool2d_backward<<<grid_for(total), kThreads, 0, st>>>(static_cast<const double*>(dy), ws, static_cast<double*>(dx), g, total);
  else return int(cudaErrorInvalidValue);
  return int(cudaGetLastError());
}

}  // namespace titanax::kernels::cuda
