#!/usr/bin/env bash
# A bounded soak on loopback: a real coordinator and a 2-rank CPU worker group
# (`mpirun -np 2 unshackle-worker`) serving a tiny random-weight model (`unshackle make-model`),
# loaded by soak_client (N client threads: sync, SSE, jobs, stored contexts, and an overload
# window past the queue bound) for the given time. Every answer is checked against
# `unshackle generate`; the report gives requests served, p50/p99 latency, 429s and RSS.
#
#   tests/soak/run_soak.sh --minutes 10                 # the recorded soak (run it niced: nice -n 10 ...)
#   tests/soak/run_soak.sh --seconds 45 --build build   # the CI version (ctest soak_short)
#
# Options: --minutes M | --seconds S, --clients N (4), --overload-clients N (24),
# --max-queued N (8), --build DIR (build), --report FILE (the JSON report; default in the
# run's directory, printed), --keep (leave the run's directory and logs).
# Exit 0 when the soak passed; 1 with the reasons otherwise; 2 on bad usage.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
seconds=60 clients=4 overload=24 max_queued=8 build="$root/build" report="" keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) seconds=$(awk -v m="$2" 'BEGIN { printf "%d", m * 60 }'); shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --overload-clients) overload=$2; shift 2 ;;
    --max-queued) max_queued=$2; shift 2 ;;
    --build) build=$(cd "$2" && pwd); shift 2 ;;
    --report) report=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "run_soak.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
coordinator_bin=$build/coordinator/unshackle-coordinator
worker_bin=$build/worker/engine/unshackle-worker
cli_bin=$build/tools/unshackle
client_bin=$build/tests/soak/soak_client
for bin in "$coordinator_bin" "$worker_bin" "$cli_bin" "$client_bin"; do
  [ -x "$bin" ] || { echo "run_soak.sh: $bin is missing (build the targets unshackle-coordinator unshackle-worker unshackle soak_client)" >&2; exit 2; }
done
command -v mpirun >/dev/null || { echo "run_soak.sh: mpirun not found (Debian package openmpi-bin)" >&2; exit 2; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/uns_soak.XXXXXX")
[ -n "$report" ] || report=$dir/report.json
coordinator_pid="" group_pid=""
# shellcheck disable=SC2317  # run by the trap
cleanup() {
  # Only the processes this script started: the coordinator, and mpirun with its ranks.
  for pid in $group_pid $coordinator_pid; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$keep" = 1 ]; then echo "run_soak.sh: logs in $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
key=sk-soak-$$
# The e2e suite's tiny model: 2 layers, hidden 64, bytes tokenizer. Requests take milliseconds.
"$cli_bin" make-model --arch llama --layers 2 --hidden 64 --heads 4 --kv-heads 2 --vocab 320 --seed 7 \
  --output "$dir/model" >"$dir/make_model.log" 2>&1
attention='{"mode":"exact-topk","top_k":8,"l_I":4,"l_L":16}'
UNSHACKLE_API_KEY=$key "$coordinator_bin" --port 0 --worker-port 0 --port-file "$dir/ports.json" \
  --max-queued "$max_queued" --prefill-chunk 32 --attention "$attention" \
  --heartbeat-ms 200 --heartbeat-timeout-ms 5000 >"$dir/coordinator.log" 2>&1 &
coordinator_pid=$!
for _ in $(seq 100); do [ -s "$dir/ports.json" ] && break; sleep 0.1; done
[ -s "$dir/ports.json" ] || { echo "run_soak.sh: the coordinator did not start:" >&2; cat "$dir/coordinator.log" >&2; exit 1; }
http_port=$(sed 's/.*"http":\([0-9]*\).*/\1/' "$dir/ports.json")
worker_port=$(sed 's/.*"worker":\([0-9]*\).*/\1/' "$dir/ports.json")
# KV for ~1024 tokens: about a dozen requests run at once, so the overload window fills the
# queue (--max-queued) and gets 429s.
mpirun -np 2 --oversubscribe --bind-to none --mca btl self,tcp --mca btl_tcp_if_include lo \
  --mca oob_tcp_if_include lo "$worker_bin" --model "$dir/model" --coordinator "127.0.0.1:$worker_port" \
  --group g0 --max-context-tokens 2048 --kv-capacity-tokens 1024 --kv-block 8 --heartbeat-ms 200 \
  --collective-timeout-s 30 >"$dir/worker.log" 2>&1 &
group_pid=$!

echo "run_soak.sh: $seconds s, $clients clients (+$overload in the overload window), --max-queued $max_queued, in $dir"
status=0
"$client_bin" --port "$http_port" --key "$key" --model "$dir/model" --cli "$cli_bin" \
  --generate-args "--mode exact-topk --top-k 8 --l-i 4 --l-l 16 --ranks 2 --kv-block 8 --chunk 32" \
  --seconds "$seconds" --clients "$clients" --overload-clients "$overload" \
  --coordinator-pid "$coordinator_pid" --mpirun-pid "$group_pid" --report "$report" || status=$?
echo "run_soak.sh: report $report"
if [ "$status" != 0 ]; then
  keep=1
  echo "---- coordinator log (tail) ----" >&2; tail -n 30 "$dir/coordinator.log" >&2
  echo "---- worker log (tail) ----" >&2; tail -n 30 "$dir/worker.log" >&2
fi
exit "$status"
