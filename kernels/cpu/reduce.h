// CPU reductions over any set of axes.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "core/tensor.h"

namespace titanax::kernels::cpu {

enum class ReduceOp { sum, max, min };

/// out[kept] = op over the reduced axes of x. `reduced[i]` marks axis i of x; out is contiguous with
/// x's rank (reduced axes of size 1). f32/f64; sums accumulate in double. Max/min propagate NaN.
void reduce(ReduceOp op, const Tensor& x, const std::vector<bool>& reduced, Tensor& out);

/// Writes elements [start, start + n) (row-major) of a tensor that is computed on demand into dst
/// (n <= kGeneratedRun values of the tensor's dtype). Called concurrently from OpenMP threads.
using ElementSource = std::function<void(int64_t start, int64_t n, void* dst)>;
/// Longest run reduce_sum_generated asks an ElementSource for.
inline constexpr int64_t kGeneratedRun = 1024;

/// reduce(ReduceOp::sum, x, reduced, out) for the contiguous f32 / f64 tensor x of `shape` and `dtype`
/// whose elements come from `source` instead of memory (a fused elementwise prologue): the elements are
/// requested in runs and summed in the order reduce() sums a materialised x (the same threads'
/// partial sums for a full reduction), so the result is bitwise equal. out as for reduce().
void reduce_sum_generated(DType dtype, const Shape& shape, const std::vector<bool>& reduced, Tensor& out,
                          const ElementSource& source);

/// out (i64, x's shape with `axis` of size 1, contiguous) = index of the first maximum along axis.
void argmax(const Tensor& x, int axis, Tensor& out);

}  // namespace titanax::kernels::cpu
