// The op table the test harnesses walk (ggml's test-backend-ops works this way): every differentiable
// op appears at least once, with inputs drawn fresh from a key. tests/unit/test_gradcheck.cpp checks
// each case's vjp against finite differences in float64; the CUDA harness runs each case on the GPU
// against the CPU. A new op is covered by adding one entry to op_cases.cpp.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <titanax/titanax.h>

namespace titanax::testing {

struct OpCase {
  std::string name;
  /// Inputs for the case (floating inputs as f64), drawn from `key`.
  std::function<TensorList(RngKey key)> inputs;
  /// The function under test.
  std::function<Tensor(const TensorList&)> fn;
  /// False for ops whose derivative is not checked (piecewise-constant ops near kinks, sampling).
  bool check_grad = true;
};

/// Every registered case.
const std::vector<OpCase>& op_cases();

/// f64 normal samples of `shape` from `key` (scaled), optionally kept away from 0 by `margin`.
Tensor randn64(RngKey key, const Shape& shape, double scale = 1.0, double margin = 0.0);
/// f64 uniform samples in [lo, hi).
Tensor uniform64(RngKey key, const Shape& shape, double lo, double hi);
/// i64 integers uniform in [0, n).
Tensor randint(RngKey key, const Shape& shape, int64_t n);

}  // namespace titanax::testing
