#!/usr/bin/env bash
# Parity of the model runtime with transformers, for the GPU machine (PyTorch + transformers,
# no internet needed). Builds the checkpoints and references (make_models.py), runs our
# `unshackle generate` on each (CPU, full attention, greedy, 32 tokens, prompt as ids),
# and compares (compare.py). Exit 0 only if every comparison passes.
#   UNSHACKLE=build/tools/unshackle  OUT=/tmp/hf_parity  ONLY="llama2 qwen2"  RANKS=1  CHUNK=16
#   tools/hf_parity/run_parity.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
unshackle=${UNSHACKLE:-$here/../../build/tools/unshackle}
out=${OUT:-/tmp/hf_parity}
steps=${STEPS:-32}
ranks=${RANKS:-1}
chunk=${CHUNK:-16}   # several prefill chunks: chunked prefill is part of what is checked
[[ -x $unshackle ]] || { echo "no unshackle binary at $unshackle (set UNSHACKLE)" >&2; exit 2; }

# shellcheck disable=SC2086  # ONLY is a list of words on purpose
python3 "$here/make_models.py" --out "$out" --steps "$steps" ${ONLY:+--only $ONLY}

status=0
for case_dir in "$out"/*/; do
  name=$(basename "$case_dir")
  for dtype in fp32 bf16; do
    model="$case_dir$dtype"
    [[ -f $model/config.json ]] || continue
    ours="$model/ours.safetensors"
    start=$SECONDS
    if ! "$unshackle" generate --model "$model" --prompt-ids "$(cat "$model/prompt.txt")" --mode full \
        --max-tokens "$steps" --temperature 0 --ignore-eos --chunk "$chunk" --ranks "$ranks" \
        --logits-out "$ours" --json > "$model/ours.json"; then
      echo "$name/$dtype: unshackle generate failed"; status=1; continue
    fi
    echo "$name/$dtype: unshackle generate took $((SECONDS - start)) s"
    for ref in "$model"/reference_*.safetensors; do
      kind=$(basename "$ref" .safetensors); kind=${kind#reference_}
      python3 "$here/compare.py" --ours "$ours" --reference "$ref" --kind "$kind" --label "$name/$dtype" || status=1
    done
  done
done
echo "parity: $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
