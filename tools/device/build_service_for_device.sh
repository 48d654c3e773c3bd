#!/usr/bin/env bash
# Builds, here (Debian 12), the real service for the GPU machine and packs it with the shared
# libraries that machine lacks, to be carried there (tools/device/run_service_gpu.sh runs it):
#   unshackle-coordinator, unshackle-worker, unshackle (CUDA for sm_90, H200), and the GPU tests
#   kernels_cuda_test and model_cuda_test, and bench_model (the whole-model speed, next to
#   tools/hf_parity/hf_bench.py), stripped of debug info;
#   every .so they load (by ldd) except what the GPU machine has itself: the C/C++ runtime,
#   CUDA (cudart, cuBLAS, NCCL, the driver) and OpenMPI with everything libmpi loads (the
#   device's mpirun must use its own MPI libraries). That leaves prometheus-cpp, OpenBLAS (and
#   its gfortran/quadmath), SentencePiece, PCRE2, ... (fmt, spdlog, CLI11, nlohmann-json and
#   Boost.JSON are header-only or static here).
# Output (git-ignored, .gitignore's /.device-build/): .device-build/service/service.tar.gz
# (bin/ and lib/; gzip keeps OpenBLAS's 36 MB within the 64 MiB a device call may carry) and
# .device-build/service/MANIFEST.txt (what is inside, each library's source path here).
#   tools/device/build_service_for_device.sh
#   BUILD_DIR=build-device-service (default) JOBS=2: the build directory and its parallelism.
# The build uses the main build's flags (RelWithDebInfo, ccache) with UNS_CUDA_ARCHS=90, so the
# C++ objects come from ccache when main was built; the CUDA objects compile for sm_90.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${BUILD_DIR:-build-device-service}
out=.device-build/service
export PATH="$PATH:/usr/local/cuda/bin"
targets=(unshackle-coordinator unshackle-worker unshackle kernels_cuda_test model_cuda_test bench_model)

launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
mkdir -p "$build"
log=$build/configure.log
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DUNS_CUDA_ARCHS=90 -DUNS_BUILD_BENCH=ON \
  "${launcher[@]}" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
for part in "CUDA   ON" "SERVICE ON" "MPI    ON"; do
  grep -q "unshackle: $part" "$log" || {
    echo "build_service_for_device: the configure did not report '$part' (see $log)" >&2
    exit 1
  }
done
cmake --build "$build" -j "${JOBS:-2}" --target "${targets[@]}"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib"
for target in "${targets[@]}"; do
  path=$(find "$build" -type f -name "$target" -perm -u+x | head -1)
  [ -n "$path" ] || { echo "build_service_for_device: no binary for $target under $build" >&2; exit 1; }
  strip --strip-debug -o "$stage/bin/$target" "$path"
done

# What the GPU machine has itself: the C/C++ runtime, CUDA, and its own OpenMPI's closure.
is_device_lib() {
  case "$1" in
    linux-vdso.so* | ld-linux*.so* | libc.so* | libm.so* | libdl.so* | libpthread.so* | librt.so* | libutil.so* | \
    libgcc_s.so* | libstdc++.so* | libcuda.so* | libcudart.so* | libcublas.so* | libcublasLt.so* | libnccl.so* | \
    libnvidia-*.so*) return 0 ;;
  esac
  grep -qxF "$1" "$stage/mpi_closure" 2>/dev/null
}
# awk reads to the end (no early exit): an early exit would end ldconfig by SIGPIPE, which
# pipefail turns into this script's failure.
libmpi=$(ldconfig -p | awk '/libmpi\.so\.40 / && !found {print $NF; found = 1}')
[ -n "$libmpi" ] || { echo "build_service_for_device: libmpi.so.40 not found by ldconfig" >&2; exit 1; }
{ echo libmpi.so.40; ldd "$libmpi" | awk '{print $1}'; } | sort -u >"$stage/mpi_closure"

manifest=$stage/MANIFEST.txt
{
  echo "# unshackle service for the GPU machine: built $(date -u +%FT%TZ) from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "# build: $build (RelWithDebInfo, UNS_CUDA_ARCHS=90), binaries stripped of debug info"
  echo "# left to the GPU machine: C/C++ runtime, CUDA (cudart, cuBLAS, NCCL, driver), OpenMPI and what libmpi loads:"
  echo "#   $(tr '\n' ' ' <"$stage/mpi_closure")"
} >"$manifest"
for binary in "$stage"/bin/*; do
  ldd "$binary" >"$stage/ldd.txt"
  if grep -q "not found" "$stage/ldd.txt"; then
    echo "build_service_for_device: $(basename "$binary") has unresolved libraries here:" >&2
    grep "not found" "$stage/ldd.txt" >&2
    exit 1
  fi
  echo "bin/$(basename "$binary")  $(stat -c %s "$binary") bytes" >>"$manifest"
  ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' >>"$stage/needed"
done
sort -u "$stage/needed" | while read -r name path; do
  is_device_lib "$name" && continue
  [ -e "$stage/lib/$name" ] && continue
  cp -L "$path" "$stage/lib/$name"
  echo "lib/$name  <- $path ($(readlink -f "$path"))" >>"$manifest"
done

rm -rf "$out"
mkdir -p "$out"
tar -C "$stage" -czf "$out/service.tar.gz" bin lib MANIFEST.txt
cp "$manifest" "$out/MANIFEST.txt"
git check-ignore -q "$out/service.tar.gz" || { echo "build_service_for_device: $out is not git-ignored" >&2; exit 1; }
cat "$out/MANIFEST.txt"
du -sh "$out"
echo "carry: .device-build/service   run there: tools/device/run_service_gpu.sh"
