// CPU kernels of 2-D convolution and max pooling (ops/conv.cpp), NCHW layout.
//
//   f32: oneDNN 2.6 primitives (convolution_forward / _backward_data / _backward_weights, pooling_forward /
//        pooling_backward with pooling_max). Tensors stay plain nchw / oihw; convolutions run in the
//        blocked layouts oneDNN picks (format_tag::any), with cached reorders in and out; pooling runs on
//        nchw directly. Primitives (and reorders) are created once per geometry and kept in a
//        mutex-protected cache, so a training loop reuses them every step.
//   f64: direct loops (the readable reference; also what float64 gradient checks run on).
// Convolution is cross-correlation (PyTorch's conv2d): y[n, o, i, j] = b[o] + sum_{c, p, q}
//   x[n, c, i * SH - PH + p, j * SW - PW + q] * w[o, c, p, q], out-of-range x reading as 0.
// Max pooling takes the maximum over each window's in-range elements (padding never wins); ties go to the
// first element in row-major window order in the f64 path (oneDNN chooses its own among exact ties).
//
// Inputs must be contiguous and outputs contiguous of the documented shapes (the ops guarantee it); shape
// validation lives in the ops' infer(). oneDNN failures throw InternalError with oneDNN's message.
#pragma once

#include <cstdint>

#include "core/tensor.h"

namespace titanax::kernels::cpu {

struct Conv2dGeom {
  int64_t N, C, H, W;  // input
  int64_t O, KH, KW;   // weight [O, C, KH, KW]
  int64_t SH, SW, PH, PW;
  int64_t OH() const { return (H + 2 * PH - KH) / SH + 1; }
  int64_t OW() const { return (W + 2 * PW - KW) / SW + 1; }
};

/// y [N, O, OH, OW] = conv(x [N, C, H, W], w [O, C, KH, KW]) + b [O] (b may be nullptr).
void conv2d_forward(const Tensor& x, const Tensor& w, const Tensor* b, const Conv2dGeom& g, Tensor& y);
/// dx [N, C, H, W] = the adjoint of conv2d in x, applied to dy [N, O, OH, OW] (a transposed convolution).
void conv2d_backward_input(const Tensor& dy, const Tensor& w, const Conv2dGeom& g, Tensor& dx);
/// dw [O, C, KH, KW] = sum over n, i, j of dy[n, o, i, j] * x[n, c, i*SH-PH+p, j*SW-PW+q]; db [O] = sum of
/// dy over n, i, j (db may be nullptr).
void conv2d_backward_weight(const Tensor& dy, const Tensor& x, const Conv2dGeom& g, Tensor& dw, Tensor* db);

struct Pool2dGeom {
  int64_t N, C, H, W;
  int64_t KH, KW, SH, SW, PH, PW;
  int64_t OH() const { return (H + 2 * PH - KH) / SH + 1; }
  int64_t OW() const { return (W + 2 * PW - KW) / SW + 1; }
};

/// Bytes of the max-pool workspace (which element of each window won) for this geometry and dtype: the
/// oneDNN workspace for f32, one int32 input-plane offset per output element for f64.
int64_t max_pool2d_workspace_bytes(const Pool2dGeom& g, DType dtype);
/// y [N, C, OH, OW] = max over each window of x [N, C, H, W]; ws: u8 [workspace bytes], filled for the
/// backward.
void max_pool2d_forward(const Tensor& x, const Pool2dGeom& g, Tensor& y, Tensor& ws);
/// idx i64 [N, C, OH, OW]: the offset in its H x W plane of each window's maximum (the first in
/// row-major window order on ties, the first NaN if any: the winner max_pool2d_forward routes the
/// gradient to, on either path). x f32 or f64.
void max_pool2d_indices(const Tensor& x, const Pool2dGeom& g, Tensor& idx);
/// dx [N, C, H, W] = dy [N, C, OH, OW] routed to each window's maximum (summed where windows overlap),
/// using the workspace of the forward. dx's dtype selects the path (the forward's dtype).
void max_pool2d_backward(const Tensor& dy, const Tensor& ws, const Pool2dGeom& g, Tensor& dx);

}  // namespace titanax::kernels::cpu
