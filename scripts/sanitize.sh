#!/usr/bin/env bash
# Builds the library, the CLI and the whole test suite with clang, AddressSanitizer and
# UndefinedBehaviorSanitizer (see scripts/sanitized_build.sh) and runs ctest there: every test and every
# fuzz replay. Any sanitizer report fails its test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/sanitized_build.sh
sanitized_build
cd "$BUILD_DIR"
ctest --output-on-failure -j "${JOBS:-2}" --timeout 3600
