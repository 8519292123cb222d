#!/usr/bin/env bash
# Builds the libFuzzer targets (the build scripts/sanitize.sh uses, so after it nothing is rebuilt),
# replays every saved regression input, then fuzzes each target for SECONDS (default 60)
# starting from its seed corpus. Fails on any crash, sanitizer report, leak, timeout or out-of-memory.
# Usage: [FUZZ_SEED=N] scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-60}
# A fixed seed by default, so that CI explores the same inputs each run; FUZZ_SEED=0 draws a new one.
FUZZ_SEED=${FUZZ_SEED:-1}
TARGETS=(fuzz_checkpoint fuzz_image fuzz_model_dir)
source scripts/sanitized_build.sh
sanitized_build "${TARGETS[@]}"
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
  "$binary" "${LIMITS[@]}" "${dict[@]}" -seed="$FUZZ_SEED" -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "$scratch" "fuzz/corpus/$target"
done
