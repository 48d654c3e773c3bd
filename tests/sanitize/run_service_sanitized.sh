#!/usr/bin/env bash
# The service suites (ctest -L 'service|faults': router, coordinator process, engine, the e2e
# suites with real coordinator and `mpirun` worker processes, the fault cases; not the soak,
# whose RSS bound ASan's 256 MB free-memory quarantine would break by design) built with ASan and
# UBSan (UNS_SANITIZE, cmake/sanitize.cmake; CUDA off) in a build directory of their own.
# Every sanitized process (tests, coordinators, workers, the CLI) writes its reports to one
# folder (ASAN_OPTIONS/UBSAN_OPTIONS log_path), so a report from a child process that a test
# only talks to over HTTP still fails the run: the script fails when ctest fails or when any
# report file exists, and prints each report.
#   SAN_BUILD_DIR=build-sanitize JOBS=2 CTEST_ARGS="-R service_e2e" ./tests/sanitize/run_service_sanitized.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

build_dir=${SAN_BUILD_DIR:-build-sanitize}
jobs=${JOBS:-$(nproc)}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache); fi
start=$(date +%s)
mkdir -p "$build_dir"
# -O1: ASan's recommended level (readable stacks, a suite that still fits CI's time).
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS_DEBUG="-O1 -g" \
  -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g" -DUNS_SANITIZE=ON -DUNS_ENABLE_CUDA=OFF -DUNS_ENABLE_NCCL=OFF \
  "${launcher[@]}" >"$build_dir/configure.log" 2>&1 || { cat "$build_dir/configure.log"; exit 1; }
grep -q "unshackle: SANITIZE ON" "$build_dir/configure.log" || { echo "run_service_sanitized: UNS_SANITIZE not on" >&2; exit 1; }
cmake --build "$build_dir" -j "$jobs"
echo "run_service_sanitized: built in $(($(date +%s) - start)) s"

reports=$(cd "$build_dir" && pwd)/sanitizer-reports
rm -rf "$reports"
mkdir -p "$reports"
suppressions=$(pwd)/tests/sanitize/lsan.supp
symbolizer=$(command -v llvm-symbolizer-14 || command -v llvm-symbolizer || true)
# detect_leaks: leaks at exit are reports too (OpenMPI's own, known ones: lsan.supp; the worker
# sets the slow unwinder for them in its __asan_default_options).
# exitcode 23: a sanitized process that reports exits with a code no test expects.
export ASAN_OPTIONS="log_path=$reports/asan:detect_leaks=1:exitcode=23:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1${symbolizer:+:external_symbolizer_path=$symbolizer}"
export UBSAN_OPTIONS="log_path=$reports/ubsan:print_stacktrace=1:halt_on_error=1:exitcode=23"
export LSAN_OPTIONS="suppressions=$suppressions:print_suppressions=0"
status=0
# shellcheck disable=SC2086  # CTEST_ARGS holds several words on purpose
ctest --test-dir "$build_dir" -L 'service|faults' -LE soak --output-on-failure -j "$jobs" --timeout 900 ${CTEST_ARGS:-} || status=$?
found=$(find "$reports" -type f | sort)
if [ -n "$found" ]; then
  echo "run_service_sanitized: sanitizer reports ($(echo "$found" | wc -l) files):"
  for f in $found; do echo "---- $f"; head -60 "$f"; done
  status=1
fi
echo "run_service_sanitized: $([ "$status" = 0 ] && echo "PASS: ctest passed, no sanitizer report" || echo FAIL) ($(($(date +%s) - start)) s)"
exit "$status"
