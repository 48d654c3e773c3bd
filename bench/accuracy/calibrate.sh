#!/usr/bin/env bash
# Compression weights for needle-llama used by run_accuracy.py: d' = 8, 16, 32 at w = 256
# (the l_L of the harness), fitted on 24 fresh needle documents (seed 2026, not the
# training or test documents). Usage: bench/accuracy/calibrate.sh BUILD/tools/unshackle
set -euo pipefail
bin=${1:?usage: calibrate.sh PATH/TO/unshackle}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
text=$(mktemp --suffix=.txt)
trap 'rm -f "$text"' EXIT
python3 "$root/tools/train_needle/needle_data.py" --seed 2026 --count 24 --len 512 --write-docs "$text"
for r in 8 16 32; do
  "$bin" calibrate --model "$root/models/needle-llama" --text "$text" --rank $r --w 256 --recall-k 16,64 \
    --out "$here/compression/needle-llama-d$r-w256.safetensors" --report "$here/compression/needle-llama-d$r-w256.md"
done
