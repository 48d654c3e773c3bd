#!/usr/bin/env bash
# deploy/docker/group-launch.sh (the Kubernetes worker pods' entry point) with stand-ins for
# hostname, sshd, ssh-keygen and mpirun that record how they were called: the leader of a
# LeaderWorkerSet group and pod 0 of a StatefulSet must start one rank per GPU of every pod,
# with the right host list, group name and forwarded NCCL settings; a follower only runs sshd.
#   check_group_launch.sh REPO_ROOT
set -euo pipefail
launcher=$1/deploy/docker/group-launch.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/keys"
echo key >"$work/keys/id_ed25519"
echo pub >"$work/keys/id_ed25519.pub"
for tool in sshd mpirun; do
  printf '#!/bin/sh\necho "$*" >>"%s/%s.calls"\n' "$work" "$tool" >"$work/bin/$tool"
done
# shellcheck disable=SC2016  # the stand-ins expand their variables when they run
printf '#!/bin/sh\necho "${FAKE_HOSTNAME:-pod-0}"\n' >"$work/bin/hostname"
# shellcheck disable=SC2016
printf '#!/bin/sh\nwhile [ $# -gt 1 ]; do shift; done; touch "$1"\n' >"$work/bin/ssh-keygen"
chmod +x "$work"/bin/*

run() {  # run NAME ENV... : the launcher with a clean home and the stand-ins first on PATH
  local name=$1
  shift
  rm -f "$work"/*.calls
  mkdir -p "$work/home-$name"
  env -i PATH="$work/bin:/usr/bin:/bin" HOME="$work/home-$name" SSHD="$work/bin/sshd" SSH_KEY_DIR="$work/keys" \
    FOLLOWER_WAIT_S=1 "$@" bash "$launcher" --model /models/m --coordinator unshackle-coordinator-workers:8001 \
    >"$work/$name.out" 2>&1 || { cat "$work/$name.out"; echo "FAIL $name: the launcher failed" >&2; exit 1; }
}
expect() {  # expect FILE TEXT
  if ! grep -qF -- "$2" "$1" 2>/dev/null; then
    echo "FAIL $(basename "$1") lacks: $2" >&2
    echo "---- it holds:" >&2
    cat "$1" >&2 2>/dev/null || echo "(nothing: not called)" >&2
    exit 1
  fi
}

run lws-leader LWS_LEADER_ADDRESS=unshackle-worker-0.unshackle-worker.default LWS_GROUP_SIZE=3 LWS_WORKER_INDEX=0 \
  GPUS_PER_POD=8 NCCL_DEBUG=WARN NCCL_SOCKET_IFNAME=eth0
expect "$work/mpirun.calls" "--np 24 --host unshackle-worker-0.unshackle-worker.default:8,unshackle-worker-0-1.unshackle-worker.default:8,unshackle-worker-0-2.unshackle-worker.default:8 "
expect "$work/mpirun.calls" "-x NCCL_DEBUG"
expect "$work/mpirun.calls" "-x NCCL_SOCKET_IFNAME"
expect "$work/mpirun.calls" "unshackle-worker --group unshackle-worker-0 --model /models/m --coordinator unshackle-coordinator-workers:8001"
expect "$work/sshd.calls" "-p 2222"
[ -f "$work/home-lws-leader/.ssh/authorized_keys" ] || { echo "FAIL no authorized_keys for the group's key" >&2; exit 1; }

run lws-follower LWS_LEADER_ADDRESS=unshackle-worker-0.unshackle-worker.default LWS_GROUP_SIZE=3 LWS_WORKER_INDEX=2 GPUS_PER_POD=8
expect "$work/sshd.calls" "-D -e -p 2222"
if [ -e "$work/mpirun.calls" ]; then echo "FAIL a follower ran mpirun" >&2; exit 1; fi

run statefulset-pod0 FAKE_HOSTNAME=unshackle-worker-g0-0 GROUP_SIZE=2 HEADLESS_SERVICE=unshackle-worker-g0 GPUS_PER_POD=4
expect "$work/mpirun.calls" "--np 8 --host unshackle-worker-g0-0.unshackle-worker-g0:4,unshackle-worker-g0-1.unshackle-worker-g0:4 "
expect "$work/mpirun.calls" "unshackle-worker --group unshackle-worker-g0 --model /models/m"

run statefulset-pod1 FAKE_HOSTNAME=unshackle-worker-g0-1 GROUP_SIZE=2 HEADLESS_SERVICE=unshackle-worker-g0 GPUS_PER_POD=4
expect "$work/sshd.calls" "-D "
if [ -e "$work/mpirun.calls" ]; then echo "FAIL pod 1 of the StatefulSet ran mpirun" >&2; exit 1; fi

echo "PASS group-launch.sh: LWS leader/follower and StatefulSet pod 0/1 start the right MPI job"
