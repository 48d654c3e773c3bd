#!/usr/bin/env bash
# The service part of the quickstart, also run by ctest (deploy_quickstart_service): starts a
# coordinator and one worker group on this machine (one rank per GPU when there are GPUs,
# else --ranks CPU ranks), waits until the group passed its health step (/ready), asks the
# demo long-context question through the public API with `unshackle submit` (prefill
# progress, streamed answer), prints the answer, the timings and where the metrics are, then
# stops the group and the coordinator. --keep-running leaves both up (`--stop` ends them).
#   deploy/demo_service.sh [--build DIR] [--model DIR] [--ranks N] [--tokens N] [--port P]
#                          [--max-tokens N] [--work DIR] [--keep-running | --stop]
set -euo pipefail
cd "$(dirname "$0")/.."

build=build model="" ranks="" tokens=16000 port=8000 max_tokens=8 work="" keep_running=0 stop_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --max-tokens) max_tokens=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --keep-running) keep_running=1; shift ;;
    --stop) stop_only=1; shift ;;
    *) echo "usage: $0 [--build DIR] [--model DIR] [--ranks N] [--tokens N] [--port P] [--max-tokens N] [--work DIR] [--keep-running | --stop]" >&2
       exit 2 ;;
  esac
done
work=${work:-$build/demo}
mkdir -p "$work"
pid_file=$work/service.pids

# Stops what an earlier run left (its own pid file only): the group first, so it leaves the
# coordinator cleanly, then the coordinator. SIGKILL only after 20 s.
stop_service() {
  [ -f "$pid_file" ] || return 0
  local pid
  for pid in $(tac "$pid_file"); do
    # A pid from an old file may since belong to someone else: only ours are stopped.
    case "$(ps -p "$pid" -o comm= 2>/dev/null)" in
      unshackle-coord* | mpirun | unshackle-worker) ;;
      *) continue ;;
    esac
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "demo: pid $pid did not stop within 20 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  mv -f "$pid_file" "$work/stopped.pids"  # kept for the test that checks nothing outlived the demo
}
stop_service
if [ "$stop_only" = 1 ]; then
  echo "demo: service stopped"
  exit 0
fi

coordinator_bin=$build/coordinator/unshackle-coordinator
worker_bin=$build/worker/engine/unshackle-worker
client_bin=$build/tools/unshackle
for binary in "$coordinator_bin" "$worker_bin" "$client_bin"; do
  if [ ! -x "$binary" ]; then
    echo "demo: $binary is missing: build the targets unshackle-coordinator unshackle-worker unshackle first" >&2
    exit 1
  fi
done

# ---- the model ----
if [ -z "$model" ]; then
  if [ -f models/needle-llama/config.json ]; then
    model=models/needle-llama
    model_kind="the trained needle-retrieval model (models/needle-llama): it should answer with the code"
  else
    model=$work/random-llama
    if [ ! -f "$model/config.json" ]; then
      "$client_bin" make-model --arch llama --output "$model" --layers 2 --hidden 64 --heads 4 --kv-heads 2 \
        --vocab 259 --max-position 65536 --seed 1 >/dev/null
    fi
    model_kind="a random-weight model from 'unshackle make-model' (no trained model in models/): the answer is noise, every step of the path is real"
  fi
else
  model_kind="the model given with --model"
fi
echo "== Model: $model"
echo "   $model_kind"

# ---- the worker group: one rank per GPU, else CPU ranks ----
gpus=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then gpus=$(nvidia-smi -L | grep -c '^GPU' || true); fi
worker_flags=()
if [ "$gpus" -gt 0 ]; then
  ranks=${ranks:-$gpus}
  # grep reads all of --help (no -q): an early exit would fail the pipe under pipefail.
  # The CUDA attention kernels take head dim 32 (needle-llama), 64, 96, 128 or 256 (as the
  # backend's supports() says); a model with another head dim is served on the CPU ranks.
  head_dim=$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print(c.get("head_dim") or c["hidden_size"]//c["num_attention_heads"])' "$model/config.json" 2>/dev/null || echo 0)
  if ! "$worker_bin" --help | grep -- '--backend.*cuda' >/dev/null; then
    placement="$ranks ranks, one per GPU, computing on the CPU (this worker serves models with --backend cpu only)"
  elif [[ " 32 64 96 128 256 " == *" $head_dim "* ]]; then
    worker_flags+=(--backend cuda)
    placement="$ranks ranks on $gpus GPU(s) (--backend cuda, KV in bf16)"
  else
    placement="$ranks ranks, one per GPU, computing on the CPU (head dim $head_dim: the CUDA kernels take 32, 64, 96, 128 or 256)"
  fi
else
  ranks=${ranks:-2}
  placement="$ranks CPU ranks (no GPU found)"
fi

# The context may run past the model's trained length (max_position_embeddings; 512 for
# needle-llama): selective attention with its positions is what lets it read far past it.
worker_flags+=(--max-context-tokens "$((tokens + max_tokens + 1024))")

# ESA scores with compressed queries/keys and needs the model's compression weights; without
# them the demo selects the top-k middle tokens by exact scores (same I, L and k).
if [ -f "$model/compression.safetensors" ]; then
  worker_flags+=(--compression "$model/compression.safetensors")
  attention='{"mode":"esa","top_k":64,"l_I":32,"l_L":256}'
else
  attention='{"mode":"exact-topk","top_k":64,"l_I":32,"l_L":256}'
fi

api_key=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
printf '%s\n' "$api_key" >"$work/api-key"
chmod 600 "$work/api-key"
export UNSHACKLE_API_KEY=$api_key
rm -f "$work/ports.json"
"$coordinator_bin" --port "$port" --worker-port 0 --port-file "$work/ports.json" --attention "$attention" >"$work/coordinator.log" 2>&1 &
echo "$!" >"$pid_file"
on_exit() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    echo "demo: failed (exit $status); logs: $work/coordinator.log, $work/worker.log" >&2
    tail -n 5 "$work/coordinator.log" "$work/worker.log" >&2 2>/dev/null || true
    stop_service
  fi
}
trap on_exit EXIT
for _ in $(seq 1 200); do [ -s "$work/ports.json" ] && break; sleep 0.1; done
if [ ! -s "$work/ports.json" ]; then
  echo "demo: the coordinator did not start (is port $port free? --port 0 picks any)" >&2
  exit 1
fi
http_port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"])' "$work/ports.json")
worker_port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["worker"])' "$work/ports.json")
url=http://127.0.0.1:$http_port
echo "== Coordinator: $url (workers connect to 127.0.0.1:$worker_port); attention $attention"

# Everything stays on this machine: MPI over loopback TCP (shared memory transports fail in
# some containers), ranks not pinned, more ranks than cores allowed.
mpirun_flags=(--np "$ranks" --oversubscribe --bind-to none --mca btl "self,tcp" --mca btl_tcp_if_include lo
              --mca oob_tcp_if_include lo)
if [ "$(id -u)" = 0 ]; then mpirun_flags+=(--allow-run-as-root); fi
echo "== Worker group 'local': $placement"
mpirun "${mpirun_flags[@]}" "$worker_bin" --model "$model" --coordinator "127.0.0.1:$worker_port" --group local \
  "${worker_flags[@]}" >"$work/worker.log" 2>&1 &
echo "$!" >>"$pid_file"
worker_pid=$!

auth=(-H "Authorization: Bearer $api_key")
for _ in $(seq 1 1200); do
  curl -fsS -o /dev/null "${auth[@]}" "$url/ready" 2>/dev/null && break
  if ! kill -0 "$worker_pid" 2>/dev/null; then
    echo "demo: the worker group exited before it was ready" >&2
    exit 1
  fi
  sleep 0.1
done
curl -fsS -o /dev/null "${auth[@]}" "$url/ready" || { echo "demo: no ready worker group after 120 s" >&2; exit 1; }
max_len=$(curl -fsS "${auth[@]}" "$url/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["max_model_len"])')
echo "   ready: every rank joined and passed the health step; the model takes $max_len tokens per context"

# ---- the long-context job ----
doc_tokens=$tokens
if [ "$doc_tokens" -gt $((max_len - max_tokens - 64)) ]; then doc_tokens=$((max_len - max_tokens - 64)); fi
python3 deploy/demo_haystack.py --tokens "$doc_tokens" --dir "$work" >"$work/haystack.log"
limit_note=""
if [ "$doc_tokens" -lt "$tokens" ]; then limit_note=" (cut from $tokens to fit the model's $max_len-token context)"; fi
echo "== The job: a ${doc_tokens}-byte haystack with 4 facts${limit_note}, then the question:"
sed '/^$/d; s/^/   /' "$work/question.txt"; echo
expected=$(cat "$work/answer.txt")
start=$(date +%s.%N)
"$client_bin" submit --url "$url" --file "$work/haystack.txt" --question "$(cat "$work/question.txt")" \
  --max-tokens "$max_tokens" | tee "$work/answer.out"
end=$(date +%s.%N)
answer=$(tr -d '\n' <"$work/answer.out")
echo "== Answer: '${answer}'   (the code planted in the haystack: ${expected})"
if [[ "$answer" == *"${expected%.}"* ]]; then echo "   the answer holds the planted code"; fi

# Timings: the question's job as the service measured it, and the whole submit as we did.
"$client_bin" jobs --json --limit 1 --url "$url" | python3 -c '
import json, sys
listing = json.load(sys.stdin)
job = listing["data"][0]
timings = job.get("timings") or {}
def show(key):
    value = timings.get(key)
    return "-" if value is None else "%.3f s" % value
print("== Timings of job %s: queue %s, prefill %s, first token %s, decode %s, total %s" % (
    job.get("id"), show("queue_seconds"), show("prefill_seconds"), show("time_to_first_token_seconds"),
    show("decode_seconds"), show("total_seconds")))'
echo "   submit end to end (document prefill + question): $(python3 -c "print(f'{$end - $start:.2f}')") s"
echo "== Metrics: $url/metrics (Bearer key in $work/api-key); Prometheus: deploy/prometheus/prometheus.yml, Grafana: deploy/grafana/unshackle.json"
metrics=$(curl -fsS "${auth[@]}" "$url/metrics")
grep -E '^unshackle_(prompt_tokens_total|generation_tokens_total|request_finished_total\{reason="(stop|length)"\}|worker_group_up)' <<<"$metrics" | sed 's/^/   /'
# Where the answer's attention went (sampled decode steps): mean share per part.
awk '/^unshackle_attention_share_ratio_(sum|count)\{/ {
       split($1, name, "{"); part = name[2]; sub(/.*part="/, "", part); sub(/".*/, "", part)
       if (name[1] ~ /_sum$/) sum[part] = $2; else count[part] = $2 }
     END { n = split("initial selected window", parts, " "); line = ""
           for (i = 1; i <= n; ++i) if (count[parts[i]] > 0) line = line sprintf(" %s %.0f%%", parts[i], 100 * sum[parts[i]] / count[parts[i]])
           if (line != "") print "   attention share of the answer (initial tokens, selected middle tokens, local window):" line }' <<<"$metrics"

if [ "$keep_running" = 1 ]; then
  trap - EXIT
  echo "== Still running (--keep-running): export UNSHACKLE_URL=$url UNSHACKLE_API_KEY=\$(cat $work/api-key)"
  echo "   then e.g. $client_bin submit --file FILE --question Q;  stop with: ./deploy/quickstart.sh --stop  (or $0 --stop --work $work)"
  exit 0
fi
stop_service
trap - EXIT
echo "== Stopped the worker group and the coordinator."
