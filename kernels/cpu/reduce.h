// CPU reductions over any set of axes.
#pragma once

#include <vector>

#include "core/tensor.h"

namespace titanax::kernels::cpu {

enum class ReduceOp { sum, max, min };

/// out[kept] = op over the reduced axes of x. `reduced[i]` marks axis i of x; out is contiguous with
/// x's rank (reduced axes of size 1). f32/f64; sums accumulate in double. Max/min propagate NaN.
void reduce(ReduceOp op, const Tensor& x, const std::vector<bool>& reduced, Tensor& out);

/// out (i64, x's shape with `axis` of size 1, contiguous) = index of the first maximum along axis.
void argmax(const Tensor& x, int axis, Tensor& out);

}  // namespace titanax::kernels::cpu
