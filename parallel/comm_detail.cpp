#include "parallel/comm_detail.h"

#include <cstdlib>
#include <cstring>

namespace titanax::detail {

const char* collective_op_name(CollectiveOp op) {
  switch (op) {
    case CollectiveOp::sum: return "sum";
    case CollectiveOp::max: return "max";
    case CollectiveOp::min: return "min";
  }
  return "?";
}

bool collective_checks_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("TITANAX_CHECK_COLLECTIVES");
    return !(v && (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0 || std::strcmp(v, "false") == 0));
  }();
  return on;
}

void check_defined(const Tensor& t, const char* what) {
  if (!t.defined())
    throw ValueError(std::string(what) + ": undefined tensor", "a defined tensor", "Tensor()");
}

void check_reducible(const Tensor& t, const char* what) {
  check_defined(t, what);
  switch (t.dtype()) {
    case DType::f32: case DType::f64: case DType::f16: case DType::bf16:
    case DType::i32: case DType::i64: case DType::u8: return;
    default:
      throw DTypeError(std::string(what) + ": dtype cannot be reduced", "f32, f64, f16, bf16, i32, i64 or u8",
                       std::string(dtype_name(t.dtype())), "cast with astype(DType::i32) or astype(DType::f32)");
  }
}

void check_axis0_divides(const Tensor& t, int size, const char* what) {
  check_defined(t, what);
  if (t.dim() == 0)
    throw CollectiveError(std::string(what) + " of a 0-d tensor", "a tensor with a leading axis of size k * " +
                          std::to_string(size), tensor_sig(t), "reshape it to [1] or more");
  if (t.shape()[0] % size != 0)
    throw CollectiveError(std::string(what) + ": leading axis does not divide by the group size",
                          "shape[0] a multiple of " + std::to_string(size), tensor_sig(t),
                          "pad or reshape the tensor so axis 0 splits evenly over " + std::to_string(size) + " ranks");
}

void check_scatter_out(const Tensor& t, const Tensor& out, int size, const char* what) {
  Shape want = t.shape();
  want[0] /= size;
  if (!out.defined() || out.shape() != want || out.dtype() != t.dtype() || out.device() != t.device())
    throw CollectiveError(std::string(what) + ": the output tensor does not fit the input",
                          std::string(dtype_name(t.dtype())) + want.str() + " on " + t.device().str(),
                          out.defined() ? tensor_sig(out) + " on " + out.device().str() : "undefined",
                          "allocate out with the input's dtype and device and axis 0 divided by the group size (" +
                              std::to_string(size) + ")");
}

std::string tensor_sig(const Tensor& t) {
  if (!t.defined()) return "undefined";
  return std::string(dtype_name(t.dtype())) + t.shape().str();
}

Tensor host_copy(const Tensor& t, DType dtype) {
  Tensor h = empty(t.shape(), dtype, Device::cpu());
  copy_(h, t);
  return h;
}

Tensor to_device(const Tensor& host, DType dtype, Device device) {
  if (device.is_cpu() && host.dtype() == dtype) return host;
  Tensor out = empty(host.shape(), dtype, device);
  copy_(out, host);
  return out;
}

}  // namespace titanax::detail
