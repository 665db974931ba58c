// CUDA code generation for the JIT's fused elementwise programs (DESIGN.md section 4): each fused group
// (jit/fusion.h: "fused" nodes and the epilogues of "fused_matmul") becomes one CUDA C++ kernel, compiled
// at run time with NVRTC for the device's architecture and cached in memory and on disk.
//
//   tx::jit::Compiled step = tx::jit::jit(fn);        // on CUDA tensors: fused groups run generated kernels
//   auto s = tx::jit::kernel_cache_stats();          // compiles, memory hits, disk hits, seconds
//   for (auto& src : tx::jit::fused_kernel_sources(graph)) std::cout << src;   // what NVRTC compiles
//
// The kernel of a program evaluates every instruction in registers per output element (a grid-stride
// loop, one thread per element), reading each input once through its broadcast strides (or at the
// element's own index when every input is dense), and writes the program's outputs. Its scalar math is
// kernels/cuda/ew_math.cuh, the same functions the eager CUDA kernels call, compiled with FMA contraction
// off on both sides, so a fused program computes bitwise what its unfused ops compute on the GPU.
//
// The disk cache: one file per kernel, `<dir>/tx-<hash>-sm_<arch>.cubin`, where <hash> is FNV-1a 64 of
// the compile key (NVRTC version, options, source). The file holds the whole key and a CRC-32, checked on
// load: a file for another source (a hash collision), a truncated or a corrupt file is ignored and
// rewritten. Files are written under a temporary name and renamed, so concurrent ranks never read a
// half-written file. <dir>: $TITANAX_KERNEL_CACHE when set ("off" disables the disk cache), else
// $XDG_CACHE_HOME/titanax/kernels, else $HOME/.cache/titanax/kernels.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace titanax::jit {

class Graph;
namespace fused {
struct Program;
}

/// Counters of the kernel cache since the process started (or the last reset_kernel_cache_stats()).
struct KernelCacheStats {
  int64_t compiles = 0;         ///< NVRTC compilations
  int64_t memory_hits = 0;      ///< compile requests served from the in-memory cache
  int64_t disk_hits = 0;        ///< compile requests served from a disk-cache file
  int64_t disk_rejected = 0;    ///< disk-cache files ignored (corrupt, truncated or another key)
  double compile_seconds = 0;   ///< wall time spent in NVRTC
};
KernelCacheStats kernel_cache_stats();
void reset_kernel_cache_stats();
/// Drops the in-memory cache (compiled code and loaded kernels are kept by the nodes that hold them):
/// the next request for a kernel goes to the disk cache. For tests and benchmarks (cold vs warm).
void clear_kernel_memory_cache();
/// The disk-cache folder in use ("" when the disk cache is off); see the header comment.
std::string kernel_cache_dir();

/// The CUDA C++ source of program p's kernel: `extern "C" __global__ void tx_fused(...)` with one
/// pointer parameter per input, then one per output, a struct of the inputs' element strides
/// (rank of p's shape per input, row-major), the element count (long long) and a dense flag (int: 1 when
/// every input of more than one element is contiguous with p's shape). Deterministic: equal programs
/// give equal text. `may_alias`: an output may be the memory of an input (then no pointer is declared
/// __restrict__). Throws InternalError for an instruction the generator does not know (a bug).
std::string cuda_source(const fused::Program& p, bool may_alias = false);

/// NVRTC-compiled CUBIN for `arch` (compute capability * 10, e.g. 90 for sm_90) of `source`, through the
/// memory and disk caches. The header "tx_ew_math.cuh" is available to the source. Thread-safe.
/// Throws DeviceError with NVRTC's log when the source does not compile, and in builds without CUDA.
std::shared_ptr<const std::string> compile_cuda(const std::string& source, int arch);

/// compile_cuda for every source, up to `threads` NVRTC compilations at once (0: the machine's hardware
/// threads), so that a graph's kernels compile in about the time of its slowest one on a machine with
/// as many cores. Equal sources compile once. Returns the number of distinct sources. Thread-safe.
/// Throws the first DeviceError of a source that does not compile (after the others have finished).
int compile_cuda_parallel(const std::vector<std::string>& sources, int arch, int threads = 0);

/// The generated CUDA sources of every fused node of g that runs a generated kernel ("fused" nodes and
/// the epilogues of "fused_matmul" nodes), in node order. Throws what cuda_source throws.
std::vector<std::string> fused_kernel_sources(const Graph& g);

/// Compiles (compile_cuda_parallel, for each device's architecture) the generated kernels of g's fused
/// nodes that live on a CUDA device, so that their first run only loads them: jit() calls it once per
/// new signature, after the passes. Does nothing for a graph without CUDA fused nodes (any build).
/// Throws what compile_cuda_parallel throws.
void precompile_fused_kernels(const Graph& g);

namespace detail {
/// Compute capability of CUDA device `device` times 10 (90 for an H100). Throws DeviceError (and in
/// builds without CUDA).
int device_arch(int device);
/// The kernel `tx_fused` of `source`, compiled for device `device`'s architecture and loaded
/// (cudaLibraryLoadData): an opaque cudaKernel_t. Cached per (source, device). Throws DeviceError.
const void* load_fused_kernel(const std::string& source, int device);
/// Launches a kernel from load_fused_kernel on the device's current stream over n elements with the
/// argument order of cuda_source: input pointers, output pointers, strides (inputs x rank, row-major),
/// n, dense. Throws DeviceError when the launch fails.
void launch_fused_kernel(const void* kernel, int device, const std::vector<const void*>& inputs,
                         const std::vector<void*>& outputs, const std::vector<int64_t>& strides, int64_t n,
                         bool dense);
}  // namespace detail

}  // namespace titanax::jit
