#!/usr/bin/env bash
# The long fuzz run of issue 15 (>= 1M executions per fuzzer) on a machine with many cores: the
# GPU machine's 16 CPU cores do it in minutes where the 2-core development machine takes about
# an hour. The GPU is not used.
#   tools/device/run_fuzz_long.sh pack      # here: build the -O2 fuzzers (build-fuzz-o2/) and pack
#                                           # them with the .so files the other machine may lack
#                                           # into .device-build/fuzz/fuzz.tar.gz (carry .device-build)
#   tools/device/run_fuzz_long.sh run [--runs N] [--max-seconds S] [--only "fuzz_http ..."]
#                                           # there: unpack, run each fuzzer as $(nproc) libFuzzer
#                                           # jobs sharing one corpus (N executions in all, 1M by
#                                           # default; each job stops after S s anyway), results
#                                           # under $OUT: fuzz_long.txt (one line per fuzzer),
#                                           # fuzz_logs.tar.gz (every job's log, what it saved)
# The fuzzers and their checks are tests/fuzz/run_fuzzers.sh's; this only moves them.
set -euo pipefail
cd "$(dirname "$0")/../.."

stage=.device-build/fuzz
build_dir=build-fuzz-o2
fuzzers=(fuzz_http fuzz_routes fuzz_multipart fuzz_batch_jsonl fuzz_safetensors fuzz_tokenizer_bpe
         fuzz_tokenizer_sentencepiece)

pack() {
  FUZZ_BUILD_ONLY=1 FUZZ_OPT=-O2 FUZZ_BUILD_DIR=$build_dir tests/fuzz/run_fuzzers.sh
  rm -rf "$stage"
  mkdir -p "$stage/bin" "$stage/lib"
  for fuzzer in "${fuzzers[@]}"; do
    cp "$build_dir/tests/fuzz/$fuzzer" "$stage/bin/"
    # The C/C++ runtime stays the other machine's (newer there); everything else travels.
    ldd "$build_dir/tests/fuzz/$fuzzer" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' |
      while read -r name path; do
        case "$name" in
          ld-linux*.so* | libc.so* | libm.so* | libdl.so* | libpthread.so* | librt.so* | libgcc_s.so* | libstdc++.so*) ;;
          *) [ -e "$stage/lib/$name" ] || cp -L "$path" "$stage/lib/$name" ;;
        esac
      done
  done
  tar -C "$stage" -czf "$stage/fuzz.tar.gz" bin lib
  rm -rf "${stage:?}/bin" "${stage:?}/lib"
  echo "run_fuzz_long: $(du -h "$stage/fuzz.tar.gz" | cut -f1) in $stage/fuzz.tar.gz: ${fuzzers[*]}"
}

run() {
  local runs=1000000 max_seconds=240 only=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --runs) runs=$2; shift 2 ;;
      --max-seconds) max_seconds=$2; shift 2 ;;
      --only) only=$2; shift 2 ;;
      *) echo "usage: $0 run [--runs N] [--max-seconds S] [--only \"fuzz_a fuzz_b\"]" >&2; exit 2 ;;
    esac
  done
  [ -f "$stage/fuzz.tar.gz" ] || { echo "run_fuzz_long: no $stage/fuzz.tar.gz (run '$0 pack' and carry .device-build)" >&2; exit 1; }
  local out=${OUT:-/tmp/unshackle-fuzz-out} unpacked
  mkdir -p "$out" "$build_dir/tests/fuzz"
  unpacked=$(mktemp -d)
  tar -C "$unpacked" -xzf "$stage/fuzz.tar.gz"
  cp "$unpacked"/bin/* "$build_dir/tests/fuzz/"
  export LD_LIBRARY_PATH="$unpacked/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local status=0
  {
    echo "# $(date -u +%FT%TZ) $(hostname) $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "# FUZZ_RUNS=$runs FUZZ_JOBS=$(nproc) FUZZ_MAX_SECONDS=$max_seconds (-O2, ASan + UBSan)"
  } >"$out/fuzz_long.txt"
  FUZZ_SKIP_BUILD=1 FUZZ_BUILD_DIR=$build_dir FUZZ_RUNS=$runs FUZZ_JOBS=$(nproc) FUZZ_PARALLEL=1 \
    FUZZ_MAX_SECONDS=$max_seconds FUZZ_ONLY="${only:-${fuzzers[*]}}" tests/fuzz/run_fuzzers.sh 2>&1 |
    tee -a "$out/fuzz_long.txt" || status=$?
  tar -C "$build_dir" -czf "$out/fuzz_logs.tar.gz" --exclude='corpus' fuzz-work || true
  return "$status"
}

case "${1:-}" in
  pack) pack ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 pack | run [--runs N] [--max-seconds S] [--only \"fuzz_a ...\"]" >&2; exit 2 ;;
esac
