# Sourced by scripts/sanitize.sh and scripts/fuzz.sh: both use one clang build in ./build-sanitize (library,
# CLI, tests and libFuzzer targets, all with AddressSanitizer, UndefinedBehaviorSanitizer and libFuzzer's
# coverage hooks), and the same sanitizer settings. sanitized_build TARGET... builds those targets (all
# when none are given).
bash scripts/install-deps.sh --fuzz
BUILD_DIR=${BUILD_DIR:-build-sanitize}
sanitized_build() {
  # -O1: the usual level for sanitizer builds, which spend most of their time compiling.
  # -g1: line tables for readable reports without the full debug info of every libtorch header.
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="${FUZZ_CXX:-clang++-14}" \
    -DCMAKE_CXX_FLAGS_RELEASE="-O1 -DNDEBUG" -DCMAKE_CXX_FLAGS=-g1 -DPATCHCORE_FUZZ=ON \
    -DPATCHCORE_BUILD_BENCHMARKS=OFF >/dev/null
  local targets=()
  [ $# -gt 0 ] && targets=(--target "$@")
  cmake --build "$BUILD_DIR" -j "${JOBS:-$(nproc)}" "${targets[@]}"
}
symbolizer=/usr/lib/llvm-14/bin/llvm-symbolizer
[ -x "$symbolizer" ] && export ASAN_SYMBOLIZER_PATH="$symbolizer"
# A report is a failure, never a warning that scrolls by.
export ASAN_OPTIONS="abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export LSAN_OPTIONS="suppressions=$PWD/scripts/lsan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
