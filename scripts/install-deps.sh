#!/usr/bin/env bash
# Installs the build and run-time dependencies from Debian's packages (needs root).
# --fixtures adds the Python packages that scripts/make_fixtures.sh uses to write golden files and that the
# published code needs to run as the Python tests' oracle (tests/python skips those tests without them); --fuzz adds
# clang and its sanitizer runtimes for scripts/fuzz.sh. Both may be given.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config zlib1g-dev
  libtorch-dev libfaiss-dev libopencv-dev libopenblas0-openmp libopenblas-openmp-dev
  nlohmann-json3-dev libcli11-dev libspdlog-dev libgtest-dev libbenchmark-dev chromium
  python3-dev pybind11-dev python3-numpy python3-pytest
  libcpp-httplib-dev python3-yaml
)
for option in "$@"; do
  case "$option" in
    --fixtures) packages+=(python3-numpy python3-torch python3-torchvision python3-scipy python3-faiss python3-sklearn python3-pil python3-tqdm) ;;
    --fuzz) packages+=(clang-14 libclang-rt-14-dev libomp-14-dev llvm-14) ;;
    *) echo "install-deps.sh: unknown option $option (use --fixtures and/or --fuzz)" >&2; exit 2 ;;
  esac
done
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
