#!/usr/bin/env bash
# Builds everything and runs the whole test suite: ctest, then the installed CMake package
# (scripts/test_package.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
build_dir=${BUILD_DIR:-build}
(cd "$build_dir" && ctest --output-on-failure -j "${JOBS:-2}" --timeout 1800)
scripts/test_package.sh "$build_dir"
