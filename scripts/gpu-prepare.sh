#!/usr/bin/env bash
# Readies a device run, on this machine (no GPU needed), in .device/ (git-ignored; the device run carries
# it): ../shared/device/prepare.sh (Debian's oneDNN and Catch2 v2, and on-device.sh), the peer scripts of
# ../shared/peers (../shared does not travel to the device) in .device/peers, and the MNIST files in
# .device/mnist (copied from build/cpu/data/mnist, else fetched by the CPU build's titanax). Then call the
# device with carry [".device"] and the command `source .device/on-device.sh && scripts/gpu-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
../shared/device/prepare.sh
mkdir -p .device/peers
cp ../shared/peers/*.py .device/peers/
if [[ ! -d .device/mnist ]]; then
  if [[ -d build/cpu/data/mnist ]]; then
    cp -r build/cpu/data/mnist .device/mnist
  else
    [[ -x build/cpu/apps/titanax ]] || { cmake --preset cpu >/dev/null && cmake --build --preset cpu --target titanax_cli; }
    build/cpu/apps/titanax fetch mnist --out .device/mnist
  fi
fi
echo "device run prepared: $(du -sh .device | cut -f1) in .device (peers: $(ls .device/peers | wc -l), mnist: $(ls .device/mnist | wc -l) files)"
