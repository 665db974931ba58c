#include "core/op.h"

#include "autodiff/tape.h"

#include <fmt/format.h>

namespace titanax {

void Op::cuda(const TensorList&, TensorList&) const {
  throw DeviceError(std::string("op '") + name() + "' has no kernel for cuda", "a device with a kernel for this op",
                    "cuda", "move the inputs to the CPU with .to(Device::cpu())");
}

TensorList Op::vjp(const TensorList&, const TensorList&, const TensorList&, const std::vector<bool>&) const {
  throw AutodiffError(std::string("op '") + name() + "' has no gradient", "a differentiable op", name(),
                      "wrap the call in NoGradGuard or detach() its inputs");
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

namespace detail {
void notify_write(const Tensor& dst, const Tensor& src) {
  if (t_observer && t_op_depth == 0) t_observer->on_write(dst, src);
}
void notify_host_read(const Tensor& t) {
  if (t_observer && t_op_depth == 0) t_observer->on_host_read(t);
}
}  // namespace detail

ApplyObserver* set_apply_observer(ApplyObserver* o) {
  ApplyObserver* prev = t_observer;
  t_observer = o;
  return prev;
}

TensorList apply(OpPtr op, TensorList inputs) {
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
  {
    OpDepth depth;
    out = op->forward(inputs);
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
