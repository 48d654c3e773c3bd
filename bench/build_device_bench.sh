#!/usr/bin/env bash
# Builds here (sm_90, Release) the binaries bench/run_device_bench.sh runs on the GPU machine
# and copies them to .device-build/kernels/ (git-ignored; carry ".device-build"). Same options
# as tools/device/build_for_device.sh, own build folder (BUILD, default /tmp/build-kernels-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD:-/tmp/build-kernels-dev}
targets="kernels_cuda_test worker_nccl_step bench_kernels bench_gpu_step"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DUNS_ENABLE_CUDA=ON -DUNS_CUDA_ARCHS=90 \
  -DUNS_ENABLE_SERVICE=OFF -DUNS_ENABLE_BLAS=OFF -DUNS_ENABLE_MPI=ON -DUNS_ENABLE_NCCL=ON -DUNS_BUILD_BENCH=ON >/dev/null
# shellcheck disable=SC2086  # $targets is a list of target names on purpose
cmake --build "$build" -j "${JOBS:-2}" --target $targets
mkdir -p .device-build/kernels
for target in $targets; do
  path=$(find "$build" -type f -name "$target" -perm -u+x | head -1)
  [ -n "$path" ] || { echo "no binary for $target" >&2; exit 1; }
  cp "$path" .device-build/kernels/
done
{ git rev-parse --short HEAD; git status --short -- kernels bench tests/kernels worker/src/context_attention.cpp worker/include/unshackle/worker/context_attention.h | sed 's/^/  uncommitted: /'; } \
  > .device-build/kernels/COMMIT
du -sh .device-build/kernels
