#!/usr/bin/env bash
# Readies a device run, on this machine (no GPU needed), in .device/ (git-ignored; the device run carries
# it): ../shared/device/prepare.sh (Debian's oneDNN and Catch2 v2, and on-device.sh) and Debian's PCRE2, the peer scripts of
# ../shared/peers (../shared does not travel to the device) in .device/peers, and the MNIST files in
# .device/mnist (copied from build/cpu/data/mnist, else fetched by the CPU build's titanax). Then call the
# device with carry [".device"] and the command `source .device/on-device.sh && scripts/gpu-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
../shared/device/prepare.sh
# PCRE2's headers for GPT-2's tokenizer (the GPU machine has the library, maybe not the headers); on-device.sh
# unpacks every .deb of .device/debs into /opt/deps.
if ! ls .device/debs/libpcre2-dev_*.deb >/dev/null 2>&1; then
  (cd .device/debs && apt-get download libpcre2-dev libpcre2-8-0 >/dev/null 2>&1) || echo "gpu-prepare: no PCRE2 debs (the GPU build goes without GPT-2's tokenizer)"
fi
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
