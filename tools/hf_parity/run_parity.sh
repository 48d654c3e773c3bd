#!/usr/bin/env bash
# Parity of the model runtime with transformers, for the GPU machine (PyTorch + transformers,
# no internet needed). Builds the checkpoints and references (make_models.py), runs our
# `unshackle generate` on each (full attention, greedy, 32 tokens, prompt as ids) with every
# backend of BACKENDS, and compares (compare.py):
#   cpu:  against fp32 (fp32 weights), bf16w (bf16 weights, fp32 compute) and bf16 references;
#   cuda: against fp32 and bf16 (its GEMM inputs are bf16 with bf16 weights, as transformers'
#         bf16 run), and against our cpu run of the same checkpoint.
# Exit 0 only if every comparison passes.
#   UNSHACKLE=build/tools/unshackle  OUT=/tmp/hf_parity  ONLY="llama2 qwen2"  RANKS=1  CHUNK=16
#   BACKENDS="cpu cuda"  CPU_SKIP="llama3-8b-2l"  SKIP_MAKE=1  tools/hf_parity/run_parity.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
unshackle=${UNSHACKLE:-$here/../../build/tools/unshackle}
out=${OUT:-/tmp/hf_parity}
steps=${STEPS:-32}
ranks=${RANKS:-1}
chunk=${CHUNK:-16}   # several prefill chunks: chunked prefill is part of what is checked
backends=${BACKENDS:-cpu}
cpu_skip=" ${CPU_SKIP:-} "
[[ -x $unshackle ]] || { echo "no unshackle binary at $unshackle (set UNSHACKLE)" >&2; exit 2; }

# shellcheck disable=SC2086  # ONLY is a list of words on purpose
[[ -n ${SKIP_MAKE:-} ]] || python3 "$here/make_models.py" --out "$out" --steps "$steps" ${ONLY:+--only $ONLY}

status=0
for case_dir in "$out"/*/; do
  name=$(basename "$case_dir")
  for dtype in fp32 bf16; do
    model="$case_dir$dtype"
    [[ -f $model/config.json ]] || continue
    for backend in $backends; do
      if [[ $backend == cpu && $cpu_skip == *" $name "* ]]; then
        echo "$name/$dtype/cpu: skipped (CPU_SKIP)"; continue
      fi
      ours="$model/ours_$backend.safetensors"
      start=$SECONDS
      if ! "$unshackle" generate --model "$model" --prompt-ids "$(cat "$model/prompt.txt")" --mode full \
          --max-tokens "$steps" --temperature 0 --ignore-eos --chunk "$chunk" --ranks "$ranks" --backend "$backend" \
          --logits-out "$ours" --json > "$model/ours_$backend.json"; then
        echo "$name/$dtype/$backend: unshackle generate failed"; status=1; continue
      fi
      echo "$name/$dtype/$backend: unshackle generate took $((SECONDS - start)) s"
      for ref in "$model"/reference_*.safetensors; do
        kind=$(basename "$ref" .safetensors); kind=${kind#reference_}
        [[ $backend == cuda && $kind == bf16w ]] && continue
        python3 "$here/compare.py" --ours "$ours" --reference "$ref" --kind "$kind" --label "$name/$dtype/$backend" || status=1
      done
      if [[ $backend == cuda && -f $model/ours_cpu.safetensors ]]; then
        kind=$([[ $dtype == fp32 ]] && echo fp32 || echo bf16)
        python3 "$here/compare.py" --ours "$ours" --reference "$model/ours_cpu.safetensors" --kind "$kind" \
          --label "$name/$dtype/cuda-vs-cpu" || status=1
      fi
    done
  done
done
echo "parity: $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
