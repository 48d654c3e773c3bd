#!/usr/bin/env bash
# Builds the libFuzzer targets (clang 14, ASan + UBSan, a build directory of its own; see
# cmake/fuzzing.cmake) and runs each for a bounded time from its seed corpus in the tree
# (tests/fuzz/corpus/<name>/, what it finds goes to the build directory, not the tree).
# Fails on any crash, sanitizer report, leak, timeout or out-of-memory, printing the report
# and the saved input. One line per fuzzer: executions, time, corpus, result.
#   FUZZ_BUILD_DIR=build-fuzz FUZZ_SECONDS=20 FUZZ_ONLY="fuzz_http fuzz_routes" ./tests/fuzz/run_fuzzers.sh
#   FUZZ_RUNS=1000000 ./tests/fuzz/run_fuzzers.sh   # a run of N executions each instead of a time
#   FUZZ_OPT=-O2 FUZZ_BUILD_DIR=build-fuzz-o2 ...    # faster fuzzers for a long run, slower build
#   FUZZ_JOBS=16 FUZZ_RUNS=1000000 FUZZ_PARALLEL=1 ... # N processes per fuzzer sharing one corpus
#                                                     # (libFuzzer -jobs), FUZZ_RUNS split among them
#   FUZZ_MAX_SECONDS=300 FUZZ_RUNS=... ...             # and stop each (job) after this long anyway
#   FUZZ_BUILD_ONLY=1 / FUZZ_SKIP_BUILD=1 ...         # only build / run the fuzzers already in
#                                                     # FUZZ_BUILD_DIR (tools/device/run_fuzz_long.sh)
# CI builds at -O0: the sanitized build then takes about half the CPU time of -O2 (which
# would not fit CI's budget on 2 cores), and a bounded run needs coverage, not speed.
set -euo pipefail
cd "$(dirname "$0")/../.."

build_dir=${FUZZ_BUILD_DIR:-build-fuzz}
seconds=${FUZZ_SECONDS:-20}
opt="${FUZZ_OPT:--O0} -gline-tables-only"  # line tables: sanitizer reports name file:line
jobs=${JOBS:-$(nproc)}
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
fuzz_jobs=${FUZZ_JOBS:-1}
start=$(date +%s)
mkdir -p "$build_dir"
build_abs=$(cd "$build_dir" && pwd)
if [ -z "${FUZZ_SKIP_BUILD:-}" ]; then
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS_DEBUG="$opt" -DCMAKE_CXX_FLAGS_DEBUG="$opt" \
  -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 "${launcher[@]}" \
  -DUNS_BUILD_FUZZERS=ON -DUNS_BUILD_TESTS=OFF -DUNS_ENABLE_CUDA=OFF -DUNS_ENABLE_NCCL=OFF \
  -DUNS_ENABLE_MPI=OFF -DUNS_ENABLE_BLAS=OFF >"$build_dir/configure.log" 2>&1 ||
  { cat "$build_dir/configure.log"; exit 1; }
cmake --build "$build_dir" -j "$jobs" --target fuzzers
echo "run_fuzzers: built in $(($(date +%s) - start)) s"
fi
if [ -n "${FUZZ_BUILD_ONLY:-}" ]; then exit 0; fi

fuzzers=(fuzz_http fuzz_routes fuzz_multipart fuzz_batch_jsonl fuzz_safetensors fuzz_tokenizer_bpe
         fuzz_tokenizer_sentencepiece)
declare -A dictionary=([fuzz_http]=http.dict [fuzz_routes]=json.dict [fuzz_multipart]=multipart.dict
                       [fuzz_batch_jsonl]=json.dict [fuzz_safetensors]=safetensors.dict
                       [fuzz_tokenizer_bpe]=tokenizer_bpe.dict)
if [ -n "${FUZZ_ONLY:-}" ]; then read -r -a fuzzers <<<"$FUZZ_ONLY"; fi
# With FUZZ_JOBS > 1 each job gets -runs and -max_total_time on its own: split the runs.
if [ -n "${FUZZ_RUNS:-}" ]; then limit=(-runs="$(( (FUZZ_RUNS + fuzz_jobs - 1) / fuzz_jobs ))"); else limit=(-max_total_time="$seconds"); fi
if [ -n "${FUZZ_MAX_SECONDS:-}" ]; then limit+=(-max_total_time="$FUZZ_MAX_SECONDS"); fi
if [ "$fuzz_jobs" -gt 1 ]; then limit+=(-jobs="$fuzz_jobs" -workers="$fuzz_jobs"); fi

symbolizer=$(command -v llvm-symbolizer-14 || command -v llvm-symbolizer || true)
export ASAN_SYMBOLIZER_PATH=$symbolizer
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

# One fuzzer: its line goes to $work/result, its whole output to $work/log.
run_one() {
  local fuzzer=$1 name=${1#fuzz_} rc=0 runs time_s corpus
  local work started tree
  started=$(date +%s)
  tree=$(pwd)
  work=$build_abs/fuzz-work/$name
  rm -rf "$work"
  mkdir -p "$work/corpus" "$work/artifacts"
  local args=("${limit[@]}" -timeout=25 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$work/artifacts/")
  if [ -n "${dictionary[$fuzzer]:-}" ]; then args+=(-dict="$tree/tests/fuzz/${dictionary[$fuzzer]}"); fi
  # In $work: with -jobs each job writes its own fuzz-<i>.log there.
  (cd "$work" && "$build_abs/tests/fuzz/$fuzzer" "${args[@]}" "$work/corpus" "$tree/tests/fuzz/corpus/$name") \
    >"$work/log" 2>&1 || rc=$?
  local logs=("$work/log")
  if [ "$fuzz_jobs" -gt 1 ]; then logs=("$work"/fuzz-*.log); fi
  # Executions: summed over the jobs; time: wall clock of the whole run.
  runs=$(cat "${logs[@]}" | sed -n 's/^stat::number_of_executed_units: *//p' | awk '{n += $1} END {print n + 0}')
  time_s=$(($(date +%s) - started))
  corpus=$(find "$work/corpus" -type f | wc -l)
  if [ "$rc" -eq 0 ]; then
    echo "run_fuzzers: $fuzzer: ${runs:-?} executions in ${time_s:-?} s, ${corpus:-?} inputs added to the corpus: OK" >"$work/result"
  else
    {
      echo "run_fuzzers: $fuzzer: FAILED (exit $rc) after ${runs:-?} executions; log $work/log; saved input:"
      ls "$work/artifacts"
      for log in "${logs[@]}"; do grep -q -E "ERROR|SUMMARY|deadly signal|Timeout|out-of-memory" "$log" && tail -n 60 "$log"; done
      tail -n 20 "$work/log"
    } >"$work/result"
  fi
  return "$rc"
}

# FUZZ_PARALLEL fuzzers at a time (default: one per core, at most 2, CI's machine).
parallel=${FUZZ_PARALLEL:-$(( $(nproc) < 2 ? 1 : 2 ))}
failed=0
running=0
for fuzzer in "${fuzzers[@]}"; do
  if [ "$running" -ge "$parallel" ]; then
    wait -n || failed=1
    running=$((running - 1))
  fi
  run_one "$fuzzer" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
  wait -n || failed=1
  running=$((running - 1))
done
for fuzzer in "${fuzzers[@]}"; do cat "$build_dir/fuzz-work/${fuzzer#fuzz_}/result"; done
echo "run_fuzzers: done in $(($(date +%s) - start)) s"
exit "$failed"
