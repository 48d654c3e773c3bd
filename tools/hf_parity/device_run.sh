#!/usr/bin/env bash
# Everything the model runtime checks and measures on the GPU machine, in one command (each
# step under its own time limit, logs under $OUT):
#   1. model_cuda_test: the CUDA model against the CPU model (gtest)
#   2. HF parity of the small checkpoints of every architecture, cpu and cuda backends
#   3. performance: transformers on a Llama-3-8B-shaped bf16 random model (hf_bench.py, which
#      also saves it), then bench_model on the same checkpoint with --backend cuda
#   4. HF parity of the Llama-3-8B-widths 2-layer checkpoint (cuda backend)
#   BIN=dir-with-unshackle,model_cuda_test,bench_model  OUT=...  LAYERS=32  STEPS="1 2 3 4"
#   tools/hf_parity/device_run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
bin=$(cd "${BIN:-build-model-carry}" && pwd)
out=${OUT:?set OUT}
steps=" ${STEPS:-1 2 3 4} "
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=$bin/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}  # lib/: libsentencepiece carried along
date -u; nvidia-smi -L; git log --oneline -1 2>/dev/null
ldd "$bin/unshackle" | grep -E "not found|cublas|sentencepiece" || true
status=0
step() { [[ $steps == *" $1 "* ]]; }
if step 1; then
  timeout 45 "$bin/model_cuda_test" 2>&1 | tee "$out/model_cuda_test.txt" || status=1
fi
if step 2; then
  ONLY="llama2 llama2-linear llama3 mistral qwen2 qwen2-tied" OUT=/tmp/hf_parity UNSHACKLE="$bin/unshackle" \
    BACKENDS="cpu cuda" timeout 90 tools/hf_parity/run_parity.sh 2>&1 | tee "$out/parity_small.txt" || status=1
fi
if step 3; then
  timeout 110 python3 tools/hf_parity/hf_bench.py --out /tmp/llama3_8b_shape --layers "${LAYERS:-32}" --prompt 512 2048 \
    --decode 32 --repeats 3 2>&1 | grep -v Warning | tee "$out/bench_transformers.txt" || status=1
  timeout 100 "$bin/bench_model" --model /tmp/llama3_8b_shape --backend cuda --prompt 512 2048 --chunk 512 \
    --decode 32 --repeats 3 2>&1 | tee "$out/bench_unshackle_cuda.txt" || status=1
  rm -rf /tmp/llama3_8b_shape
fi
if step 4; then
  ONLY="llama3-8b-2l" OUT=/tmp/hf_parity_8b UNSHACKLE="$bin/unshackle" BACKENDS="cuda" \
    timeout 100 tools/hf_parity/run_parity.sh 2>&1 | tee "$out/parity_llama3_8b_2l.txt" || status=1
fi
date -u
echo "device_run: $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
