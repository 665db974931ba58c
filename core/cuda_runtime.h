// The thin CUDA runtime interface the core needs (memory copies, device count, synchronisation).
// Implemented by kernels/cuda/runtime.cpp in CUDA builds and by core/no_cuda.cpp otherwise, so the rest
// of the code calls these without #ifdefs.
#pragma once

#include <cstddef>
#include <string>

namespace titanax::cuda_rt {

/// Whether this build has the CUDA backend compiled in.
bool built_with_cuda();
/// Visible CUDA devices (0 without CUDA or without a GPU).
int device_count();
/// Host-to-device, device-to-host and device-to-device copies on `device`'s current stream. The first
/// two wait for completion (they feed host code, or read host memory the caller may free); a
/// device-to-device copy is queued like a kernel (stream-ordered, capturable into a CUDA graph). Throw
/// DeviceError with the CUDA error string on failure. After a device-to-host copy has waited, bad input a
/// kernel found on the device since the last wait (cross-entropy's labels: kernels/cuda/check.h
/// report_slot) is thrown as a ValueError, as the CPU kernel would have thrown it at once.
void memcpy_h2d(void* dst, const void* src, size_t bytes, int device);
void memcpy_d2h(void* dst, const void* src, size_t bytes, int device);
void memcpy_d2d(void* dst, const void* src, size_t bytes, int device);
/// Sets `bytes` bytes at dst (device memory of `device`) to zero, queued on the current stream like a
/// kernel (nothing waits; capturable into a CUDA graph). Throws DeviceError.
void memset_zero(void* dst, size_t bytes, int device);
/// Waits for all work queued on `device`, then throws bad input a kernel reported (as memcpy_d2h).
void synchronize(int device);
/// The stream kernels and copies for `device` are queued on by the calling thread (a cudaStream_t):
/// the one set by set_current_stream, else nullptr, the legacy default stream. nullptr without CUDA.
void* current_stream(int device);

// ---- Streams and CUDA graphs (the JIT's captured replay, jit/capture.h). The CUDA Programming
// Guide's "CUDA Graphs: stream capture": work queued on a capturing stream is recorded, not run, and
// cudaGraphLaunch replays it with one launch.

/// A new stream on `device` that synchronises with the legacy default stream (cudaStreamDefault flags:
/// work on either waits for earlier work on the other), so code that queues on the default stream stays
/// ordered with it. Throws DeviceError (also without CUDA).
void* create_stream(int device);
/// Waits for `stream`'s work, then destroys it. Never throws (for destructors).
void destroy_stream(int device, void* stream) noexcept;
/// Makes `stream` the calling thread's current stream for `device` (nullptr: the default stream again).
void set_current_stream(int device, void* stream);
/// Starts recording the calling thread's current stream of `device` (which must not be the default
/// stream: InvalidArgument DeviceError) into a CUDA graph. Until end_capture, the calling thread's
/// allocations on `device` come from the memory pool named `pool` (any non-null tag) and return to it when
/// freed, so memory the graph uses is never handed to allocations outside a capture of that pool (the
/// "private pool" of PyTorch's torch.cuda.graph). Throws DeviceError.
void begin_capture(int device, const void* pool);
/// Ends the capture begun on this thread and instantiates the graph: returns the executable graph (a
/// cudaGraphExec_t), or nullptr when the capture failed (an operation that cannot be captured, such as a
/// synchronising copy, was queued or attempted), with CUDA's reason in *why; the error is cleared and the
/// stream leaves capture mode either way. Never throws.
void* end_capture(int device, std::string* why) noexcept;
/// Queues executable graph `exec` on the calling thread's current stream of `device`. Throws DeviceError.
void launch_graph(int device, void* exec);
/// Destroys an executable graph (no-op for nullptr). Never throws.
void destroy_graph(void* exec) noexcept;
/// Waits for the device, then frees the cached blocks of `pool` (blocks of it still in use are freed
/// when they are released). Never throws.
void release_pool(int device, const void* pool) noexcept;

}  // namespace titanax::cuda_rt
