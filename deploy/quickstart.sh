#!/usr/bin/env bash
# The first command of a new user: on a fresh Debian 12 machine, installs what is needed,
# builds, and runs the demo: a long context with facts ("needles") planted in its middle,
# one ESA attention step that must find them, checked against the single-rank reference
# by the distributed path on several ranks. Idempotent; no GPU needed.
#   ./deploy/quickstart.sh [--tokens N] [--ranks P]
set -euo pipefail
cd "$(dirname "$0")/.."

tokens=200000
ranks=4
while [ $# -gt 0 ]; do
  case "$1" in
    --tokens) tokens=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    *) echo "usage: $0 [--tokens N] [--ranks P]" >&2; exit 2 ;;
  esac
done

./deploy/install_deps.sh
export PATH="$PATH:/usr/local/cuda/bin"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build --target unshackle -j "$(nproc)"
unshackle=build/tools/unshackle
demo=build/demo
mkdir -p "$demo"

echo
echo "== A ${tokens}-token context with 16 facts planted in its middle (Llama-like GQA head layout)"
"$unshackle" make-case --output "$demo/case.safetensors" --mode esa --p "$tokens" --chunk 1 \
  --heads 8 --kv-heads 2 --head-dim 64 --rank 32 --top-k 64 --eps 1 --l-i 64 --l-l 2048 --needles 16 --seed 7
echo
echo "== ESA, one rank (the CPU reference): compressed scores pick 64 of the middle tokens"
time "$unshackle" attn --input "$demo/case.safetensors" --output "$demo/esa_1rank.safetensors"
echo
echo "== The same step with the KV cache sharded over ${ranks} ranks (SPEC §7): same selection, LSE-merged output"
time "$unshackle" attn --ranks "$ranks" --input "$demo/case.safetensors" --output "$demo/esa_${ranks}ranks.safetensors"
echo
echo "Results are in $demo/ (safetensors: o, selected, evicted). Next: ./tests/run.sh runs the test suite."
