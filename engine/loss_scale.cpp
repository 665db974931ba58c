#include "engine/loss_scale.h"

#include <cmath>

#include "core/error.h"
#include "core/op.h"

namespace titanax {

std::string LossScaleOptions::str() const {
  switch (mode) {
    case Mode::none: return "none";
    case Mode::fixed: return "fixed " + attr_num(init_scale);
    case Mode::dynamic:
      return "dynamic (init " + attr_num(init_scale) + ", growth x" + attr_num(growth_factor) + " every " +
             std::to_string(growth_interval) + " steps, backoff x" + attr_num(backoff_factor) + ")";
  }
  return "?";
}

void LossScaleOptions::validate() const {
  if (!enabled()) return;
  if (!(init_scale > 0) || !std::isfinite(init_scale))
    throw ValueError("loss scale: init_scale must be a finite number > 0", "> 0, e.g. 65536", attr_num(init_scale));
  if (mode == Mode::dynamic) {
    if (!(growth_factor >= 1))
      throw ValueError("loss scale: growth_factor must be >= 1", ">= 1, e.g. 2", attr_num(growth_factor));
    if (!(backoff_factor > 0 && backoff_factor <= 1))
      throw ValueError("loss scale: backoff_factor must be in (0, 1]", "(0, 1], e.g. 0.5", attr_num(backoff_factor));
    if (growth_interval < 1)
      throw ValueError("loss scale: growth_interval must be >= 1", ">= 1, e.g. 2000", std::to_string(growth_interval));
  }
}

LossScaler::LossScaler(LossScaleOptions opts)
    : opts_(opts),
      scale_(scalar(opts.init_scale, DType::f64)),
      good_(scalar(0.0, DType::i64)),
      skipped_(scalar(0.0, DType::i64)) {
  opts_.validate();
}

double LossScaler::scale() const { return scale_.item(); }
int64_t LossScaler::good_steps() const { return int64_t(good_.item()); }
int64_t LossScaler::skipped_steps() const { return int64_t(skipped_.item()); }

namespace {

// The policy's move: scale s, good steps in a row and skipped steps after a step that found (or did not
// find) an inf / NaN gradient.
void advance(const LossScaleOptions& o, bool found_inf, double& s, int64_t& good, int64_t& skipped) {
  if (found_inf) {
    ++skipped;
    good = 0;
    if (o.mode == LossScaleOptions::Mode::dynamic) s *= o.backoff_factor;
  } else if (o.mode == LossScaleOptions::Mode::dynamic && ++good >= o.growth_interval) {
    s *= o.growth_factor;
    good = 0;
  }
}

// Inputs (finite: bool, scale: f64, good: i64, skipped: i64), all 0-d on the CPU; outputs the moved
// (scale, good, skipped) and skip (bool: the step found an inf / NaN).
struct ScalerUpdateOp final : Op {
  LossScaleOptions opts;
  explicit ScalerUpdateOp(LossScaleOptions o) : opts(o) {}
  const char* name() const override { return "loss_scale_update"; }
  std::string attrs() const override { return opts.str(); }
  std::vector<TensorSpec> infer(const TensorList&) const override {
    const Device c = Device::cpu();
    return {{Shape{}, DType::f64, c}, {Shape{}, DType::i64, c}, {Shape{}, DType::i64, c}, {Shape{}, DType::bool_, c}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    const bool found_inf = in[0].item() == 0;
    double s = in[1].item();
    int64_t good = int64_t(in[2].item()), skipped = int64_t(in[3].item());
    advance(opts, found_inf, s, good, skipped);
    fill_(out[0], s);
    fill_(out[1], double(good));
    fill_(out[2], double(skipped));
    fill_(out[3], found_inf ? 1.0 : 0.0);
  }
  bool differentiable() const override { return false; }
};

}  // namespace

bool LossScaler::update(bool found_inf) {
  double s = scale();
  int64_t good = good_steps(), skipped = skipped_steps();
  advance(opts_, found_inf, s, good, skipped);
  fill_(scale_, s);
  fill_(good_, double(good));
  fill_(skipped_, double(skipped));
  return found_inf;
}

Tensor LossScaler::update_traced(const Tensor& finite) {
  if (finite.dim() != 0 || finite.dtype() != DType::bool_ || !finite.device().is_cpu())
    throw ValueError("LossScaler::update_traced: finite must be a 0-d bool tensor on the CPU", "shape [], bool, cpu",
                     finite.shape().str() + ", " + std::string(dtype_name(finite.dtype())) + ", " + finite.device().str());
  TensorList out = apply(std::make_shared<ScalerUpdateOp>(opts_), {finite, scale_, good_, skipped_});
  copy_(scale_, out[0]);
  copy_(good_, out[1]);
  copy_(skipped_, out[2]);
  return out[3];
}

}  // namespace titanax
