// CHECK macros for CUDA runtime and cuBLASLt calls (host code only): a failure throws DeviceError naming
// the call, the file and line, and the library's own error string.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <string>

#include "core/error.h"
#include "kernels/cuda/launch.h"

namespace titanax::kernels::cuda {

/// Where kernels on `device` report bad input they find (launch.h ReportSlot), made with the device's
/// caching allocator. The host throws a pending report as a ValueError whenever it waits for the device
/// (cuda_rt::memcpy_d2h, cuda_rt::synchronize). Throws DeviceError.
ReportSlot report_slot(int device);

[[noreturn]] void throw_cuda_error(int err, const char* call, const char* file, int line);
[[noreturn]] void throw_cublas_error(int status, const char* call, const char* file, int line);

}  // namespace titanax::kernels::cuda

#define TX_CUDA_CHECK(call)                                                                     \
  do {                                                                                          \
    const int tx_err_ = int(call);                                                              \
    if (tx_err_ != 0) ::titanax::kernels::cuda::throw_cuda_error(tx_err_, #call, __FILE__, __LINE__); \
  } while (0)

#define TX_CUBLAS_CHECK(call)                                                                     \
  do {                                                                                            \
    const int tx_st_ = int(call);                                                                 \
    if (tx_st_ != 0) ::titanax::kernels::cuda::throw_cublas_error(tx_st_, #call, __FILE__, __LINE__); \
  } while (0)
