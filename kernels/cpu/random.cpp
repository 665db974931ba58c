#include "kernels/cpu/random.h"

#include <cmath>

#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/loops.h"

namespace titanax::kernels::cpu {

void fill_uniform(Tensor& out, RngKey key) {
  const int64_t n = out.numel();
  TX_DISPATCH_FLOAT(out.dtype(), "random_uniform", {
    scalar_t* p = out.data<scalar_t>();
    parallel_for((n + 3) / 4, 64, [&](int64_t s, int64_t e) {
      for (int64_t b = s; b < e; ++b) {
        auto r = philox4x32({uint32_t(b), uint32_t(uint64_t(b) >> 32), 0, 0}, key);
        for (int k = 0; k < 4 && b * 4 + k < n; ++k) p[b * 4 + k] = scalar_t(u32_to_unit_float(r[size_t(k)]));
      }
    });
  });
}

void fill_normal(Tensor& out, RngKey key) {
  const int64_t n = out.numel();
  TX_DISPATCH_FLOAT(out.dtype(), "random_normal", {
    scalar_t* p = out.data<scalar_t>();
    // One Philox block gives two (u1, u2) pairs: four samples.
    parallel_for((n + 3) / 4, 128, [&](int64_t s, int64_t e) {
      for (int64_t b = s; b < e; ++b) {
        auto r = philox4x32({uint32_t(b), uint32_t(uint64_t(b) >> 32), 1, 0}, key);
        for (int pair = 0; pair < 2; ++pair) {
          float u1 = (float(r[size_t(2 * pair)] >> 8) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]
          float u2 = u32_to_unit_float(r[size_t(2 * pair + 1)]);
          float rad = std::sqrt(-2.0f * std::log(u1)), th = 6.2831853071795864f * u2;
          int64_t i = b * 4 + 2 * pair;
          if (i < n) p[i] = scalar_t(rad * std::cos(th));
          if (i + 1 < n) p[i + 1] = scalar_t(rad * std::sin(th));
        }
      }
    });
  });
}

}  // namespace titanax::kernels::cpu
