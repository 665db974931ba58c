// The per-step scalars of the fused optimizer updates (kernels/cpu/optim.h, kernels/cuda/optim.cu). Light
// enough for nvcc: <cmath> and <cstdint> only.
#pragma once

#include <cmath>
#include <cstdint>

namespace titanax::kernels {

/// What one optimizer step's update needs besides the tensors and the fixed hyperparameters, computed
/// once per step in double (on the host; a traced step computes v[4] on the device, from the gradient
/// norm there) and turned into the kernel's dtype the same way by every kernel (CPU or CUDA, eager or
/// traced), so all paths give the same bits:
///   v[0]: apply; 0 leaves the states untouched (a step the loss scaler skips), else 1;
///   Adam: v[1] = lr / (1 - b1^t), v[2] = 1 / sqrt(1 - b2^t), v[3] = 1 - lr * wd (t counts steps from 1);
///   SGD:  v[1] = lr, v[2] = 1 on the first step (the momentum buffer starts at the gradient), else 0;
///   v[4]: the gradient factor, every gradient element multiplied by it (rounded to the gradient's dtype)
///   before the update reads it: the gradient-clipping coefficient of torch.nn.utils.clip_grad_norm_,
///   applied in the update's one pass instead of a separate pass over every gradient (1: unchanged, and
///   bitwise so, since g * 1 == g).
/// The CUDA kernels read them by value or from device memory (a captured CUDA graph replays the launch
/// with each step's values).
struct UpdateScalars {
  static constexpr int size = 5;
  double v[size] = {1, 0, 0, 0, 1};
};

/// Adam / AdamW's scalars at step t (>= 1; Kingma & Ba 2015's bias corrections; decoupled decay of
/// Loshchilov & Hutter 2019).
inline UpdateScalars adam_scalars(double lr, double b1, double b2, double wd, int64_t t, bool apply = true,
                                  double grad_factor = 1) {
  const double bc1 = 1 - std::pow(b1, double(t)), bc2 = 1 - std::pow(b2, double(t));
  return {{apply ? 1.0 : 0.0, lr / bc1, 1 / std::sqrt(bc2), 1 - lr * wd, grad_factor}};
}

/// SGD's scalars (torch.optim.SGD: the momentum buffer is the gradient on the first step).
inline UpdateScalars sgd_scalars(double lr, bool first, bool apply = true, double grad_factor = 1) {
  return {{apply ? 1.0 : 0.0, lr, first ? 1.0 : 0.0, 0.0, grad_factor}};
}

}  // namespace titanax::kernels
