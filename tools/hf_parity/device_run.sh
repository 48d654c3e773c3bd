#!/usr/bin/env bash
# Everything the model runtime checks and measures on the GPU machine, in one command (each
# step under its own time limit, logs under $OUT):
#   1. model_cuda_test: the CUDA model against the CPU model (gtest)
#   2. HF parity of the small checkpoints of every architecture, cpu and cuda backends
#   3. performance: transformers on a Llama-3-8B-shaped bf16 random model (hf_bench.py, which
#      also saves it), then bench_model on the same checkpoint with --backend cuda, with and
#      without programmatic dependent launch (UNS_CUDA_NO_PDL=1)
#   4. HF parity of the Llama-3-8B-widths 2-layer checkpoint (cuda backend)
#   5. where a decode token goes: a 4-layer model of the same widths, its decode timed, then
#      one decode step kernel by kernel under ncu (bench/model/ncu_decode_profile.py)
#   BIN=dir-with-unshackle,model_cuda_test,bench_model  OUT=...  LAYERS=32  STEPS="1 2 3 4" (5: on request)
#   tools/hf_parity/device_run.sh
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
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
  # The same without programmatic dependent launch: its share of decode, in the same call.
  UNS_CUDA_NO_PDL=1 timeout 100 "$bin/bench_model" --model /tmp/llama3_8b_shape --backend cuda --prompt 512 2048 \
    --chunk 512 --decode 32 --repeats 3 2>&1 | tee "$out/bench_unshackle_cuda_nopdl.txt" || status=1
  rm -rf /tmp/llama3_8b_shape
fi
if step 4; then
  ONLY="llama3-8b-2l" OUT=/tmp/hf_parity_8b UNSHACKLE="$bin/unshackle" BACKENDS="cuda" \
    timeout 100 tools/hf_parity/run_parity.sh 2>&1 | tee "$out/parity_llama3_8b_2l.txt" || status=1
fi
if step 5; then
  # Weights one layer reads at bf16: 2 x (q|k|v + o + gate|up + down) of Llama-3-8B's widths.
  layer_bytes=$(( 2 * (4096 * 6144 + 4096 * 4096 + 4096 * 28672 + 14336 * 4096) ))
  timeout 60 python3 tools/hf_parity/hf_bench.py --out /tmp/llama3_8b_shape_4l --layers 4 --prompt 512 --decode 4 \
    --repeats 1 >"$out/profile_transformers_4l.txt" 2>&1 || status=1
  timeout 60 "$bin/bench_model" --model /tmp/llama3_8b_shape_4l --backend cuda --prompt 512 --chunk 512 --decode 32 \
    --repeats 3 2>&1 | tee "$out/profile_bench_4l.txt" || status=1
  timeout 240 ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    "$bin/bench_model" --model /tmp/llama3_8b_shape_4l --backend cuda --prompt 64 --chunk 64 --decode 4 --repeats 1 \
    >"$out/profile_ncu.csv" 2>"$out/profile_ncu.err" || status=1
  # The anchor, same call: a 1 GiB device-to-device copy (bytes read + written / time, as
  # bench_kernels counts it). If torch cannot measure it, CEILING_GBS (default: the H200's
  # 4253 GB/s of 2026-12-03, docs/benchmarks.md) stands in, and the output says so.
  ceiling=$(timeout 60 python3 - <<'EOF' 2>>"$out/profile_ncu.err"
import torch
x = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(20):
    y.copy_(x)
end.record()
torch.cuda.synchronize()
print(round(2 * x.numel() * x.element_size() / (start.elapsed_time(end) / 20) / 1e6))
EOF
)
  if [ -z "$ceiling" ]; then
    ceiling=${CEILING_GBS:-4253}
    echo "copy ceiling NOT measured in this call: using $ceiling GB/s" | tee "$out/profile.txt"
  else
    echo "copy ceiling (1 GiB D2D, this call): $ceiling GB/s" | tee "$out/profile.txt"
  fi
  python3 bench/model/ncu_decode_profile.py "$out/profile_ncu.csv" --layers 4 --layer-bytes "$layer_bytes" \
    --ceiling-gbs "$ceiling" | tee -a "$out/profile.txt" || status=1
  rm -rf /tmp/llama3_8b_shape_4l
fi
date -u
echo "device_run: $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
