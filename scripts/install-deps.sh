#!/usr/bin/env bash
# Installs the build and run-time dependencies from Debian's packages (needs root).
# With --fixtures, also the Python packages that scripts/make_fixtures.sh uses to write golden files.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config zlib1g-dev
  libtorch-dev libfaiss-dev libopencv-dev libopenblas0-openmp libopenblas-openmp-dev
  nlohmann-json3-dev libcli11-dev libspdlog-dev libgtest-dev libbenchmark-dev
)
if [ "${1:-}" = "--fixtures" ]; then
  packages+=(python3-numpy python3-torch python3-torchvision python3-scipy python3-faiss python3-sklearn python3-pil)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
