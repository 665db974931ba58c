// Internal helpers shared by the communicator backends and the collectives (not part of the public API;
// the engine should not include this header).
#pragma once

#include <string>

#include "parallel/communicator.h"

namespace titanax::detail {

/// "sum", "max", "min".
const char* collective_op_name(CollectiveOp op);

/// Whether the cross-rank consistency checks of collectives are on: true unless the environment sets
/// TITANAX_CHECK_COLLECTIVES=0. Read once per process.
bool collective_checks_enabled();

/// Throws ValueError for an undefined tensor; `what` names the collective ("all_reduce").
void check_defined(const Tensor& t, const char* what);
/// Throws DTypeError unless t's dtype can be reduced (f32, f64, f16, bf16, i32, i64, u8).
void check_reducible(const Tensor& t, const char* what);
/// Throws CollectiveError unless t has at least one dimension and t.shape[0] divides by `size`.
void check_axis0_divides(const Tensor& t, int size, const char* what);
/// For ireduce_scatter: throws CollectiveError unless `out` is defined with t's dtype and device and t's
/// shape with axis 0 divided by `size` (call check_axis0_divides(t, ...) first).
void check_scatter_out(const Tensor& t, const Tensor& out, int size, const char* what);
/// "f32[2, 3]".
std::string tensor_sig(const Tensor& t);
/// A fresh contiguous CPU copy of t with dtype `dtype` (not recorded on the tape).
Tensor host_copy(const Tensor& t, DType dtype);
/// A fresh tensor on `device` with host's values (host itself when device is the CPU and dtypes match).
Tensor to_device(const Tensor& host, DType dtype, Device device);

}  // namespace titanax::detail
