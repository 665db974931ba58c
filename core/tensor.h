// Tensor: a cheap-to-copy handle to shape, strides, dtype and refcounted storage on a device.
//
// Views (reshape of contiguous data, transpose, permute, slice, expand) share storage. Every operation
// that computes goes through an Op (core/op.h), which runs the device's kernel and, when an input
// requires grad, records a node on the thread's tape (autodiff/tape.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/device.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/hooks.h"
#include "core/shape.h"

namespace titanax {

/// Refcounted bytes on one device. `version` counts in-place writes, so autodiff can detect a saved
/// tensor that changed before backward.
class Storage {
 public:
  /// Allocates `nbytes` from the device's allocator (uninitialised).
  Storage(size_t nbytes, Device device);
  /// Wraps memory owned elsewhere; `release` is called with `data` when the storage dies (may be empty).
  Storage(void* data, size_t nbytes, Device device, void (*release)(void*, void*), void* release_ctx);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }
  uint64_t version() const { return version_.load(std::memory_order_relaxed); }
  /// Creation order of this storage among all storages of the process (1, 2, ...): the JIT's tracer
  /// tells storages created during a trace from older ones with it.
  uint64_t serial() const { return serial_; }
  /// The serial the next storage will get.
  static uint64_t next_serial();
  void bump_version() { version_.fetch_add(1, std::memory_order_relaxed); }

 private:
  void* data_ = nullptr;
  size_t nbytes_ = 0;
  Device device_;
  Allocator* allocator_ = nullptr;
  void (*release_)(void*, void*) = nullptr;
  void* release_ctx_ = nullptr;
  std::atomic<uint64_t> version_{0};
  uint64_t serial_;
};

struct Node;  // autodiff/tape.h

class Tensor;
/// A gradient hook (Tensor::register_hook): called with the gradient; returns a replacement, or an
/// undefined Tensor to keep it.
using GradHook = std::function<Tensor(const Tensor& grad)>;

/// What a Tensor handle points at. Users work with Tensor; ops and kernels may read fields directly.
struct TensorImpl {
  Shape shape;
  Shape strides;       // in elements
  int64_t offset = 0;  // in elements, into storage
  DType dtype = DType::f32;
  std::shared_ptr<Storage> storage;

  // Autodiff: set on leaves by the user (set_requires_grad) and on outputs of recorded ops.
  bool requires_grad = false;
  std::shared_ptr<Node> grad_fn;       // the tape node that produced this tensor (null for leaves)
  uint32_t output_index = 0;           // which output of grad_fn
  std::shared_ptr<TensorImpl> grad;    // accumulated gradient of a leaf after backward()
  Hooks<GradHook> grad_hooks;          // a leaf's gradient hooks (a non-leaf's are on its grad_fn node)
  std::string name;                    // optional, for error messages and graphs
};

using TensorList = std::vector<Tensor>;

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // ---- metadata
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return impl().shape; }
  const Shape& strides() const { return impl().strides; }
  int64_t offset() const { return impl().offset; }
  DType dtype() const { return impl().dtype; }
  Device device() const { return impl().storage->device(); }
  int dim() const { return impl().shape.rank(); }
  /// Size of one axis; negative axes count from the end. Throws ShapeError out of range.
  int64_t size(int axis) const;
  int64_t numel() const { return impl().shape.numel(); }
  size_t nbytes() const { return size_t(numel()) * itemsize(dtype()); }
  bool is_contiguous() const;
  /// "Tensor(f32[2, 3], cpu:0)".
  std::string str() const;
  TensorImpl* get() const { return impl_.get(); }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  const std::shared_ptr<Storage>& storage() const { return impl().storage; }
  bool same(const Tensor& o) const { return impl_ == o.impl_; }

  // ---- raw data (CPU tensors only; throws DeviceError otherwise)
  /// Pointer to the first element (storage + offset). T must match dtype's size.
  template <class T> T* data() const { return static_cast<T*>(check_host_ptr(sizeof(T))); }
  void* raw_data() const;  // device pointer to the first element, any device
  /// The value of a one-element tensor as double (copies from the device if needed).
  double item() const;
  /// Elements in row-major order converted to T (copies from the device if needed).
  template <class T> std::vector<T> to_vector() const;

  // ---- conversions and views (each is an op: differentiable where it makes sense)
  Tensor to(Device d) const;
  Tensor astype(DType t) const;
  /// Same data laid out row-major; returns *this when already contiguous.
  Tensor contiguous() const;
  /// A view when the layout allows, else a copy; one dimension may be -1 (inferred).
  Tensor reshape(const Shape& s) const;
  Tensor flatten(int start_axis = 0, int end_axis = -1) const;
  /// Transpose of a rank-2 tensor (swap the last two axes for higher ranks).
  Tensor T() const;
  Tensor transpose(int a, int b) const;
  Tensor permute(const std::vector<int>& axes) const;
  /// Elements [start, stop) with step along `axis` (a view).
  Tensor slice(int axis, int64_t start, int64_t stop, int64_t step = 1) const;
  Tensor unsqueeze(int axis) const;
  Tensor squeeze(int axis) const;
  /// Broadcast view to `s` (stride 0 on broadcast axes).
  Tensor expand(const Shape& s) const;
  /// Deep copy into fresh contiguous storage (differentiable).
  Tensor clone() const;
  /// Same storage, cut from the tape: no grad_fn, requires_grad false.
  Tensor detach() const;

  // ---- autodiff
  bool requires_grad() const { return impl().requires_grad; }
  /// Marks a leaf as a variable to differentiate; throws AutodiffError on a non-leaf or integer dtype.
  Tensor& set_requires_grad(bool on = true);
  /// The leaf's accumulated gradient after backward(); undefined Tensor if none yet.
  Tensor grad() const;
  void zero_grad();
  bool is_leaf() const { return impl().grad_fn == nullptr; }
  /// Reverse-mode differentiation from this scalar: accumulates d(this)/d(leaf) into each leaf's grad().
  void backward() const;
  /// Registers a gradient hook (PyTorch's Tensor.register_hook): whenever a backward pass (backward(),
  /// grad(), value_and_grad(), an Engine step) computes the gradient with respect to this tensor, the
  /// hooks run on it in registration order, each seeing the previous one's result, before it is used:
  /// propagated further back, returned, or accumulated into grad(). A hook returns a replacement
  /// gradient (same shape, dtype and device; else AutodiffError) or an undefined Tensor to keep it, so a
  /// hook that only reads it (a norm per layer, to see where gradients explode) returns Tensor(). A
  /// leaf's hooks see its total gradient (every use summed) once; a non-leaf's see the gradient of this
  /// very output of the op that made it (views and copies of it have their own). Hooks run only where a
  /// gradient reaches the tensor, as the backward pass's ops (recorded under create_graph, traced under
  /// jit: there they run once, at the trace, and what they compute is replayed). Any floating tensor
  /// takes hooks: a leaf whether or not it requires grad yet (a model's parameters require it only
  /// inside value_and_grad). Throws AutodiffError for a non-floating tensor, ValueError for an empty
  /// hook. The handle removes the hook.
  HookHandle register_hook(GradHook hook) const;
  const std::string& name() const { return impl().name; }
  Tensor& set_name(std::string n) {
    impl().name = std::move(n);
    return *this;
  }

 private:
  TensorImpl& impl() const {
    if (!impl_) throw ValueError("use of an undefined Tensor", "a tensor created by an op or factory", "Tensor()");
    return *impl_;
  }
  void* check_host_ptr(size_t elem_size) const;
  std::shared_ptr<TensorImpl> impl_;
};

// ---- factories. All take an optional device (default CPU) and throw ValueError on negative sizes.
/// Uninitialised contiguous tensor.
Tensor empty(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
Tensor ones(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
Tensor full(const Shape& shape, double value, DType dtype = DType::f32, Device device = Device::cpu());
Tensor zeros_like(const Tensor& t);
Tensor ones_like(const Tensor& t);
/// 0-d tensor holding `value`.
Tensor scalar(double value, DType dtype = DType::f32, Device device = Device::cpu());
/// [start, stop) with step, as i64 by default.
Tensor arange(int64_t start, int64_t stop, int64_t step = 1, DType dtype = DType::i64);
/// Copies `values` (row-major) into a new CPU tensor of `shape`; throws ShapeError if the counts differ.
Tensor from_vector(const std::vector<float>& values, const Shape& shape, DType dtype = DType::f32);
Tensor from_vector(const std::vector<double>& values, const Shape& shape, DType dtype = DType::f64);
Tensor from_vector(const std::vector<int64_t>& values, const Shape& shape, DType dtype = DType::i64);
Tensor from_vector(const std::vector<int32_t>& values, const Shape& shape, DType dtype = DType::i32);
/// New tensor with the given layout over existing storage (no copy, no checks beyond bounds).
Tensor make_view(const Tensor& base, const Shape& shape, const Shape& strides, int64_t offset);

/// Copies src into dst elementwise (same shape; dtypes may differ; any devices), bumping dst's version.
/// Not recorded on the tape: for optimizers, loaders and checkpoint loading. Inside a function being
/// traced by the JIT the write becomes one of the graph's in-place updates (jit/graph.h).
void copy_(Tensor& dst, const Tensor& src);
/// Writes `value` into every element of dst in place (not recorded on the tape).
void fill_(Tensor& dst, double value);

}  // namespace titanax
