#!/usr/bin/env bash
# Builds the library, the CLI and the whole test suite with AddressSanitizer and UndefinedBehaviorSanitizer
# (PATCHCORE_SANITIZE) into ./build-asan and runs ctest there; any sanitizer report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-asan}
# -g1: line tables for readable reports without the full debug info of every libtorch header.
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS=-g1 \
  -DPATCHCORE_SANITIZE=ON -DPATCHCORE_BUILD_BENCHMARKS=OFF "$@" >/dev/null
cmake --build "$BUILD_DIR" -j "${JOBS:-$(nproc)}"
# halt_on_error/abort: a report is a failed test, never a warning that scrolls by.
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export LSAN_OPTIONS="suppressions=$PWD/scripts/lsan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
cd "$BUILD_DIR"
ctest --output-on-failure -j "${JOBS:-2}" --timeout 3600
