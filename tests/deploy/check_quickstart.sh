#!/usr/bin/env bash
# The quickstart's service part as a test: deploy/demo_service.sh on a free port with two CPU
# ranks and a short haystack must start the coordinator and the group, get an answer through
# `unshackle submit`, report the job's timings and the metrics, and stop every process it
# started (none may be left behind).
#   check_quickstart.sh REPO_ROOT BUILD_DIR WORK_DIR
set -euo pipefail
root=$1 build=$2 work=$3
rm -rf "$work"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
output=$("$root/deploy/demo_service.sh" --build "$build" --work "$work" --port 0 --ranks 2 --tokens 3000 --max-tokens 8 2>&1) || {
  echo "$output"
  echo "FAIL deploy/demo_service.sh exited non-zero" >&2
  exit 1
}
echo "$output"
for expected in "== Worker group 'local': 2 " "ready: every rank joined" "prefill [" "== Answer: '" "finish_reason: " \
                "== Timings of job job-" "unshackle_prompt_tokens_total" "== Stopped the worker group and the coordinator."; do
  if ! grep -qF -- "$expected" <<<"$output"; then
    echo "FAIL the demo's output lacks '$expected'" >&2
    exit 1
  fi
done
if [ -e "$work/service.pids" ]; then
  echo "FAIL $work/service.pids is still there after the demo stopped" >&2
  exit 1
fi
while read -r pid; do
  if kill -0 "$pid" 2>/dev/null; then
    echo "FAIL process $pid started by the demo outlived it" >&2
    exit 1
  fi
done <"$work/stopped.pids"
echo "PASS the quickstart's service part answered and stopped cleanly"
