#include "core/op.h"

#include "autodiff/tape.h"
#include "autodiff/anomaly.h"
#include "core/profiler.h"

#include <fmt/format.h>

#include <algorithm>
#include <vector>

namespace titanax {

void Op::cuda(const TensorList&, TensorList&) const {
  throw DeviceError(std::string("op '") + name() + "' has no kernel for cuda", "a device with a kernel for this op",
                    "cuda", "move the inputs to the CPU with .to(Device::cpu())");
}

TensorList Op::vjp(const TensorList&, const TensorList&, const TensorList&, const std::vector<bool>&) const {
  throw AutodiffError(std::string("op '") + name() + "' has no gradient", "a differentiable op", name(),
                      "wrap the call in NoGradGuard or detach() its inputs");
}

std::optional<TensorList> Op::batch(const TensorList&, const std::vector<bool>&, int64_t) const { return std::nullopt; }
std::optional<TensorList> Op::jvp(const TensorList&, const TensorList&, const TensorList&) const { return std::nullopt; }

Tensor with_batch(const Tensor& t, bool batched, int64_t B) {
  if (batched) return t;
  Shape s{B};
  for (int64_t d : t.shape()) s.push_back(d);
  return t.expand(s);
}

void Op::run_in_f32(const TensorList& in, TensorList& out) const {
  NoGradGuard ng;
  TensorList in32, out32;
  for (const auto& t : in) in32.push_back(t.defined() && is_half(t.dtype()) ? t.detach().astype(DType::f32) : t);
  for (const auto& o : out) out32.push_back(is_half(o.dtype()) ? empty(o.shape(), DType::f32, o.device()) : o);
  if (out.empty() || out[0].device().is_cpu()) cpu(in32, out32);
  else cuda(in32, out32);
  for (size_t i = 0; i < out.size(); ++i)
    if (is_half(out[i].dtype())) copy_(out[i], out32[i]);
}

TensorList Op::forward(const TensorList& in) const {
  std::vector<TensorSpec> specs = infer(in);
  TensorList out;
  out.reserve(specs.size());
  for (const auto& s : specs) out.push_back(empty(s.shape, s.dtype, s.device));
  Device d = !in.empty() ? in[0].device() : !specs.empty() ? specs[0].device : Device::cpu();
  if (d.is_cpu()) cpu(in, out);
  else cuda(in, out);
  return out;
}

namespace {
thread_local ApplyObserver* t_observer = nullptr;
thread_local int t_op_depth = 0;  // > 0 while an op's forward runs (its kernels' copies are not the user's)
struct OpDepth {
  OpDepth() { ++t_op_depth; }
  ~OpDepth() { --t_op_depth; }
};
}  // namespace

ApplyObserver* apply_observer() { return t_observer; }

namespace {
thread_local DType t_autocast = DType::f32;

// The inputs cast by the op's autocast policy (the casts are ops themselves: their own inputs are
// single-dtype, so they are left alone).
TensorList autocast_inputs(const Op& op, TensorList in) {
  const DType low = t_autocast;
  switch (op.autocast_policy()) {
    case AutocastPolicy::lower:
      for (auto& t : in)
        if (t.defined() && t.dtype() == DType::f32) t = t.astype(low);
      break;
    case AutocastPolicy::f32:
      for (auto& t : in)
        if (t.defined() && is_half(t.dtype())) t = t.astype(DType::f32);
      break;
    case AutocastPolicy::promote: {
      bool half = false;
      DType widest = DType::f32;
      std::vector<DType> seen;  // the distinct floating dtypes
      for (const auto& t : in) {
        if (!t.defined() || !is_floating(t.dtype())) continue;
        half = half || is_half(t.dtype());
        if (t.dtype() == DType::f64) widest = DType::f64;
        if (std::find(seen.begin(), seen.end(), t.dtype()) == seen.end()) seen.push_back(t.dtype());
      }
      if (!half || seen.size() < 2) break;
      for (auto& t : in)
        if (t.defined() && is_half(t.dtype())) t = t.astype(widest);
      break;
    }
  }
  return in;
}
}  // namespace

AutocastGuard::AutocastGuard(DType dtype) : prev_(t_autocast) {
  if (dtype != DType::f32 && !is_half(dtype))
    throw DTypeError("autocast needs a floating dtype to lower to", "bf16, f16 (or f32: off)",
                     std::string(dtype_name(dtype)), "use AutocastGuard(DType::bf16)");
  t_autocast = dtype;
}
AutocastGuard::~AutocastGuard() { t_autocast = prev_; }
DType autocast_dtype() { return t_autocast; }

namespace detail {
void notify_write(const Tensor& dst, const Tensor& src) {
  if (t_observer && t_op_depth == 0) t_observer->on_write(dst, src);
}
void notify_host_read(const Tensor& t) {
  if (t_observer && t_op_depth == 0) t_observer->on_host_read(t);
}
void notify_alias(const Tensor& from, const Tensor& to) {
  if (t_observer) t_observer->on_alias(from, to);
}
TopLevelOps::TopLevelOps() : prev_(t_op_depth) { t_op_depth = 0; }
TopLevelOps::~TopLevelOps() { t_op_depth = prev_; }
}  // namespace detail

ApplyObserver* set_apply_observer(ApplyObserver* o) {
  ApplyObserver* prev = t_observer;
  t_observer = o;
  return prev;
}

TensorList apply(OpPtr op, TensorList inputs) {
  if (t_autocast != DType::f32 && t_op_depth == 0) inputs = autocast_inputs(*op, std::move(inputs));
  if (t_op_depth == 0)
    for (auto& t : inputs)
      if (t.defined() && !t.is_contiguous() && op->contiguous_input(t)) t = t.contiguous();
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].defined())
      throw ValueError(std::string("op '") + op->name() + "' got an undefined input", "defined tensors",
                       "input " + std::to_string(i) + " is Tensor()");
    if (op->host_input(i)) {
      if (!inputs[i].device().is_cpu())
        throw DeviceError(std::string("op '") + op->name() + "' reads input " + std::to_string(i) + " on the host",
                          "a CPU tensor", "input " + std::to_string(i) + " on " + inputs[i].device().str(),
                          "pass it with .to(Device::cpu())");
    } else if (i > 0 && !(inputs[i].device() == inputs[0].device())) {
      throw DeviceError(std::string("op '") + op->name() + "' got inputs on different devices",
                        "all inputs on " + inputs[0].device().str(),
                        "input " + std::to_string(i) + " on " + inputs[i].device().str(),
                        "move the inputs with .to(device)");
    }
  }
  TensorList out;
  OpProfiler* prof = t_op_depth == 0 ? OpProfiler::current() : nullptr;
  const double t0 = prof ? prof->start(inputs) : 0.0;
  {
    OpDepth depth;
    out = op->forward(inputs);
  }
  if (prof) prof->stop(*op, t0, inputs, out);
  if (t_op_depth == 0)
    if (const AnomalyOptions* ao = anomaly_options()) {
      OpDepth depth;  // the check's own ops are not the user's
      detail::check_outputs(*ao, *op, inputs, out);
    }
  for (auto& o : out)  // an op may hand an input back unchanged: give it its own handle so the tape stays acyclic
    for (const auto& i : inputs)
      if (o.same(i)) o = make_view(i, i.shape(), i.strides(), i.offset());
  record(op, inputs, out);
  if (t_observer && t_op_depth == 0) t_observer->on_apply(op, inputs, out);  // ops an op runs inside are its own
  return out;
}

Tensor apply1(OpPtr op, TensorList inputs) { return apply(std::move(op), std::move(inputs))[0]; }

std::string attr_num(double v) { return fmt::format("{}", v); }

std::string spec_str(const TensorSpec& s) {
  return std::string(dtype_name(s.dtype)) + s.shape.str() + (s.device.is_cpu() ? "" : "@" + s.device.str());
}
std::string spec_str(const Tensor& t) { return spec_str({t.shape(), t.dtype(), t.device()}); }

void check_dtype(const Tensor& t, std::initializer_list<DType> allowed, const char* what) {
  for (DType d : allowed)
    if (t.dtype() == d) return;
  std::vector<std::string> names;
  for (DType d : allowed) names.emplace_back(dtype_name(d));
  throw DTypeError(std::string(what) + ": unsupported dtype", "one of " + join(names), std::string(dtype_name(t.dtype())),
                   "cast with astype(DType::" + names[0] + ")");
}

void check_same_dtype(const TensorList& in, const char* what) {
  for (size_t i = 1; i < in.size(); ++i)
    if (in[i].dtype() != in[0].dtype())
      throw DTypeError(std::string(what) + ": inputs have different dtypes", std::string(dtype_name(in[0].dtype())),
                       std::string(dtype_name(in[i].dtype())) + " (input " + std::to_string(i) + ")",
                       "cast one operand with astype()");
}

}  // namespace titanax
