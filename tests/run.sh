#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (idempotent), builds everything and runs the whole CPU
# test suite with ctest. The exit code says it all. GPU tests compile (when nvcc is on
# PATH) and skip with a printed reason on a machine without a GPU.
#   BUILD_DIR=build  JOBS=$(nproc)  CTEST_ARGS="-R worker"  ./tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

./deploy/install_deps.sh
build_dir=${BUILD_DIR:-build}
jobs=${JOBS:-$(nproc)}
# MPI tests run mpirun as root in CI containers; OpenMPI refuses that unless told.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PATH="$PATH:/usr/local/cuda/bin"

# shellcheck disable=SC2086  # CMAKE_ARGS holds several words on purpose
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo ${CMAKE_ARGS:-}
cmake --build "$build_dir" -j "$jobs"
# shellcheck disable=SC2086
ctest --test-dir "$build_dir" --output-on-failure -j "$jobs" ${CTEST_ARGS:-}
