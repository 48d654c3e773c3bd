#!/usr/bin/env bash
# Issue 5 in one device call: check, then time. Runs on the GPU machine from the repository
# root with the binaries that bench/build_device_bench.sh put in .device-build/kernels/.
# Every section has its own time limit, so one hang cannot eat the call; logs go to $OUT.
#   bench/run_device_bench.sh [sections]     sections: any of
#     tests step kernels decode breakdown sdpa capacity prefill sdpa_prefill sanitize     (default: all, in this order)
# P ranks for the MPI sections: RANKS (default: the number of GPUs).
set -uo pipefail
bin=.device-build/kernels
out=${OUT:-/tmp/out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
gpus=$(nvidia-smi -L | wc -l)
ranks=${RANKS:-$gpus}
sections=${*:-tests step kernels decode breakdown sdpa capacity prefill sdpa_prefill sanitize}
mpi=(mpirun --allow-run-as-root -np "$ranks" -x NCCL_NVLS_ENABLE)  # an array: `timeout` runs no shell functions
section() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }
want() { [[ " $sections " == *" $1 "* ]]; }

{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; date -u
  cat "$bin/COMMIT" 2>/dev/null; echo "ranks $ranks"; } 2>&1 | tee "$out/device.txt"

if want tests; then
  section "kernels_cuda_test (every op against the CPU reference)"
  timeout 240 "$bin/kernels_cuda_test" 2>&1 | tee "$out/tests.txt" | grep -E "^\[  (PASSED|FAILED|  OK|SKIPPED) |FAILED|Failure|error" | head -40
fi
if want step; then
  section "NCCL layer step vs the CPU oracle, mpirun -np $ranks"
  timeout 90 "${mpi[@]}" "$bin/worker_nccl_step" 2>&1 | tee "$out/step.txt" | tail -14
  # Two ranks on one GPU need the MPI communicator (NCCL takes one rank per device).
  if [ "$ranks" -lt 2 ]; then
    section "layer step vs the CPU oracle, 2 ranks on one GPU over the MPI communicator"
    timeout 120 mpirun --allow-run-as-root --oversubscribe -np 2 "$bin/worker_nccl_step" --mpi 2>&1 | tee "$out/step_mpi2.txt" | tail -14
  fi
fi
if want kernels; then
  section "kernels at 128k / 256k / 1M rows (CUDA events, copy ceiling in the same run)"
  OUT=$out timeout 120 "$bin/bench_kernels" 2>&1 | tee "$out/bench.txt"
fi
if want decode; then
  section "32-layer decode step at 1M tokens: ESA vs full (ours), then SDPA on the same shape"
  timeout 150 "${mpi[@]}" "$bin/bench_gpu_step" decode 1048576 8 2>&1 | tee -a "$out/bench.txt"
fi
if want breakdown; then
  section "where an ESA decode layer step's time goes (host time per backend call, 1M tokens)"
  timeout 120 "${mpi[@]}" "$bin/bench_gpu_step" breakdown 1048576 2>&1 | tee -a "$out/bench.txt"
fi
if want sdpa; then
  timeout 90 python3 bench/sdpa_bench.py decode 1048576 8 2>&1 | tee -a "$out/bench.txt"
fi
if want capacity; then
  section "capacity: longest ESA context next to 16 GB of weights, allocated, loaded and decoded"
  timeout 150 "${mpi[@]}" "$bin/bench_gpu_step" capacity 16 2>&1 | tee -a "$out/bench.txt"
fi
if want prefill; then
  section "prefill attention: ESA (ours, 512-token chunks, one layer)"
  timeout 60 "${mpi[@]}" "$bin/bench_gpu_step" prefill 131072 1 2>&1 | tee -a "$out/bench.txt"
  timeout 100 "${mpi[@]}" "$bin/bench_gpu_step" prefill 1048576 1 2>&1 | tee -a "$out/bench.txt"
fi
if want sdpa_prefill; then
  section "prefill attention: PyTorch SDPA, one layer, causal"
  timeout 60 python3 bench/sdpa_bench.py prefill 131072 3 2>&1 | tee -a "$out/bench.txt"
  timeout 100 python3 bench/sdpa_bench.py prefill 1048576 1 2>&1 | tee -a "$out/bench.txt"
fi
if want sanitize; then
  # Small sizes only where the tool is slow: memcheck (cheap) runs every top-k test, incl. the
  # 4M-row TopKLargeAdversarial; racecheck (slow on shared memory) only *TopKCorner*, whose
  # TopKCornerCandidatePaths reaches every path of the select's last block at <= 70001 rows.
  section "compute-sanitizer memcheck"
  timeout 100 compute-sanitizer --tool memcheck --error-exitcode 3 "$bin/kernels_cuda_test" \
    --gtest_filter='*Merge*:*TopK*:*CompressQuery*:*AttendBoth*:*RowsOfTokens*:*AttendSkips*' 2>&1 | tee "$out/sanitize.txt" | tail -4
  section "compute-sanitizer racecheck (shared-memory kernels: merge, top-k tail and rank)"
  timeout 100 compute-sanitizer --tool racecheck --error-exitcode 3 "$bin/kernels_cuda_test" \
    --gtest_filter='*MergeMany*:*TopKCorner*:*RowsOfTokens*' 2>&1 | tee -a "$out/sanitize.txt" | tail -4
fi
section "done"
