// What jit/codegen.cpp needs from NVRTC: implemented by jit/cuda_codegen.cpp in CUDA builds and by
// jit/no_cuda.cpp (throwing DeviceError) otherwise. Internal to jit/.
#pragma once

#include <string>

namespace titanax::jit::detail {

/// The part of a kernel's cache key that is not its source: NVRTC's version, the target architecture
/// and the compile options, as one line.
std::string nvrtc_key(int arch);
/// CUBIN of `source` for sm_<arch> (header "tx_ew_math.cuh" available). Throws DeviceError with the
/// NVRTC log when the source does not compile.
std::string nvrtc_compile(const std::string& source, int arch);

}  // namespace titanax::jit::detail
