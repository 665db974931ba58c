#include "core/tensor.h"

#include <cmath>
#include <cstring>
#include <sstream>

#include "autodiff/autodiff.h"
#include "core/cuda_runtime.h"
#include "kernels/cpu/elementwise.h"

namespace titanax {

// ---------------------------------------------------------------- Storage

namespace {
std::atomic<uint64_t> g_storage_serial{1};
}  // namespace

uint64_t Storage::next_serial() { return g_storage_serial.load(std::memory_order_relaxed); }

Storage::Storage(size_t nbytes, Device device)
    : nbytes_(nbytes), device_(device), serial_(g_storage_serial.fetch_add(1, std::memory_order_relaxed)) {
  allocator_ = &allocator_for(device);
  data_ = allocator_->allocate(nbytes);
}

Storage::Storage(void* data, size_t nbytes, Device device, void (*release)(void*, void*), void* ctx)
    : data_(data), nbytes_(nbytes), device_(device), release_(release), release_ctx_(ctx),
      serial_(g_storage_serial.fetch_add(1, std::memory_order_relaxed)) {}

Storage::~Storage() {
  if (allocator_) allocator_->deallocate(data_, nbytes_);
  else if (release_) release_(release_ctx_, data_);
}

// ---------------------------------------------------------------- Tensor

int64_t Tensor::size(int axis) const { return shape()[normalize_axis(axis, dim())]; }

bool Tensor::is_contiguous() const {
  const auto& s = shape();
  const auto& st = strides();
  int64_t expect = 1;
  for (int i = s.rank() - 1; i >= 0; --i) {
    if (s[i] != 1 && st[i] != expect) return false;
    expect *= s[i];
  }
  return true;
}

std::string Tensor::str() const {
  if (!defined()) return "Tensor(undefined)";
  return "Tensor(" + std::string(dtype_name(dtype())) + shape().str() + ", " + device().str() + ")";
}

void* Tensor::raw_data() const {
  return static_cast<char*>(impl().storage->data()) + offset() * int64_t(itemsize(dtype()));
}

void* Tensor::check_host_ptr(size_t elem_size) const {
  if (!device().is_cpu())
    throw DeviceError("host access to a device tensor", "a CPU tensor", str(), "call .to(Device::cpu()) first");
  if (elem_size != itemsize(dtype()))
    throw DTypeError("data<T>() with the wrong element size",
                     std::to_string(itemsize(dtype())) + "-byte elements (" + std::string(dtype_name(dtype())) + ")",
                     std::to_string(elem_size) + "-byte T");
  return raw_data();
}

double Tensor::item() const {
  if (numel() != 1)
    throw ShapeError("item() of a tensor with more than one element", "exactly 1 element", str());
  return to_vector<double>()[0];  // to_vector tells a tracer
}

template <class T>
std::vector<T> Tensor::to_vector() const {
  detail::notify_host_read(*this);
  Tensor host = device().is_cpu() ? *this : detach().to(Device::cpu());
  DType want = DType::f64;
  if constexpr (std::is_same_v<T, float>) want = DType::f32;
  else if constexpr (std::is_same_v<T, int64_t>) want = DType::i64;
  else if constexpr (std::is_same_v<T, int32_t>) want = DType::i32;
  else if constexpr (std::is_same_v<T, uint8_t>) want = DType::u8;
  Tensor out = empty(shape(), want);
  kernels::cpu::copy_cast(host, out);
  const T* p = out.data<T>();
  return std::vector<T>(p, p + out.numel());
}
template std::vector<float> Tensor::to_vector<float>() const;
template std::vector<double> Tensor::to_vector<double>() const;
template std::vector<int64_t> Tensor::to_vector<int64_t>() const;
template std::vector<int32_t> Tensor::to_vector<int32_t>() const;
template std::vector<uint8_t> Tensor::to_vector<uint8_t>() const;

Tensor Tensor::detach() const {
  auto d = std::make_shared<TensorImpl>();
  d->shape = shape();
  d->strides = strides();
  d->offset = offset();
  d->dtype = dtype();
  d->storage = storage();
  d->name = name();
  return Tensor(std::move(d));
}

Tensor& Tensor::set_requires_grad(bool on) {
  if (on && !is_floating(dtype()))
    throw AutodiffError("requires_grad on a non-floating tensor", "a floating dtype (f32, f64, bf16, f16)",
                        str(), "cast with astype(DType::f32) first");
  if (!is_leaf())
    throw AutodiffError("set_requires_grad on a non-leaf tensor", "a leaf (created by a factory, not by an op)",
                        str(), "call detach() to get a leaf that shares storage");
  impl().requires_grad = on;
  return *this;
}

Tensor Tensor::grad() const { return impl().grad ? Tensor(impl().grad) : Tensor(); }

void Tensor::zero_grad() { impl().grad.reset(); }

void Tensor::backward() const { titanax::backward(*this); }

int64_t next_hook_id() {
  static std::atomic<int64_t> next{0};
  return next++;
}

HookHandle Tensor::register_hook(GradHook hook) const {
  if (!hook) throw ValueError("register_hook: an empty hook", "a callable", "an empty std::function");
  if (!is_floating(dtype()))
    throw AutodiffError("register_hook on a non-floating tensor", "a floating tensor (it has gradients)", str());
  Node* n = impl().grad_fn.get();
  if (!n) return impl().grad_hooks.add(std::move(hook));  // a leaf
  if (n->grad_hooks.size() < n->out_specs.size()) n->grad_hooks.resize(n->out_specs.size());
  return n->grad_hooks[impl().output_index].add(std::move(hook));
}

// ---------------------------------------------------------------- factories

namespace {
void check_sizes(const Shape& s) {
  for (auto d : s)
    if (d < 0) throw ValueError("negative dimension in a shape", "sizes >= 0", s.str());
}
}  // namespace

Tensor empty(const Shape& shape, DType dtype, Device device) {
  check_sizes(shape);
  auto impl = std::make_shared<TensorImpl>();
  impl->shape = shape;
  impl->strides = shape.contiguous_strides();
  impl->dtype = dtype;
  impl->storage = std::make_shared<Storage>(size_t(shape.numel()) * itemsize(dtype), device);
  return Tensor(std::move(impl));
}

Tensor full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  fill_(t, value);
  return t;
}
Tensor zeros(const Shape& shape, DType dtype, Device device) { return full(shape, 0.0, dtype, device); }
Tensor ones(const Shape& shape, DType dtype, Device device) { return full(shape, 1.0, dtype, device); }
Tensor zeros_like(const Tensor& t) { return zeros(t.shape(), t.dtype(), t.device()); }
Tensor ones_like(const Tensor& t) { return ones(t.shape(), t.dtype(), t.device()); }
Tensor scalar(double value, DType dtype, Device device) { return full(Shape{}, value, dtype, device); }

Tensor arange(int64_t start, int64_t stop, int64_t step, DType dtype) {
  if (step == 0) throw ValueError("arange with step 0", "a non-zero step", "0");
  int64_t n = std::max<int64_t>(0, (stop - start + step - (step > 0 ? 1 : -1)) / step);
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = double(start + i * step);
  return from_vector(v, Shape{n}, dtype);
}

template <class T>
static Tensor from_vec(const std::vector<T>& values, const Shape& shape, DType dtype, DType native) {
  if (int64_t(values.size()) != shape.numel())
    throw ShapeError("from_vector: value count does not match the shape",
                     std::to_string(shape.numel()) + " values for " + shape.str(), std::to_string(values.size()));
  Tensor src = empty(shape, native);
  if (!values.empty()) std::memcpy(src.raw_data(), values.data(), values.size() * sizeof(T));
  if (dtype == native) return src;
  Tensor out = empty(shape, dtype);
  kernels::cpu::copy_cast(src, out);
  return out;
}
Tensor from_vector(const std::vector<float>& v, const Shape& s, DType t) { return from_vec(v, s, t, DType::f32); }
Tensor from_vector(const std::vector<double>& v, const Shape& s, DType t) { return from_vec(v, s, t, DType::f64); }
Tensor from_vector(const std::vector<int64_t>& v, const Shape& s, DType t) { return from_vec(v, s, t, DType::i64); }
Tensor from_vector(const std::vector<int32_t>& v, const Shape& s, DType t) { return from_vec(v, s, t, DType::i32); }

Tensor make_view(const Tensor& base, const Shape& shape, const Shape& strides, int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  impl->shape = shape;
  impl->strides = strides;
  impl->offset = offset;
  impl->dtype = base.dtype();
  impl->storage = base.storage();
  return Tensor(std::move(impl));
}

// ---------------------------------------------------------------- in-place helpers

void copy_(Tensor& dst, const Tensor& src) {
  if (dst.shape() != src.shape())
    throw ShapeError("copy_ between different shapes", dst.shape().str(), src.shape().str());
  detail::notify_write(dst, src);
  if (dst.device().is_cpu() && src.device().is_cpu()) {
    kernels::cpu::copy_cast(src, dst);
  } else if (dst.device().is_cpu()) {  // device -> host: bring a contiguous copy over, then cast/strided-copy
    Tensor s = src.detach().contiguous();
    Tensor host = empty(s.shape(), s.dtype());
    cuda_rt::memcpy_d2h(host.raw_data(), s.raw_data(), s.nbytes(), s.device().index);
    kernels::cpu::copy_cast(host, dst);
  } else {
    Tensor s = src.detach().astype(dst.dtype()).contiguous();
    if (!dst.is_contiguous())
      throw ShapeError("copy_ into a strided device tensor", "a contiguous destination", dst.str());
    if (s.device().is_cpu())
      cuda_rt::memcpy_h2d(dst.raw_data(), s.raw_data(), s.nbytes(), dst.device().index);
    else if (s.device() == dst.device())
      cuda_rt::memcpy_d2d(dst.raw_data(), s.raw_data(), s.nbytes(), dst.device().index);
    else
      throw DeviceError("copy_ between two CUDA devices", "same device", s.device().str() + " -> " + dst.device().str(),
                        "copy through the CPU");
  }
  dst.storage()->bump_version();
}

void fill_(Tensor& dst, double value) {
  if (apply_observer()) {  // the value as a tensor (made without fill_) for the tracer
    Tensor v = empty(Shape{}, dst.dtype());
    kernels::cpu::fill(v, value);
    detail::notify_write(dst, (dst.device().is_cpu() ? v : v.to(dst.device())).expand(dst.shape()));
  }
  if (dst.device().is_cpu()) {
    kernels::cpu::fill(dst, value);
  } else if (value == 0.0 && !std::signbit(value) && dst.is_contiguous()) {  // +0 is all zero bytes in every dtype
    cuda_rt::memset_zero(dst.raw_data(), dst.nbytes(), dst.device().index);   // queued: nothing waits
  } else {
    Tensor host = full(dst.shape(), value, dst.dtype());
    copy_(dst, host);
  }
  dst.storage()->bump_version();
}

}  // namespace titanax
