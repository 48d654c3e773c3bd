#!/usr/bin/env bash
# Builds, on this (Debian) machine, the binaries the GPU machine runs, and copies them into
# .device-build/ (git-ignored) to be carried there: the GPU machine has CUDA, NCCL and
# OpenMPI but none of fmt, nlohmann-json, CLI11 or prometheus-cpp. Service parts are off;
# fmt is header-only; gtest is static; BLAS is off (the GPU path uses cuBLAS).
#   tools/device/build_for_device.sh TARGET...
set -euo pipefail
cd "$(dirname "$0")/../.."
build="build-device"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DUNS_ENABLE_CUDA=ON -DUNS_CUDA_ARCHS=90 \
  -DUNS_ENABLE_SERVICE=OFF -DUNS_ENABLE_BLAS=OFF -DUNS_ENABLE_MPI=ON -DUNS_ENABLE_NCCL=ON -DUNS_BUILD_BENCH=ON >/dev/null
cmake --build "$build" -j "${JOBS:-2}" --target "$@"
mkdir -p .device-build
for target in "$@"; do
  path=$(find "$build" -type f -name "$target" -perm -u+x | head -1)
  [ -n "$path" ] || { echo "no binary for $target" >&2; exit 1; }
  cp "$path" .device-build/
done
du -sh .device-build
