#!/usr/bin/env bash
# The systemd units pass `systemd-analyze verify` (with ExecStart pointed at the binaries of
# this build, since verify checks that they exist), verify says nothing at all (it exits 0 on
# unknown keys and values it ignores), and the worker unit's mpirun options are accepted.
#   check_systemd.sh REPO_ROOT COORDINATOR_BIN [WORKER_BIN]
set -euo pipefail
root=$1 coordinator_bin=$2 worker_bin=${3:-/bin/true}
if ! command -v systemd-analyze >/dev/null; then
  echo "FAIL systemd-analyze not found (Debian package systemd)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$root"/deploy/systemd/*.service "$work/"
sed -i "s|/usr/local/bin/unshackle-coordinator|$coordinator_bin|; s|/usr/local/bin/unshackle-worker|$worker_bin|" "$work"/*.service
units=("$work/unshackle-coordinator.service" "$work/unshackle-worker@g0.service")
output=$(cd "$work" && systemd-analyze verify "${units[@]}" 2>&1) || {
  echo "FAIL systemd-analyze verify: $output" >&2
  exit 1
}
if [ -n "$output" ]; then
  echo "FAIL systemd-analyze verify complained: $output" >&2
  exit 1
fi
# The mpirun part of the worker unit's ExecStart, run on this machine with /bin/true as the
# program: a misspelt option fails here, not on the cluster.
mpirun_line=$(sed -n 's/^ExecStart=\(\/usr\/bin\/mpirun.*\) \/usr\/local\/bin\/unshackle-worker.*/\1/p' "$root/deploy/systemd/unshackle-worker@.service")
if [ -z "$mpirun_line" ]; then
  echo "FAIL the worker unit's ExecStart does not start unshackle-worker under /usr/bin/mpirun" >&2
  exit 1
fi
read -r -a mpirun_words <<<"${mpirun_line//\$\{UNSHACKLE_RANKS\}/2}"
if command -v mpirun >/dev/null; then
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 \
    "${mpirun_words[@]}" /bin/true || { echo "FAIL mpirun rejected: ${mpirun_words[*]}" >&2; exit 1; }
fi
echo "PASS systemd-analyze verify of ${#units[@]} units; mpirun accepts the worker unit's options"
