#!/usr/bin/env bash
# The first command of a new user. On a fresh Debian 12 machine: installs what is needed
# (apt, idempotent), builds, starts a coordinator and a worker group on this machine (one rank
# per GPU computing on it with --backend cuda when there are GPUs, else CPU ranks), submits the
# demo long-context job (a haystack with facts planted in it, then a question) through the
# public API with a progress display, prints the answer, the timings and where the metrics
# are, and shuts everything down.
# No GPU needed. The service part is deploy/demo_service.sh (ctest runs it too).
#   ./deploy/quickstart.sh [--keep-running] [--ranks N] [--tokens N] [--port P] [--model DIR]
#   ./deploy/quickstart.sh --stop          # ends a service left up by --keep-running
#   ./deploy/quickstart.sh --attention-step # also: one ESA step over 200,000 tokens, 1 vs 4 ranks
#   BUILD_DIR=build (default) chooses the build directory.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}

demo_args=()
attention_step=0
while [ $# -gt 0 ]; do
  case "$1" in
    --keep-running | --stop) demo_args+=("$1"); shift ;;
    --ranks | --tokens | --port | --model) demo_args+=("$1" "$2"); shift 2 ;;
    --attention-step) attention_step=1; shift ;;
    *) echo "usage: $0 [--keep-running | --stop] [--ranks N] [--tokens N] [--port P] [--model DIR] [--attention-step]" >&2
       exit 2 ;;
  esac
done
for arg in "${demo_args[@]}"; do
  if [ "$arg" = --stop ]; then exec ./deploy/demo_service.sh --build "$build" --stop; fi
done

./deploy/install_deps.sh
export PATH="$PATH:/usr/local/cuda/bin"
# mpirun refuses root unless told; containers and fresh cloud machines often are root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
echo "== Building (first run: a few minutes)"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" --target unshackle unshackle-coordinator unshackle-worker -j "$(nproc)"

if [ "$attention_step" = 1 ]; then
  # One attention step without the service: ESA must find 16 facts planted among 200,000
  # tokens, and the KV cache sharded over 4 ranks must select exactly the same tokens.
  case_dir=$build/demo/attention
  mkdir -p "$case_dir"
  echo "== One ESA step over 200,000 tokens with 16 planted facts, 1 rank then 4 ranks"
  "$build/tools/unshackle" make-case --output "$case_dir/case.safetensors" --mode esa --p 200000 --chunk 1 \
    --heads 8 --kv-heads 2 --head-dim 64 --rank 32 --top-k 64 --eps 1 --l-i 64 --l-l 2048 --needles 16 --seed 7
  time "$build/tools/unshackle" attn --input "$case_dir/case.safetensors" --output "$case_dir/esa_1rank.safetensors"
  time "$build/tools/unshackle" attn --ranks 4 --input "$case_dir/case.safetensors" --output "$case_dir/esa_4ranks.safetensors"
fi

echo
exec ./deploy/demo_service.sh --build "$build" "${demo_args[@]}"
