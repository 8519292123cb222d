#!/usr/bin/env bash
# Checks the build as its users receive it: installs it into a temporary prefix, then builds and runs
# tests/package/consumer against that prefix with find_package(patchcore).
# Usage: scripts/test_package.sh [BUILD_DIR]   (default: build, already built by scripts/build.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=$(realpath "${1:-${BUILD_DIR:-build}}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== find_package(patchcore) from an installed tree"
cmake --install "$build_dir" --prefix "$work/prefix" >/dev/null
cmake -S tests/package/consumer -B "$work/consumer" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/consumer" >/dev/null
"$work/consumer/consumer"
