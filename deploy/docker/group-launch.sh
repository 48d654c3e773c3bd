#!/usr/bin/env bash
# Starts one worker group that spans several pods (Kubernetes) as one MPI job: every pod runs
# sshd, and the leader pod (index 0) runs mpirun over all pods, one rank per GPU. Works under
# a LeaderWorkerSet (LWS_* variables, injected by LWS) and under the StatefulSet fallback
# (pod ordinal from the hostname, GROUP_SIZE and HEADLESS_SERVICE from the manifest).
#   unshackle-group-launch [unshackle-worker flags...]   (--group is set here)
# Env: GPUS_PER_POD (default 1), SSH_KEY_DIR (a Secret with id_ed25519, id_ed25519.pub),
# FOLLOWER_WAIT_S (default 120: how long the leader waits for each follower's sshd).
set -euo pipefail

gpus_per_pod=${GPUS_PER_POD:-1}
key_dir=${SSH_KEY_DIR:-/etc/unshackle/ssh}
follower_wait_s=${FOLLOWER_WAIT_S:-120}
sshd=${SSHD:-/usr/sbin/sshd}

if [ -n "${LWS_LEADER_ADDRESS:-}" ]; then
  # LWS: leader <lws>-<group>.<lws>.<ns>, worker i: <lws>-<group>-<i>.<lws>.<ns>.
  size=${LWS_GROUP_SIZE:?LWS_GROUP_SIZE missing}
  index=${LWS_WORKER_INDEX:?LWS_WORKER_INDEX missing}
  leader_label=${LWS_LEADER_ADDRESS%%.*}
  domain=${LWS_LEADER_ADDRESS#*.}
  group=${leader_label}
  hosts=("$LWS_LEADER_ADDRESS")
  for ((i = 1; i < size; i++)); do hosts+=("${leader_label}-${i}.${domain}"); done
else
  # StatefulSet: <set>-<ordinal>, all under one headless Service.
  size=${GROUP_SIZE:?set GROUP_SIZE (pods per group) or run under a LeaderWorkerSet}
  service=${HEADLESS_SERVICE:?set HEADLESS_SERVICE}
  pod=$(hostname)
  index=${pod##*-}
  set_name=${pod%-*}
  group=${set_name}
  hosts=()
  for ((i = 0; i < size; i++)); do hosts+=("${set_name}-${i}.${service}"); done
fi

# Passwordless ssh between the pods of the group, for mpirun's launcher only. sshd runs as
# this (non-root) user on port 2222 with its own host key, so it only admits this user.
mkdir -p ~/.ssh
install -m 0600 "$key_dir/id_ed25519" ~/.ssh/id_ed25519
install -m 0644 "$key_dir/id_ed25519.pub" ~/.ssh/authorized_keys
printf 'Host *\n  Port 2222\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n' >~/.ssh/config
[ -f ~/.ssh/host_key ] || ssh-keygen -q -t ed25519 -N '' -f ~/.ssh/host_key
sshd_args=(-e -p 2222 -h "$HOME/.ssh/host_key" -o "PidFile=$HOME/.ssh/sshd.pid" -o UsePAM=no)

if [ "$index" != 0 ]; then
  # A follower only hosts ranks; the leader's mpirun starts them. sshd in the foreground
  # keeps the pod alive and dies with it.
  exec "$sshd" -D "${sshd_args[@]}"
fi

"$sshd" "${sshd_args[@]}"
# Wait for every follower's sshd (pods start in any order).
for host in "${hosts[@]:1}"; do
  for _ in $(seq 1 "$follower_wait_s"); do
    if (exec 3<>"/dev/tcp/${host%%:*}/2222") 2>/dev/null; then break; fi
    sleep 1
  done
done
host_list=$(printf '%s:'"$gpus_per_pod"',' "${hosts[@]}")
ranks=$((size * gpus_per_pod))
echo "unshackle-group-launch: group ${group}: ${ranks} ranks on ${host_list%,}" >&2
# The pod's NCCL_*, UNSHACKLE_* and library path reach the remote ranks through -x;
# --bind-to none leaves CPU placement to the pod's limits.
forward=()
while IFS= read -r name; do forward+=(-x "$name"); done < <(compgen -e | grep -E '^(NCCL_|UNSHACKLE_|LD_LIBRARY_PATH$)' || true)
exec mpirun --np "$ranks" --host "${host_list%,}" --bind-to none --mca btl self,vader,tcp \
  "${forward[@]}" unshackle-worker --group "$group" "$@"
