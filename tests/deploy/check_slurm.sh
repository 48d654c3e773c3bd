#!/usr/bin/env bash
# deploy/slurm/unshackle.sbatch run as Slurm would run it, on this machine: stand-ins for
# scontrol (the node list is this host) and srun (records its options, runs the program; with
# --mpi=pmix it starts the ranks with mpirun, as PMIx would). The real coordinator and a real
# 2-rank worker group must come up, answer a completion, and stop when the job gets SIGTERM
# (scancel / the time limit).
#   check_slurm.sh REPO_ROOT BUILD_DIR MODEL_DIR
set -euo pipefail
root=$1 build=$2 model=$3
work=$(mktemp -d)
script_pid=""
cleanup() {
  if [ -n "$script_pid" ] && kill -0 "$script_pid" 2>/dev/null; then kill -TERM "$script_pid"; sleep 2; kill -KILL "$script_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/bin"
cat >"$work/bin/scontrol" <<'STUB'
#!/bin/sh
echo 127.0.0.1
STUB
cat >"$work/bin/srun" <<STUB
#!/bin/bash
echo "\$*" >>"$work/srun.calls"
mpi="" ntasks=1
while [ \$# -gt 0 ] && [ "\${1#-}" != "\$1" ]; do
  case "\$1" in
    --mpi=*) mpi=\${1#--mpi=} ;;
    --ntasks=*) ntasks=\${1#--ntasks=} ;;
  esac
  shift
done
if [ -n "\$mpi" ]; then
  # One host stands for the allocation: MPI over loopback.
  unset OMPI_MCA_btl_tcp_if_exclude
  exec mpirun --np "\$ntasks" --oversubscribe --bind-to none --mca btl self,tcp --mca btl_tcp_if_include lo \\
    --mca oob_tcp_if_include lo "\$@"
fi
exec "\$@"
STUB
chmod +x "$work/bin/scontrol" "$work/bin/srun"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
http_port=$(free_port)
worker_port=$(free_port)
key=sk-slurm-test
PATH="$work/bin:$PATH" SLURM_JOB_NODELIST=node1 SLURM_NTASKS=2 SLURM_NTASKS_PER_NODE=2 SLURM_JOB_ID=42 \
  UNSHACKLE_MODEL="$model" UNSHACKLE_BIN="$build" UNSHACKLE_API_KEY=$key UNSHACKLE_PORT=$http_port \
  UNSHACKLE_WORKER_PORT=$worker_port UNSHACKLE_BACKEND=cpu OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  bash "$root/deploy/slurm/unshackle.sbatch" >"$work/job.log" 2>&1 &
script_pid=$!

url=http://127.0.0.1:$http_port
ready=""
for _ in $(seq 1 600); do
  ready=$(curl -fsS -H "Authorization: Bearer $key" "$url/ready" 2>/dev/null) && break
  kill -0 "$script_pid" 2>/dev/null || break
  sleep 0.1
done
if ! grep -q '"slurm-42"' <<<"$ready"; then
  cat "$work/job.log"
  echo "FAIL the job's group slurm-42 never became ready: ${ready:-no answer}" >&2
  exit 1
fi
answer=$(curl -fsS -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
  -d '{"prompt":"The access code of the red door is 12345. Question: What is the access code of the red door?\nAnswer:","max_tokens":3}' \
  "$url/v1/completions") || { cat "$work/job.log"; echo "FAIL no completion" >&2; exit 1; }
grep -q '"text_completion"' <<<"$answer" || { echo "FAIL unexpected completion: $answer" >&2; exit 1; }
grep -q -- "--mpi=pmix --ntasks=2 --ntasks-per-node=2 --gpus-per-task=1" "$work/srun.calls" ||
  { cat "$work/srun.calls"; echo "FAIL the ranks were not started with srun --mpi=pmix, one task per GPU" >&2; exit 1; }

kill -TERM "$script_pid"
for _ in $(seq 1 300); do kill -0 "$script_pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$script_pid" 2>/dev/null; then
  cat "$work/job.log"
  echo "FAIL the job did not end within 30 s of SIGTERM" >&2
  exit 1
fi
script_pid=""
if curl -fsS -o /dev/null "$url/health" 2>/dev/null; then
  echo "FAIL the coordinator still answers after the job ended" >&2
  exit 1
fi
grep -q "worker group exited" "$work/job.log" || { cat "$work/job.log"; echo "FAIL the job log does not say the group ended" >&2; exit 1; }
echo "PASS unshackle.sbatch: coordinator + srun --mpi=pmix group answered, and both stopped on SIGTERM"
