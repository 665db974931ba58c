// The thin CUDA runtime interface the core needs (memory copies, device count, synchronisation).
// Implemented by kernels/cuda/runtime.cpp in CUDA builds and by core/no_cuda.cpp otherwise, so the rest
// of the code calls these without #ifdefs.
#pragma once

#include <cstddef>

namespace titanax::cuda_rt {

/// Whether this build has the CUDA backend compiled in.
bool built_with_cuda();
/// Visible CUDA devices (0 without CUDA or without a GPU).
int device_count();
/// Host-to-device, device-to-host and device-to-device copies on `device`'s current stream; each waits
/// for completion (copies feed host code). Throw DeviceError with the CUDA error string on failure.
void memcpy_h2d(void* dst, const void* src, size_t bytes, int device);
void memcpy_d2h(void* dst, const void* src, size_t bytes, int device);
void memcpy_d2d(void* dst, const void* src, size_t bytes, int device);
/// Waits for all work queued on `device`.
void synchronize(int device);
/// The stream kernels and copies for `device` are queued on (a cudaStream_t; nullptr is the legacy
/// default stream, which is what the backend uses so far). nullptr without CUDA.
void* current_stream(int device);

}  // namespace titanax::cuda_rt
