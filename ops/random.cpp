// Sampling ops (no inputs, not differentiable).
#include "kernels/cpu/random.h"
#include "kernels/cuda/kernels.h"
#include "ops/ops.h"

namespace titanax {
namespace {

class Sample final : public Op {
 public:
  Sample(bool normal, RngKey key, Shape shape, DType dtype, Device device)
      : normal_(normal), key_(key), shape_(shape), dtype_(dtype), device_(device) {}
  const char* name() const override { return normal_ ? "random_normal" : "random_uniform"; }
  std::string attrs() const override {
    return "key=" + key_.str() + " shape=" + shape_.str() + " dtype=" + std::string(dtype_name(dtype_)) + " device=" + device_.str();
  }
  bool differentiable() const override { return false; }
  std::vector<TensorSpec> infer(const TensorList&) const override {
    if (!is_floating(dtype_)) throw DTypeError(std::string(name()) + ": needs a floating dtype", "f32 or f64", std::string(dtype_name(dtype_)));
    return {{shape_, dtype_, device_}};
  }
  void cpu(const TensorList&, TensorList& out) const override {
    if (dtype_ == DType::f32 || dtype_ == DType::f64) {
      normal_ ? kernels::cpu::fill_normal(out[0], key_) : kernels::cpu::fill_uniform(out[0], key_);
      return;
    }
    Tensor tmp = empty(shape_, DType::f32);
    normal_ ? kernels::cpu::fill_normal(tmp, key_) : kernels::cpu::fill_uniform(tmp, key_);
    copy_(out[0], tmp);
  }
  // The CPU's samples (kernels/cuda/random.cuh: the same Philox indexing), made on the device.
  void cuda(const TensorList&, TensorList& out) const override { kernels::cuda::fill_random(normal_, key_, out[0]); }

 private:
  bool normal_;
  RngKey key_;
  Shape shape_;
  DType dtype_;
  Device device_;
};

}  // namespace

Tensor random_uniform(RngKey key, const Shape& shape, DType dtype, Device device) {
  return apply1(std::make_shared<Sample>(false, key, shape, dtype, device), {});
}
Tensor random_normal(RngKey key, const Shape& shape, DType dtype, Device device) {
  return apply1(std::make_shared<Sample>(true, key, shape, dtype, device), {});
}

}  // namespace titanax
