#!/usr/bin/env bash
# The at-scale run on one GPU, through the real service (binaries from
# tools/device/build_service_for_device.sh, carried as .device-build/service): a
# Llama-3-8B-shaped random-weight model (made on the GPU machine by transformers,
# tools/hf_parity/hf_bench.py's build(): 32 layers, hidden 4096, 32/8 heads, head dim 128,
# vocab 128256, bf16), random ESA compression weights (d' = --d-prime), and a context as long
# as fits next to the weights with bf16 KV:
#   N = (free GPU memory before the worker starts - weights - --margin-gib) / KV bytes a token
# (K and V: 2 x layers x KV heads x head dim x 2 bytes; k': layers x d' x 2 bytes), rounded
# down to 4096 and capped by --tokens. The worker reserves the whole context up front, so a
# context that does not fit fails at once (500 from the service, the worker log says why).
# Then one job (POST /v1/jobs) of N random token ids and --decode generated tokens, polled
# until it ends, and its own timings:
#   context length, prefill time (and tokens/s), time to first token, decode ms/token (decode
#   time / (tokens - 1)), the peak GPU memory (nvidia-smi each second over the job's life) and
#   the worker's KV gauges (/metrics) when decode starts;
# and with --full-tokens M the same with full attention on an M-token context (full attention
# has the same KV bytes per token; its prefill is quadratic, so M is the longest the time
# limit allows, chosen by whoever runs it).
#   tools/device/run_scale_gpu.sh [--tokens MAX] [--full-tokens M] [--decode N] [--d-prime D]
#                                 [--margin-gib G] [--model DIR] [--layers L] [--backend cuda|cpu]
#                                 [--ranks P] [--build DIR] [--deadline-s S]
# --ranks P: one worker group of P ranks (`mpirun -np P`, one per GPU with --backend cuda; issue
# 14's multi-GPU service run). Every rank holds the weights and 1/P of the context's KV, so the
# context that fits is P times one GPU's (the GPU with the least free memory), less a KV block
# of placement slack per rank; memory is sampled and reported per GPU.
# --model DIR skips making the model (any checkpoint; its compression weights are random).
# --backend cpu with a small --model is the dry run of the flow on a machine without a GPU.
# Writes $OUT/scale_summary.txt (printed last), $OUT/scale_results.json, $OUT/scale_logs.tar.gz.
# Run on one H200 (2026-12-03, docs/benchmarks.md): 897,024 tokens with ESA prefilled in 119 s
# (7,514 tokens/s), so set --tokens to what the call's time allows (P ranks: not yet run).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

max_tokens=1048576 full_tokens=0 decode=32 d_prime=128 margin_gib=8 model="" layers=32 backend=cuda build="" ranks=1
deadline_s=540
while [ $# -gt 0 ]; do
  case "$1" in
    --tokens) max_tokens=$2; shift 2 ;;
    --full-tokens) full_tokens=$2; shift 2 ;;
    --decode) decode=$2; shift 2 ;;
    --d-prime) d_prime=$2; shift 2 ;;
    --margin-gib) margin_gib=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --backend) backend=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --deadline-s) deadline_s=$2; shift 2 ;;
    *) echo "usage: $0 [--tokens MAX] [--full-tokens M] [--decode N] [--d-prime D] [--margin-gib G] [--model DIR] [--layers L] [--backend cuda|cpu] [--ranks P] [--build DIR] [--deadline-s S]" >&2
       exit 2 ;;
  esac
done
case "$backend" in cuda | cpu) ;; *) echo "--backend: cuda or cpu (got '$backend')" >&2; exit 2 ;; esac
case "$ranks" in '' | *[!0-9]* | 0) echo "--ranks: a positive integer (got '$ranks')" >&2; exit 2 ;; esac

out=${OUT:-/tmp/unshackle-scale-out}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/unshackle-scale.XXXXXX")
logs=$work/logs
mkdir -p "$logs"
start_time=$(date +%s)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

declare -a rows=() started=()
failed=0
record() {
  rows+=("$(printf '%-4s  %-26s %s' "$1" "$2" "$3")")
  [ "$1" = FAIL ] && failed=1
  echo "[$1] $2: $3"
}
elapsed() { echo $(($(date +%s) - start_time)); }
budget() {
  local left=$((deadline_s - $(elapsed)))
  [ "$left" -lt 1 ] && left=1
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
stop_pid() {
  kill -0 "$1" 2>/dev/null || return 0
  kill -TERM "$1" 2>/dev/null
  for _ in $(seq 1 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null
}
finish() {
  local i
  for ((i = ${#started[@]} - 1; i >= 0; --i)); do stop_pid "${started[$i]}"; done
  {
    echo "unshackle at scale: backend $backend, $ranks rank(s), model ${model:-(none)}, $(elapsed) s"
    printf '%s\n' "${rows[@]}"
    if [ "$failed" = 0 ]; then echo "RESULT: PASS"; else echo "RESULT: FAIL"; fi
  } >"$out/scale_summary.txt"
  cat "$work"/*.result.json >"$out/scale_results.json" 2>/dev/null
  tar -C "$work" -czf "$out/scale_logs.tar.gz" logs 2>/dev/null
  rm -rf "$work"
  echo
  echo "================ summary (also $out/scale_summary.txt) ================"
  cat "$out/scale_summary.txt"
}
trap finish EXIT
trap 'exit 130' INT TERM

# ---- binaries ----
if [ -n "$build" ]; then
  coordinator_bin=$build/coordinator/unshackle-coordinator
  worker_bin=$build/worker/engine/unshackle-worker
else
  tarball=.device-build/service/service.tar.gz
  [ -f "$tarball" ] || { record FAIL binaries "$tarball is missing (tools/device/build_service_for_device.sh)"; exit 1; }
  mkdir -p "$work/dist"
  tar -C "$work/dist" -xzf "$tarball" || { record FAIL binaries "cannot unpack $tarball"; exit 1; }
  coordinator_bin=$work/dist/bin/unshackle-coordinator
  worker_bin=$work/dist/bin/unshackle-worker
  export LD_LIBRARY_PATH=$work/dist/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
fi
for b in "$coordinator_bin" "$worker_bin"; do
  if [ ! -x "$b" ] || ldd "$b" | grep -q "not found"; then
    record FAIL binaries "$b is missing or has unresolved libraries: $(ldd "$b" 2>&1 | grep 'not found' | tr '\n' ' ')"
    exit 1
  fi
done

# ---- the model and its (random) compression weights ----
if [ -z "$model" ]; then
  model=/tmp/unshackle-llama3-8b-shape
  t0=$(date +%s)
  if ! timeout "$(budget 240)" python3 - "$model" "$layers" >"$logs/make_model.txt" 2>&1 <<'EOF'
import sys
sys.path.insert(0, "tools/hf_parity")
import hf_bench  # noqa: E402  (build(): Llama-3-8B widths on the GPU in bf16, save_pretrained)
hf_bench.build(int(sys.argv[2]), sys.argv[1], 8)
EOF
  then
    record FAIL model "transformers could not build the model: $(tail -c 300 "$logs/make_model.txt" | tr '\n' ' ')"
    exit 1
  fi
  record PASS model "Llama-3-8B-shaped, $layers layers, bf16, made by transformers in $(($(date +%s) - t0)) s"
fi
[ -f "$model/config.json" ] || { record FAIL model "$model/config.json is missing"; exit 1; }
# transformers saves no tokenizer for a random model, and the worker loads one (it serves text
# too); the prompts here are token ids, so a byte tokenizer (ids past its 259 decode to no text)
# is enough.
if [ ! -f "$model/tokenizer.json" ] && [ ! -f "$model/tokenizer.model" ] && [ ! -f "$model/unshackle_tokenizer.json" ]; then
  echo '{"type": "bytes", "specials": ["<s>", "</s>", "<unk>"], "bos_index": 0}' >"$model/unshackle_tokenizer.json"
  record INFO tokenizer "none in $model: wrote a byte tokenizer (the prompts are token ids)"
fi
shape=$(python3 - "$model/config.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
heads = c["num_attention_heads"]
d = c.get("head_dim") or c["hidden_size"] // heads
print(c["num_hidden_layers"], heads, c.get("num_key_value_heads", heads), d, c["vocab_size"])
EOF
)
read -r n_layers n_heads n_kv_heads head_dim vocab <<<"$shape"
compression=$work/compression.safetensors
# Random ESA weights (SPEC §6 layout: layers.{l}.wq [d', H*d], layers.{l}.wk [d', G*d], f32):
# speed does not depend on their values; selection quality does not matter here.
python3 - "$compression" "$n_layers" "$d_prime" "$((n_heads * head_dim))" "$((n_kv_heads * head_dim))" <<'EOF'
import json, random, struct, sys
path, layers, d_c, wq_in, wk_in = sys.argv[1], *map(int, sys.argv[2:])
rng = random.Random(11)
def tensor(rows, cols):
    try:
        import numpy
        return (numpy.random.default_rng(rng.randrange(1 << 30)).standard_normal((rows, cols), dtype=numpy.float32)
                / cols ** 0.5).tobytes()
    except ImportError:
        return struct.pack("<%df" % (rows * cols), *(rng.gauss(0, 1 / cols ** 0.5) for _ in range(rows * cols)))
header, blobs, offset = {"__metadata__": {"d_prime": str(d_c), "method": "random (speed run)"}}, [], 0
for l in range(layers):
    for name, cols in (("wq", wq_in), ("wk", wk_in)):
        blob = tensor(d_c, cols)
        header[f"layers.{l}.{name}"] = {"dtype": "F32", "shape": [d_c, cols], "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
text = json.dumps(header).encode()
text += b" " * (-len(text) % 8)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for blob in blobs:
        f.write(blob)
EOF
[ -s "$compression" ] || { record FAIL compression "could not write random compression weights"; exit 1; }

# ---- how many tokens fit next to the weights ----
weight_bytes=$(du -bc "$model"/*.safetensors | tail -1 | cut -f1)
kv_bytes=$((2 * n_layers * n_kv_heads * head_dim * 2 + n_layers * d_prime * 2))
kv_block=256  # the worker's --kv-block default: a rank may own up to one block more than 1/P
if [ "$backend" = cuda ]; then
  gpus=$(nvidia-smi -L | grep -c '^GPU')
  [ "$gpus" -ge "$ranks" ] || { record FAIL gpu "--ranks $ranks but $gpus GPU(s) visible"; exit 1; }
  # The rank on the GPU with the least free memory bounds every rank's share.
  free_mib=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -n "$ranks" | sort -n | head -1)
  [ -n "$free_mib" ] || { record FAIL gpu "nvidia-smi gave no free memory"; exit 1; }
  per_rank=$(((free_mib * 1048576 - weight_bytes - margin_gib * 1073741824) / kv_bytes - kv_block))
  fit=$((per_rank * ranks / 4096 * 4096))
else
  free_mib=0
  fit=$max_tokens
fi
tokens=$((fit < max_tokens ? fit : max_tokens))
[ "$tokens" -ge 1024 ] || { record FAIL capacity "only $fit tokens would fit (free ${free_mib} MiB, weights $weight_bytes B)"; exit 1; }
record INFO capacity "$ranks rank(s); free ${free_mib} MiB (least of the GPUs), weights $((weight_bytes >> 20)) MiB a rank, KV $kv_bytes B/token at bf16 (d' $d_prime): $fit tokens fit; running $tokens"

# ---- the service ----
api_key=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
export UNSHACKLE_API_KEY=$api_key
# HTTP through tools/device/http_request.py (the GPU machine may have no curl); at most SECONDS in all.
http() {
  local limit=$1
  shift
  timeout "$limit" python3 tools/device/http_request.py --timeout "$limit" "$@"
}
# One job at a time holds the GPU's KV: the larger of the two runs.
capacity=$(( (tokens > full_tokens ? tokens : full_tokens) + decode + 64))
"$coordinator_bin" --port 0 --worker-port 0 --port-file "$work/ports.json" --max-body-bytes 268435456 \
  --attention '{"mode":"esa"}' --step-timeout-s 3600 --max-queued 4 >"$logs/coordinator.log" 2>&1 &
started+=("$!")
for _ in $(seq 1 200); do [ -s "$work/ports.json" ] && break; sleep 0.1; done
[ -s "$work/ports.json" ] || { record FAIL coordinator "no ports file within 20 s"; exit 1; }
url=http://127.0.0.1:$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"])' "$work/ports.json")
worker_port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["worker"])' "$work/ports.json")
t0=$(date +%s)
mpirun_flags=(--np "$ranks" --bind-to none --mca btl "self,tcp" --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo
              -x NCCL_NVLS_ENABLE)
[ "$(id -u)" = 0 ] && mpirun_flags+=(--allow-run-as-root)
[ -n "${LD_LIBRARY_PATH:-}" ] && mpirun_flags+=(-x LD_LIBRARY_PATH)
[ "$backend" = cpu ] && mpirun_flags+=(--oversubscribe)  # the dry run may have fewer cores than ranks
mpirun "${mpirun_flags[@]}" "$worker_bin" --model "$model" \
  --coordinator "127.0.0.1:$worker_port" --group scale --backend "$backend" --compression "$compression" \
  --max-context-tokens "$capacity" --kv-capacity-tokens "$capacity" >"$logs/worker.log" 2>&1 &
worker_pid=$!
started+=("$worker_pid")
ready=0
ready_by=$(($(date +%s) + $(budget 300)))
while [ "$(date +%s)" -lt "$ready_by" ]; do
  if http 2 "$url/ready" >/dev/null 2>&1; then ready=1; break; fi
  kill -0 "$worker_pid" 2>/dev/null || break
  sleep 0.5
done
[ "$ready" = 1 ] || { record FAIL ready "no ready group: $(tail -n 3 "$logs/worker.log" | tr '\n' ' ')"; exit 1; }
record PASS ready "model loaded and health step passed in $(($(date +%s) - t0)) s: $(grep -m1 'unshackle-worker: group' "$logs/worker.log" | sed 's/.*model //')"

# run_job NAME TOKENS ATTENTION_JSON: one job (POST /v1/jobs) of TOKENS random prompt ids and
# --decode generated tokens, polled until it ends; its own timings are the result. (A stored
# context would be forked by each completion on it: a copy of its KV, twice the memory.)
run_job() {
  local name=$1 n=$2 attention=$3 job status="" t0 seen_decode=0
  python3 - "$n" "$attention" "$vocab" "$decode" >"$work/$name.request.json" <<'EOF'
import json, random, sys
n, attention, vocab, decode = int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(5)
low = min(1000, vocab // 4)
print(json.dumps({"prompt": [rng.randrange(low, vocab) for _ in range(n)], "max_tokens": decode,
                  "temperature": 0, "attention": attention}))
EOF
  t0=$(date +%s)
  # GPU memory in use, sampled every second for the job's whole life (the peak is reported:
  # decode may last under a second, too short for one poll to see it).
  ( while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n "$ranks" |
      paste -sd, -; sleep 1; done ) >"$logs/${name}_gpu_memory_samples.txt" &
  local sampler=$!
  started+=("$sampler")
  job=$(http 120 "$url/v1/jobs" --data "$work/$name.request.json" | tee "$logs/${name}_job_create.json" |
    python3 -c 'import json,sys; print(json.load(sys.stdin).get("id", ""))' 2>/dev/null)
  [ -n "$job" ] || { record FAIL "job_$name" "POST /v1/jobs: $(head -c 300 "$logs/${name}_job_create.json")"; return 1; }
  while [ "$(elapsed)" -lt "$deadline_s" ]; do
    http 10 "$url/v1/jobs/$job" >"$work/$name.result.json" 2>/dev/null
    status=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("status", ""))' "$work/$name.result.json" 2>/dev/null)
    if [ "$status" = decode ] && [ "$seen_decode" = 0 ]; then
      seen_decode=1
      http 10 "$url/metrics" 2>/dev/null | grep -E '^unshackle_worker_kv_(bytes|tokens)' >"$logs/${name}_kv_gauges.txt"
      record INFO "prefill_done_$name" "$n tokens prefilled after $(($(date +%s) - t0)) s (client clock)"
    fi
    case "$status" in completed | failed | cancelled) break ;; esac
    kill -0 "$worker_pid" 2>/dev/null || break
    sleep 1
  done
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  cp "$work/$name.result.json" "$logs/${name}_job.json"
  local line
  line=$(python3 - "$work/$name.result.json" "$n" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1]))
t, p = job.get("timings") or {}, job.get("progress") or {}
generated = p.get("generated_tokens") or 0
def sec(key):
    return "-" if t.get(key) is None else "%.2f s" % t[key]
decode = t.get("decode_seconds")
ms = "-" if decode is None or generated < 2 else "%.2f" % (1000 * decode / (generated - 1))
prefill = t.get("prefill_seconds")
rate = "-" if not prefill else "%.0f" % (int(sys.argv[2]) / prefill)
print("%s: context %s tokens, prefill %s (%s tokens/s), time to first token %s, decode %s ms/token over %d tokens%s" % (
    job.get("status"), sys.argv[2], sec("prefill_seconds"), rate, sec("time_to_first_token_seconds"), ms, generated,
    "" if not job.get("error") else ", error: %s" % job["error"]))
EOF
)
  local peak total
  # Per GPU: the largest sample of each column ("a, b MiB" for two GPUs).
  peak=$(awk -F, '{for (i = 1; i <= NF; ++i) if ($i + 0 > m[i]) m[i] = $i + 0; if (NF > n) n = NF}
                  END {for (i = 1; i <= n; ++i) printf "%s%d", (i > 1 ? ", " : ""), m[i]}' \
           "$logs/${name}_gpu_memory_samples.txt" 2>/dev/null)
  total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  [ -n "$peak" ] && line="$line; GPU memory peak ${peak} MiB of ${total} MiB per GPU (nvidia-smi each second)"
  [ -s "$logs/${name}_kv_gauges.txt" ] && line="$line; at decode: $(tr '\n' ' ' <"$logs/${name}_kv_gauges.txt")"
  if [ "$status" = completed ]; then record PASS "job_$name" "$line"; else record FAIL "job_$name" "$line"; fi
}

run_job esa "$tokens" '{"mode":"esa"}'
if [ "$full_tokens" -gt 0 ]; then
  run_job full "$full_tokens" '{"mode":"full"}'
fi
http 10 "$url/metrics" >"$logs/metrics.txt" 2>/dev/null
[ "$failed" = 0 ]
