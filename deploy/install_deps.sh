#!/usr/bin/env bash
# Installs the Debian 12 packages Unshackle builds and tests with. Idempotent: installs
# only what is missing, and runs apt-get update only when something is.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libgtest-dev libgmock-dev googletest libbenchmark-dev
  nlohmann-json3-dev libfmt-dev libspdlog-dev libcli11-dev
  libopenblas-dev libsentencepiece-dev libpcre2-dev
  libopenmpi-dev openmpi-bin
  libboost1.81-dev libboost-json1.81-dev prometheus-cpp-dev libsystemd-dev
  prometheus curl python3 python3-yaml shellcheck systemd procps
  clang-14 libclang-rt-14-dev llvm-14 ccache  # tests/fuzz: libFuzzer, sanitizers, llvm-symbolizer
)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "install_deps: all ${#packages[@]} packages present"
  exit 0
fi
echo "install_deps: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
