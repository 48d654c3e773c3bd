#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with the binaries built by
# build_for_device.sh carried in .device-build/. Writes logs under $OUT.
#   tools/device/run_checks.sh [ranks]
set -uo pipefail
ranks=${1:-2}
bin=.device-build
out=${OUT:-/tmp/out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; } 2>&1 | tee "$out/device.txt"
echo "== kernels_cuda_test"
"$bin/kernels_cuda_test" 2>&1 | tee "$out/kernels_cuda_test.txt" | tail -25
echo "== compute-sanitizer memcheck (merge, proximity/top-k, LagKV)"
timeout 240 compute-sanitizer --tool memcheck "$bin/kernels_cuda_test" --gtest_filter='*Merge*:*Proximity*' 2>&1 \
  | tee "$out/memcheck.txt" | tail -6
echo "== NCCL layer step, mpirun -np $ranks"
timeout 240 mpirun --allow-run-as-root -np "$ranks" -x NCCL_NVLS_ENABLE "$bin/worker_nccl_step" 2>&1 | tee "$out/nccl_step.txt" | tail -14
echo "== decode step timing, mpirun -np $ranks"
timeout 300 mpirun --allow-run-as-root -np "$ranks" -x NCCL_NVLS_ENABLE "$bin/bench_gpu_decode" 131072 1048576 2>&1 \
  | tee "$out/gpu_decode.txt" | tail -10
