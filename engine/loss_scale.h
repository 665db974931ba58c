// Loss scaling for mixed-precision training (Micikevicius et al. 2018, "Mixed Precision Training"; the
// dynamic policy of PyTorch's torch.cuda.amp.GradScaler): the loss is multiplied by a scale S before
// backward, so small fp16 gradients do not flush to zero, and the gradients are multiplied by 1/S before
// clipping and the optimizer. With the dynamic policy a step whose gradients hold an inf or a NaN is
// skipped (parameters, optimizer moments and the optimizer's step counter untouched) and S is multiplied
// by backoff_factor; after growth_interval consecutive good steps S is multiplied by growth_factor.
//
//   EngineOptions o{.loss_scale = LossScaleOptions::dynamic()};   // also Precision::fp16()'s default
//   StepResult r = engine.step(model, loss, batch);                // r.skipped, r.loss_scale
//
// The scaler's state (scale, good steps, skipped steps) is three replicated scalars that the Engine saves
// in its checkpoints ("scaler/..."), so a resumed run continues with the same scale.
#pragma once

#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace titanax {

struct LossScaleOptions {
  enum class Mode { none, fixed, dynamic };
  Mode mode = Mode::none;
  double init_scale = 65536.0;     ///< S at the start (2^16, as GradScaler)
  double growth_factor = 2.0;      ///< S *= growth_factor after growth_interval good steps in a row (dynamic)
  double backoff_factor = 0.5;     ///< S *= backoff_factor on a step with inf / NaN gradients (dynamic)
  int64_t growth_interval = 2000;  ///< good steps before S grows (dynamic)

  static LossScaleOptions none() { return {}; }
  static LossScaleOptions dynamic(double init = 65536.0, int64_t growth_interval = 2000) {
    return {Mode::dynamic, init, 2.0, 0.5, growth_interval};
  }
  /// A constant S; steps with inf / NaN gradients are still skipped (S never changes).
  static LossScaleOptions fixed(double scale) { return {Mode::fixed, scale, 1.0, 1.0, 0}; }
  bool enabled() const { return mode != Mode::none; }
  /// "none", "dynamic (init 65536, growth x2 every 2000 steps, backoff x0.5)", "fixed 1024".
  std::string str() const;
  /// Throws ValueError for init_scale <= 0 or not finite, growth_factor < 1, backoff_factor not in (0, 1],
  /// growth_interval < 1 (dynamic).
  void validate() const;
};

class LossScaler {
 public:
  /// Throws what LossScaleOptions::validate throws.
  explicit LossScaler(LossScaleOptions opts);

  /// The current scale S.
  double scale() const;
  /// Records the outcome of a step whose gradients were (found_inf) or were not finite, and moves S by
  /// the policy. Returns whether the step must be skipped (= found_inf).
  bool update(bool found_inf);
  /// Consecutive good steps since S last changed, and steps skipped in total.
  /// update() written with ops, for a traced training step (jit/graph.h): `finite` (0-d bool on the CPU)
  /// tells whether every gradient was finite; one `loss_scale_update` op moves the state, written back
  /// into the state tensors with copy_ (the graph's updates: every replay moves the scale). Returns the
  /// 0-d bool (CPU) skip flag for Optimizer::step. Throws ValueError for another kind of `finite`.
  Tensor update_traced(const Tensor& finite);
  int64_t good_steps() const;
  int64_t skipped_steps() const;
  const LossScaleOptions& options() const { return opts_; }

  /// The state as tensors the Engine checkpoints: "scale" (f64 0-d), "good" and "skipped" (i64 0-d).
  /// Writing into them (a checkpoint load) sets the state.
  const Tensor& scale_tensor() const { return scale_; }
  const Tensor& good_tensor() const { return good_; }
  const Tensor& skipped_tensor() const { return skipped_; }

 private:
  LossScaleOptions opts_;
  Tensor scale_, good_, skipped_;
};

}  // namespace titanax
