#!/usr/bin/env bash
# Configures and builds patchcore into ./build: the given targets (e.g. patchcore_cli), or everything (library,
# CLI, tests, benchmarks) when none are given.
# Usage: [BUILD_DIR=build] [BUILD_TYPE=Release] [JOBS=N] scripts/build.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" >/dev/null
targets=()
[ $# -gt 0 ] && targets=(--target "$@")
cmake --build "$BUILD_DIR" -j "${JOBS:-$(nproc)}" "${targets[@]}"
