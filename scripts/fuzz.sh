#!/usr/bin/env bash
# Builds the libFuzzer targets (PATCHCORE_FUZZ, clang, library instrumented with ASan+UBSan) into
# ./build-fuzz, replays every saved regression input, then fuzzes each target for SECONDS (default 60)
# starting from its seed corpus. Fails on any crash, sanitizer report, leak, timeout or out-of-memory.
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --fuzz
SECONDS_PER_TARGET=${1:-60}
BUILD_DIR=${BUILD_DIR:-build-fuzz}
TARGETS=(fuzz_checkpoint fuzz_image fuzz_model_dir)
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="${FUZZ_CXX:-clang++-14}" \
  -DCMAKE_CXX_FLAGS=-g1 -DPATCHCORE_FUZZ=ON -DPATCHCORE_BUILD_TESTS=OFF -DPATCHCORE_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build "$BUILD_DIR" -j "${JOBS:-$(nproc)}" --target "${TARGETS[@]}"

symbolizer=/usr/lib/llvm-14/bin/llvm-symbolizer
[ -x "$symbolizer" ] && export ASAN_SYMBOLIZER_PATH="$symbolizer"
export ASAN_OPTIONS="abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export LSAN_OPTIONS="suppressions=$PWD/scripts/lsan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
# Limits per input: a loader that needs more than this for a small file has a size check missing.
LIMITS=(-timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048)

for target in "${TARGETS[@]}"; do
  binary="$BUILD_DIR/$target"
  artifacts="$BUILD_DIR/artifacts/$target"
  mkdir -p "$artifacts"
  dict=()
  [ -f "fuzz/$target.dict" ] && dict=(-dict="fuzz/$target.dict")
  regressions=(fuzz/regressions/"$target"/*)
  if [ -e "${regressions[0]}" ]; then
    echo "== $target: replaying ${#regressions[@]} regression input(s)"
    "$binary" "${LIMITS[@]}" -artifact_prefix="$artifacts/" "${regressions[@]}"
  fi
  # New inputs go to a scratch folder; the committed seeds stay as they are.
  scratch="$BUILD_DIR/corpus/$target"
  mkdir -p "$scratch"
  echo "== $target: fuzzing for ${SECONDS_PER_TARGET}s"
  "$binary" "${LIMITS[@]}" "${dict[@]}" -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "$scratch" "fuzz/corpus/$target"
done
