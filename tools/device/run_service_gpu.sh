#!/usr/bin/env bash
# The real service on the GPU machine, checked end to end. Run from the repository root there,
# with .device-build/service carried (tools/device/build_service_for_device.sh builds it here):
#   1. a coordinator and `mpirun -np 1 unshackle-worker --backend cuda` (as deploy/demo_service.sh
#      starts them), serving models/needle-llama with ESA and its compression weights;
#   2. needle-llama's haystack (deploy/demo_haystack.py) through `unshackle submit`;
#   3. the same haystack + question as one prompt through the HTTP API, POST /v1/completions,
#      once plain and once as an SSE stream: both must equal `unshackle generate --backend cuda`
#      on that prompt (same attention, chunks and greedy decoding);
#   4. /metrics scraped; the group's jobs and their timings listed;
#   5. the same submit on a group of CPU ranks: its answer must equal the GPU's.
# Everything lands under $OUT (at most 8 files come back from the device): summary.txt (the
# PASS/FAIL table, also printed last), metrics_<group>.txt, results.json and logs.tar.gz (every
# log, request and response). Exit status 0 when every check passed.
#   tools/device/run_service_gpu.sh [--backend cuda|cpu] [--tokens N] [--max-tokens N]
#                                   [--cpu-ranks N] [--no-cpu-group] [--build DIR] [--deadline-s S]
# --backend cpu is the dry run for a machine without a GPU (both groups on CPU ranks); --build
# DIR takes the binaries from a local build tree instead of the carried tarball.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

backend=cuda tokens=16000 max_tokens=8 cpu_ranks=2 cpu_group=1 build="" deadline_s=420
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) backend=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --max-tokens) max_tokens=$2; shift 2 ;;
    --cpu-ranks) cpu_ranks=$2; shift 2 ;;
    --no-cpu-group) cpu_group=0; shift ;;
    --build) build=$2; shift 2 ;;
    --deadline-s) deadline_s=$2; shift 2 ;;
    *) echo "usage: $0 [--backend cuda|cpu] [--tokens N] [--max-tokens N] [--cpu-ranks N] [--no-cpu-group] [--build DIR] [--deadline-s S]" >&2
       exit 2 ;;
  esac
done
case "$backend" in cuda | cpu) ;; *) echo "--backend: cuda or cpu (got '$backend')" >&2; exit 2 ;; esac

out=${OUT:-/tmp/unshackle-service-out}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/unshackle-service.XXXXXX")
logs=$work/logs
mkdir -p "$logs"
start_time=$(date +%s)
model=models/needle-llama
compression=$model/compression.safetensors
attention='{"mode":"esa","top_k":64,"l_I":32,"l_L":256}'
generate_attention=(--mode esa --top-k 64 --l-i 32 --l-l 256 --compression "$compression")
chunk=512

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# ---- results: one line per check, the table printed last ----
declare -a rows=()
failed=0
record() {  # record PASS|FAIL|INFO NAME DETAIL
  rows+=("$(printf '%-4s  %-34s %s' "$1" "$2" "$3")")
  [ "$1" = FAIL ] && failed=1
  echo "[$1] $2: $3"
}
say() { echo "== $*"; }
show() { head -c 200 "$1" 2>/dev/null | sed -z 's/\n/\\n/g'; }  # a file's text on one line
elapsed() { echo $(($(date +%s) - start_time)); }
# Seconds a step may take: at most $1, and never past the deadline (at least 1).
budget() {
  local left=$((deadline_s - $(elapsed)))
  [ "$left" -lt 1 ] && left=1
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
over_deadline() { [ "$(elapsed)" -ge "$deadline_s" ]; }

declare -a started=()  # pids this script started (only these are stopped)
stop_pid() {
  local pid=$1
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "pid $pid did not stop within 20 s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null
}
finish() {
  local pid i
  for ((i = ${#started[@]} - 1; i >= 0; --i)); do stop_pid "${started[$i]}"; done
  {
    echo "unshackle service on the GPU machine: backend $backend, $tokens-token haystack, $(elapsed) s"
    printf '%s\n' "${rows[@]}"
    if [ "$failed" = 0 ]; then echo "RESULT: PASS"; else echo "RESULT: FAIL"; fi
  } >"$out/summary.txt"
  python3 - "$work" "$out/results.json" <<'EOF' 2>/dev/null || true
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
results = {}
for f in sorted(work.glob("*.result.json")):
    try:
        results[f.name[: -len(".result.json")]] = json.loads(f.read_text())
    except ValueError:
        pass
pathlib.Path(sys.argv[2]).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
EOF
  cp "$work"/metrics_*.txt "$out/" 2>/dev/null
  tar -C "$work" -czf "$out/logs.tar.gz" logs 2>/dev/null
  rm -rf "$work"
  echo
  echo "================ summary (also $out/summary.txt) ================"
  cat "$out/summary.txt"
}
trap finish EXIT
trap 'exit 130' INT TERM

# ---- binaries and their libraries ----
if [ -n "$build" ]; then
  coordinator_bin=$build/coordinator/unshackle-coordinator
  worker_bin=$build/worker/engine/unshackle-worker
  cli_bin=$build/tools/unshackle
else
  tarball=.device-build/service/service.tar.gz
  if [ ! -f "$tarball" ]; then
    record FAIL binaries "$tarball is missing: build it with tools/device/build_service_for_device.sh and carry .device-build/service"
    exit 1
  fi
  mkdir -p "$work/dist"
  tar -C "$work/dist" -xzf "$tarball" || { record FAIL binaries "cannot unpack $tarball"; exit 1; }
  cp "$work/dist/MANIFEST.txt" "$logs/"
  coordinator_bin=$work/dist/bin/unshackle-coordinator
  worker_bin=$work/dist/bin/unshackle-worker
  cli_bin=$work/dist/bin/unshackle
  export LD_LIBRARY_PATH=$work/dist/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
fi
missing_libs() { for b in "$coordinator_bin" "$worker_bin" "$cli_bin"; do ldd "$b" 2>&1 | grep "not found"; done; }
if [ -n "$(missing_libs)" ] && command -v mpirun >/dev/null; then
  # The device's own OpenMPI may live outside the loader's default path (next to its mpirun).
  mpi_lib=$(cd "$(dirname "$(readlink -f "$(command -v mpirun)")")/../lib" 2>/dev/null && pwd)
  [ -n "$mpi_lib" ] && export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$mpi_lib
fi
for b in "$coordinator_bin" "$worker_bin" "$cli_bin"; do
  [ -x "$b" ] || { record FAIL binaries "$b is missing"; exit 1; }
done
if [ -n "$(missing_libs)" ]; then
  record FAIL libraries "unresolved: $(missing_libs | awk '{print $1}' | sort -u | tr '\n' ' ')(LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
  exit 1
fi
record PASS libraries "every library of the three binaries resolves"
for b in "$coordinator_bin" "$worker_bin" "$cli_bin"; do ldd "$b" >"$logs/ldd_$(basename "$b").txt" 2>&1; done

{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv; date -u; uname -a
  command -v mpirun && mpirun --version | head -1; } >"$logs/device.txt" 2>&1
if [ "$backend" = cuda ]; then
  if ! nvidia-smi -L >/dev/null 2>&1; then
    record FAIL gpu "nvidia-smi sees no GPU (use --backend cpu for the dry run)"
    exit 1
  fi
  record PASS gpu "$(nvidia-smi -L | head -1 | cut -c1-60)"
fi
if [ ! -f "$model/config.json" ] || [ ! -f "$compression" ]; then
  record FAIL model "$model or its compression weights are missing"
  exit 1
fi

# ---- the job: needle-llama's haystack, its question, and both as one prompt ----
python3 deploy/demo_haystack.py --tokens "$tokens" --dir "$work" >"$logs/demo_haystack.log" 2>&1 || {
  record FAIL haystack "deploy/demo_haystack.py failed (see logs/demo_haystack.log)"
  exit 1
}
cat "$work/haystack.txt" "$work/question.txt" >"$work/prompt.txt"
cp "$work/question.txt" "$work/answer.txt" "$logs/"
expected_code=$(tr -d ' .\n' <"$work/answer.txt")
api_key=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
export UNSHACKLE_API_KEY=$api_key
# HTTP through tools/device/http_request.py (Python's urllib: the GPU machine may have no curl), the
# key from UNSHACKLE_API_KEY; http SECONDS URL [its options]: at most SECONDS in all.
http() {
  local limit=$1
  shift
  timeout "$limit" python3 tools/device/http_request.py --timeout "$limit" "$@"
}

# JSON body of a completion over prompt.txt: greedy, max_tokens, stream or not.
completion_body() {
  python3 -c 'import json, sys
print(json.dumps({"prompt": open(sys.argv[1], encoding="utf-8").read(), "max_tokens": int(sys.argv[2]),
                  "temperature": 0, "stream": sys.argv[3] == "1"}))' "$work/prompt.txt" "$max_tokens" "$1"
}

# ---- one worker group behind its own coordinator ----
url=""
group_pids=()
start_group() {  # start_group LABEL BACKEND RANKS
  local label=$1 group_backend=$2 ranks=$3 group_start
  group_start=$(date +%s)
  url=""
  rm -f "$work/$label.ports.json"
  "$coordinator_bin" --port 0 --worker-port 0 --port-file "$work/$label.ports.json" --attention "$attention" \
    --prefill-chunk "$chunk" >"$logs/coordinator_$label.log" 2>&1 &
  local coordinator_pid=$!
  started+=("$coordinator_pid")
  for _ in $(seq 1 200); do [ -s "$work/$label.ports.json" ] && break; sleep 0.1; done
  if [ ! -s "$work/$label.ports.json" ]; then
    record FAIL "ready_$label" "the coordinator did not write its ports within 20 s (logs/coordinator_$label.log)"
    return 1
  fi
  local http_port worker_port
  http_port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"])' "$work/$label.ports.json")
  worker_port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["worker"])' "$work/$label.ports.json")
  # As deploy/demo_service.sh: MPI over loopback TCP, ranks not pinned.
  local mpirun_flags=(--np "$ranks" --oversubscribe --bind-to none --mca btl "self,tcp" --mca btl_tcp_if_include lo
                      --mca oob_tcp_if_include lo -x NCCL_NVLS_ENABLE)
  [ -n "${LD_LIBRARY_PATH:-}" ] && mpirun_flags+=(-x LD_LIBRARY_PATH)
  [ "$(id -u)" = 0 ] && mpirun_flags+=(--allow-run-as-root)
  mpirun "${mpirun_flags[@]}" "$worker_bin" --model "$model" --coordinator "127.0.0.1:$worker_port" --group "$label" \
    --backend "$group_backend" --compression "$compression" --chunk "$chunk" \
    --max-context-tokens "$((tokens + max_tokens + 1024))" >"$logs/worker_$label.log" 2>&1 &
  local worker_pid=$!
  started+=("$worker_pid")
  group_pids=("$worker_pid" "$coordinator_pid")
  local base=http://127.0.0.1:$http_port limit
  limit=$(budget 180)
  local ready_by=$(($(date +%s) + limit))
  while [ "$(date +%s)" -lt "$ready_by" ]; do
    http 2 "$base/ready" >/dev/null 2>&1 && { url=$base; break; }
    if ! kill -0 "$worker_pid" 2>/dev/null; then
      record FAIL "ready_$label" "the worker group exited before it was ready: $(tail -n 2 "$logs/worker_$label.log" | tr '\n' ' ')"
      return 1
    fi
    sleep 0.2
  done
  if [ -z "$url" ]; then
    record FAIL "ready_$label" "no ready group after ${limit} s (logs/worker_$label.log)"
    return 1
  fi
  local line
  line=$(grep -m1 "unshackle-worker: group" "$logs/worker_$label.log")
  record PASS "ready_$label" "$ranks rank(s) ready in $(($(date +%s) - group_start)) s: ${line#*model }"
  if [ "$group_backend" = cuda ]; then
    if grep -q "backend cuda, KV BF16" <<<"$line"; then
      record PASS "worker_on_gpu_$label" "the worker reports backend cuda with bf16 KV"
    else
      record FAIL "worker_on_gpu_$label" "the worker's start line does not say 'backend cuda, KV BF16': $line"
    fi
  fi
}
stop_group() {
  local pid
  for pid in "${group_pids[@]}"; do stop_pid "$pid"; done
  group_pids=()
}

# `unshackle submit` of the haystack and the question: the answer text, in $work/submit_LABEL.txt.
submit_job() {  # submit_job LABEL
  local label=$1 status t0
  t0=$(date +%s)
  timeout "$(budget 240)" "$cli_bin" submit --url "$url" --file "$work/haystack.txt" \
    --question "$(cat "$work/question.txt")" --max-tokens "$max_tokens" \
    >"$work/submit_$label.txt" 2>"$logs/submit_$label.stderr"
  status=$?
  cp "$work/submit_$label.txt" "$logs/"
  local answer
  answer=$(show "$work/submit_$label.txt")
  if [ "$status" = 0 ] && [ -n "$answer" ]; then
    record PASS "submit_$label" "answer '$answer' ($(($(date +%s) - t0)) s)"
  else
    record FAIL "submit_$label" "exit $status, answer '$answer' (logs/submit_$label.stderr: $(tail -c 200 "$logs/submit_$label.stderr" | tr '\n' ' '))"
    return 1
  fi
  if [[ "$answer" == *"$expected_code"* ]]; then
    record INFO "code_in_answer_$label" "the answer holds the planted code $expected_code"
  else
    record INFO "code_in_answer_$label" "the planted code $expected_code is not in the answer (a model property, not a service check)"
  fi
}

# POST /v1/completions over prompt.txt, plain (1) or streamed (2): text in $work/LABEL_NAME.text.
complete() {  # complete LABEL NAME STREAM(0|1)
  local label=$1 name=$2 stream=$3 status t0
  t0=$(date +%s)
  completion_body "$stream" >"$work/body_$stream.json"
  status=$(http "$(budget 240)" "$url/v1/completions" --data "$work/body_$stream.json" \
    --out "$logs/${label}_$name.response" 2>"$logs/${label}_$name.http_error")
  python3 - "$logs/${label}_$name.response" "$stream" "$work/${label}_$name.text" "$work/${label}_$name.result.json" <<'EOF'
import json, sys
raw, stream, text_path, result_path = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
body = open(raw, encoding="utf-8", errors="replace").read()
result = {"text": None, "finish_reason": None, "error": None, "done": None, "usage": None}
try:
    if stream:
        text, done = "", False
        for line in body.splitlines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                continue
            event = json.loads(payload)
            if "error" in event:
                result["error"] = event["error"]
                continue
            for choice in event.get("choices", []):
                text += choice.get("text", "")
                result["finish_reason"] = choice.get("finish_reason") or result["finish_reason"]
            result["usage"] = event.get("usage") or result["usage"]
        result["text"], result["done"] = text, done
    else:
        reply = json.loads(body)
        if "error" in reply:
            result["error"] = reply["error"]
        else:
            result["text"] = reply["choices"][0]["text"]
            result["finish_reason"] = reply["choices"][0]["finish_reason"]
            result["usage"] = reply.get("usage")
except (ValueError, KeyError, IndexError) as e:
    result["error"] = f"unreadable response: {e}"
open(result_path, "w").write(json.dumps(result) + "\n")
if result["text"] is not None:
    open(text_path, "w", encoding="utf-8").write(result["text"])
EOF
  if [ "$status" != 200 ] || [ ! -f "$work/${label}_$name.text" ]; then
    record FAIL "${name}_$label" "HTTP ${status:-none}: $(head -c 300 "$logs/${label}_$name.response" 2>/dev/null | tr '\n' ' ')$(head -c 200 "$logs/${label}_$name.http_error" | tr '\n' ' ')"
    return 1
  fi
  record PASS "${name}_$label" "HTTP 200, '$(show "$work/${label}_$name.text")' ($(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["finish_reason"])' "$work/${label}_$name.result.json"), $(($(date +%s) - t0)) s)"
}

# `unshackle generate` on prompt.txt with the group's settings: text in $work/generate_BACKEND.text.
generate_reference() {  # generate_reference BACKEND
  local gen_backend=$1
  [ -f "$work/generate_$gen_backend.text" ] && return 0
  local t0
  t0=$(date +%s)
  timeout "$(budget 240)" "$cli_bin" generate --model "$model" "${generate_attention[@]}" --prompt-file "$work/prompt.txt" \
    --max-tokens "$max_tokens" --chunk "$chunk" --backend "$gen_backend" --json \
    >"$logs/generate_$gen_backend.json" 2>"$logs/generate_$gen_backend.stderr"
  local status=$?
  python3 - "$logs/generate_$gen_backend.json" "$work/generate_$gen_backend.text" "$work/generate_$gen_backend.result.json" <<'EOF'
import json, sys
try:
    lines = [l for l in open(sys.argv[1], encoding="utf-8").read().splitlines() if l.startswith("{")]
    result = json.loads(lines[-1])
except (ValueError, IndexError):
    sys.exit(0)
result.pop("prompt_tokens", None)
open(sys.argv[3], "w").write(json.dumps(result) + "\n")
open(sys.argv[2], "w", encoding="utf-8").write(result["text"])
EOF
  if [ "$status" != 0 ] || [ ! -f "$work/generate_$gen_backend.text" ]; then
    record FAIL "generate_$gen_backend" "exit $status: $(tail -c 300 "$logs/generate_$gen_backend.stderr" | tr '\n' ' ')"
    return 1
  fi
  record PASS "generate_$gen_backend" "'$(show "$work/generate_$gen_backend.text")' ($(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["finish_reason"])' "$work/generate_$gen_backend.result.json"), $(($(date +%s) - t0)) s)"
}

same_text() {  # same_text NAME FILE_A FILE_B WHAT
  if [ -f "$2" ] && [ -f "$3" ] && cmp -s "$2" "$3"; then
    record PASS "$1" "$4: '$(show "$2")'"
  else
    record FAIL "$1" "$4 differ: '$(show "$2")' vs '$(show "$3")'"
  fi
}

scrape_metrics() {  # scrape_metrics LABEL
  local label=$1
  if ! http 10 "$url/metrics" >"$work/metrics_$label.txt"; then
    record FAIL "metrics_$label" "GET /metrics failed"
    return 1
  fi
  local missing=() series
  for series in "unshackle_worker_group_up{group=\"$label\"} 1" unshackle_prompt_tokens_total unshackle_generation_tokens_total \
                unshackle_request_finished_total unshackle_worker_kv_bytes unshackle_time_to_first_token_seconds_count; do
    grep -qF -- "$series" "$work/metrics_$label.txt" || missing+=("$series")
  done
  local prompt_tokens
  prompt_tokens=$(awk '/^unshackle_prompt_tokens_total/ {s += $2} END {print s + 0}' "$work/metrics_$label.txt")
  if [ ${#missing[@]} = 0 ] && [ "${prompt_tokens%.*}" -gt 0 ]; then
    record PASS "metrics_$label" "$(wc -l <"$work/metrics_$label.txt") lines, prompt tokens $prompt_tokens"
  else
    record FAIL "metrics_$label" "missing: ${missing[*]:-none}; prompt tokens $prompt_tokens"
  fi
  http 10 "$url/v1/jobs?limit=20" >"$work/jobs_$label.result.json" 2>/dev/null || true
  cp "$work/jobs_$label.result.json" "$logs/" 2>/dev/null
  # The service's own timings of its longest-prompt job (a whole-prompt completion).
  local timings
  timings=$(python3 - "$work/jobs_$label.result.json" <<'EOF'
import json, sys
try:
    jobs = json.load(open(sys.argv[1]))["data"]
except (ValueError, KeyError, OSError):
    sys.exit(0)
jobs = [j for j in jobs if (j.get("progress") or {}).get("prompt_tokens")]
if jobs:
    job = max(jobs, key=lambda j: j["progress"]["prompt_tokens"])
    t = job.get("timings") or {}
    show = lambda k: "-" if t.get(k) is None else "%.3f s" % t[k]
    print("job %s: %d prompt tokens, prefill %s, first token %s, decode %s, total %s" % (
        job["id"], job["progress"]["prompt_tokens"], show("prefill_seconds"), show("time_to_first_token_seconds"),
        show("decode_seconds"), show("total_seconds")))
EOF
)
  [ -n "$timings" ] && record INFO "timings_$label" "$timings"
}

gpu_memory() {  # gpu_memory LABEL: what nvidia-smi says the GPU holds while the group is up
  { nvidia-smi --query-gpu=memory.used,memory.total --format=csv
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv; } >"$logs/gpu_memory_$1.txt" 2>&1
  record INFO "gpu_memory_$1" "$(nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null | head -1) used; apps: $(nvidia-smi --query-compute-apps=process_name,used_memory --format=csv,noheader 2>/dev/null | tr '\n' ';')"
}

# ---- 1. the main group: one rank on the GPU (or, dry run, on the CPU) ----
main=$backend
main_ranks=1
say "group '$main': mpirun -np $main_ranks unshackle-worker --backend $backend ($model, ESA, $tokens-token haystack)"
if start_group "$main" "$backend" "$main_ranks"; then
  [ "$backend" = cuda ] && gpu_memory "$main"
  say "unshackle submit"
  submit_job "$main"
  say "POST /v1/completions (plain and SSE) over haystack + question"
  complete "$main" completion 0
  over_deadline || complete "$main" stream 1
  if [ -f "$work/${main}_stream.result.json" ]; then
    if python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); sys.exit(0 if r["done"] and not r["error"] else 1)' \
         "$work/${main}_stream.result.json"; then
      record PASS "stream_events_$main" "text deltas, a finish_reason, then [DONE]"
    else
      record FAIL "stream_events_$main" "$(show "$work/${main}_stream.result.json")"
    fi
  fi
  [ "$backend" = cuda ] && gpu_memory "$main"
  scrape_metrics "$main"
  stop_group
fi
say "unshackle generate --backend $backend on the same prompt"
over_deadline || generate_reference "$backend"
same_text "completion_equals_generate" "$work/${main}_completion.text" "$work/generate_$backend.text" \
  "POST /v1/completions and unshackle generate --backend $backend"
same_text "stream_equals_generate" "$work/${main}_stream.text" "$work/generate_$backend.text" \
  "the SSE stream and unshackle generate --backend $backend"

# ---- 2. the same job on CPU ranks ----
if [ "$cpu_group" = 1 ]; then
  label=cpu$cpu_ranks
  say "group '$label': mpirun -np $cpu_ranks unshackle-worker --backend cpu, the same submit"
  if over_deadline; then
    record FAIL "submit_$label" "skipped: past the ${deadline_s} s deadline"
  elif start_group "$label" cpu "$cpu_ranks"; then
    submit_job "$label"
    complete "$label" completion 0
    scrape_metrics "$label"
    stop_group
    same_text "answer_equals_cpu_ranks" "$work/submit_$main.txt" "$work/submit_$label.txt" \
      "unshackle submit's answers of group '$main' and of $cpu_ranks CPU ranks"
    if [ -f "$work/${main}_completion.text" ] && [ -f "$work/${label}_completion.text" ]; then
      if cmp -s "$work/${main}_completion.text" "$work/${label}_completion.text"; then
        record INFO "completion_vs_cpu_ranks" "equal: '$(show "$work/${label}_completion.text")'"
      else
        record INFO "completion_vs_cpu_ranks" "differ ('$(show "$work/${main}_completion.text")' vs '$(show "$work/${label}_completion.text")'; bf16 KV vs f32)"
      fi
    fi
  fi
fi
[ "$failed" = 0 ]
