#!/usr/bin/env bash
# Builds the libFuzzer targets (clang 14, ASan + UBSan, a build directory of its own; see
# cmake/fuzzing.cmake) and runs each for a bounded time from its seed corpus in the tree
# (tests/fuzz/corpus/<name>/, what it finds goes to the build directory, not the tree).
# Fails on any crash, sanitizer report, leak, timeout or out-of-memory, printing the report
# and the saved input. One line per fuzzer: executions, time, corpus, result.
#   FUZZ_BUILD_DIR=build-fuzz FUZZ_SECONDS=20 FUZZ_ONLY="fuzz_http fuzz_routes" ./tests/fuzz/run_fuzzers.sh
#   FUZZ_RUNS=1000000 ./tests/fuzz/run_fuzzers.sh   # a run of N executions each instead of a time
#   FUZZ_OPT=-O2 FUZZ_BUILD_DIR=build-fuzz-o2 ...    # faster fuzzers for a long run, slower build
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
start=$(date +%s)
mkdir -p "$build_dir"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS_DEBUG="$opt" -DCMAKE_CXX_FLAGS_DEBUG="$opt" \
  -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 "${launcher[@]}" \
  -DUNS_BUILD_FUZZERS=ON -DUNS_BUILD_TESTS=OFF -DUNS_ENABLE_CUDA=OFF -DUNS_ENABLE_NCCL=OFF \
  -DUNS_ENABLE_MPI=OFF -DUNS_ENABLE_BLAS=OFF >"$build_dir/configure.log" 2>&1 ||
  { cat "$build_dir/configure.log"; exit 1; }
cmake --build "$build_dir" -j "$jobs" --target fuzzers
echo "run_fuzzers: built in $(($(date +%s) - start)) s"

fuzzers=(fuzz_http fuzz_routes fuzz_multipart fuzz_batch_jsonl fuzz_safetensors fuzz_tokenizer_bpe
         fuzz_tokenizer_sentencepiece)
declare -A dictionary=([fuzz_http]=http.dict [fuzz_routes]=json.dict [fuzz_multipart]=multipart.dict
                       [fuzz_batch_jsonl]=json.dict [fuzz_safetensors]=safetensors.dict
                       [fuzz_tokenizer_bpe]=tokenizer_bpe.dict)
if [ -n "${FUZZ_ONLY:-}" ]; then read -r -a fuzzers <<<"$FUZZ_ONLY"; fi
if [ -n "${FUZZ_RUNS:-}" ]; then limit=(-runs="$FUZZ_RUNS"); else limit=(-max_total_time="$seconds"); fi

symbolizer=$(command -v llvm-symbolizer-14 || command -v llvm-symbolizer || true)
export ASAN_SYMBOLIZER_PATH=$symbolizer
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

# One fuzzer: its line goes to $work/result, its whole output to $work/log.
run_one() {
  local fuzzer=$1 name=${1#fuzz_} rc=0 runs time_s corpus
  local work=$build_dir/fuzz-work/$name
  rm -rf "$work"
  mkdir -p "$work/corpus" "$work/artifacts"
  local args=("${limit[@]}" -timeout=25 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$work/artifacts/")
  if [ -n "${dictionary[$fuzzer]:-}" ]; then args+=(-dict="tests/fuzz/${dictionary[$fuzzer]}"); fi
  "$build_dir/tests/fuzz/$fuzzer" "${args[@]}" "$work/corpus" "tests/fuzz/corpus/$name" >"$work/log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/log" | tail -1)
  time_s=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$work/log" | tail -1)
  corpus=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' "$work/log" | tail -1)
  if [ "$rc" -eq 0 ]; then
    echo "run_fuzzers: $fuzzer: ${runs:-?} executions in ${time_s:-?} s, corpus ${corpus:-?} inputs: OK" >"$work/result"
  else
    {
      echo "run_fuzzers: $fuzzer: FAILED (exit $rc) after ${runs:-?} executions; log $work/log; saved input:"
      ls "$work/artifacts"
      tail -n 60 "$work/log"
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
