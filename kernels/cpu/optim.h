// Fused CPU optimizer updates: one pass over each parameter, in place, multithreaded.
#pragma once

#include <cstdint>

#include "kernels/update_scalars.h"

namespace titanax::kernels::cpu {

/// AdamW (Loshchilov & Hutter 2019) exactly as torch.optim.AdamW (non-amsgrad), on g = g * f (f the
/// scalars' gradient factor, e.g. a clipping coefficient; 1 by default):
///   p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
///   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
/// with the step's scalars `s` from adam_scalars (kernels/update_scalars.h; nothing happens when s says
/// not to apply). `decoupled` false gives Adam with L2 (g += wd p first), as torch.optim.Adam.
void adam_update(float* p, const float* g, float* m, float* v, int64_t n, const UpdateScalars& s, double b1, double b2,
                 double eps, double wd, bool decoupled);
void adam_update(double* p, const double* g, double* m, double* v, int64_t n, const UpdateScalars& s, double b1,
                 double b2, double eps, double wd, bool decoupled);
/// SGD with momentum as torch.optim.SGD on g = g * f (as adam_update): g += wd p; buf = mu buf + g
/// (buf = g on the first step); p -= lr * (nesterov ? g + mu buf : buf), with lr and the first step from
/// sgd_scalars (`s`). buf may be null when mu == 0.
void sgd_update(float* p, const float* g, float* buf, int64_t n, const UpdateScalars& s, double mu, double wd, bool nesterov);
void sgd_update(double* p, const double* g, double* buf, int64_t n, const UpdateScalars& s, double mu, double wd, bool nesterov);
/// Sum of squares in double.
double sum_squares(const float* g, int64_t n);
double sum_squares(const double* g, int64_t n);

}  // namespace titanax::kernels::cpu
