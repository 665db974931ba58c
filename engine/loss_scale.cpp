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

bool LossScaler::update(bool found_inf) {
  double s = scale();
  int64_t good = good_steps(), skipped = skipped_steps();
  if (found_inf) {
    ++skipped;
    good = 0;
    if (opts_.mode == LossScaleOptions::Mode::dynamic) s *= opts_.backoff_factor;
  } else if (opts_.mode == LossScaleOptions::Mode::dynamic && ++good >= opts_.growth_interval) {
    s *= opts_.growth_factor;
    good = 0;
  }
  fill_(scale_, s);
  fill_(good_, double(good));
  fill_(skipped_, double(skipped));
  return found_inf;
}

}  // namespace titanax
