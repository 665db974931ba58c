// Max pooling over NCHW planes, written against the hardware-primitive policy of kernels/cuda/hw_policy.h
// (pool.cu runs it on the GPU, tests/emulated/ on the CPU): the formulas of the CPU's reference path
// (kernels/cpu/conv.cpp pool_fwd_ref / pool_bwd_ref), so f64 results equal the CPU's bitwise and f32 ones
// equal them up to oneDNN's choice among exact ties. Grid-stride loops over any grid. CUDA headers only.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cuda/hw_policy.h"

namespace titanax::kernels::cuda::pool_kernels {

/// One thread per output element of y [N, C, OH, OW] (total of them): the maximum over the window's
/// in-range elements of x [N, C, H, W] (the first NaN wins, else the first maximum in row-major window
/// order), and in ws its offset in the H x W plane.
template <class Hw, class T>
TX_HW_FN void max_pool2d(const T* x, T* y, int32_t* ws, const Pool2dParams& g, int64_t total) {
  const int64_t OH = g.OH, OW = g.OW;
  for (int64_t o = grid_index<Hw>(); o < total; o += grid_stride<Hw>()) {
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

/// One thread per element of dx [N, C, H, W] (total of them): the sum of dy [N, C, OH, OW] over the windows
/// that cover it and chose it (ws), in increasing output order (the CPU's order), without atomics.
template <class Hw, class T>
TX_HW_FN void max_pool2d_backward(const T* dy, const int32_t* ws, T* dx, const Pool2dParams& g, int64_t total) {
  const int64_t OH = g.OH, OW = g.OW;
  for (int64_t e = grid_index<Hw>(); e < total; e += grid_stride<Hw>()) {
    const int64_t w = e % g.W, h = (e / g.W) % g.H, plane = e / (g.W * g.H);
    const int32_t me = int32_t(h * g.W + w);
    // Output rows i with i*SH - PH <= h <= i*SH - PH + KH - 1, columns likewise.
    const int64_t ri = (h + g.PH - g.KH + g.SH) / g.SH, rj = (w + g.PW - g.KW + g.SW) / g.SW;
    const int64_t i0 = ri > 0 ? ri : 0, i1 = (h + g.PH) / g.SH < OH - 1 ? (h + g.PH) / g.SH : OH - 1;
    const int64_t j0 = rj > 0 ? rj : 0, j1 = (w + g.PW) / g.SW < OW - 1 ? (w + g.PW) / g.SW : OW - 1;
    T acc = T(0);
    const int64_t base = plane * OH * OW;
    for (int64_t i = i0; i <= i1; ++i)
      for (int64_t j = j0; j <= j1; ++j)
        if (ws[base + i * OW + j] == me) acc += dy[base + i * OW + j];
    dx[e] = acc;
  }
}

}  // namespace titanax::kernels::cuda::pool_kernels
