#!/usr/bin/env bash
# The main job on a fresh machine: install the Debian packages, build, fit PatchCore on the tire data
# with the shared ResNet-18 weights, then evaluate it and print the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh patchcore_cli
SHARED=${PATCHCORE_SHARED:-../shared}
DATA=${DATA:-$SHARED/data/tire}
WEIGHTS=${WEIGHTS:-$SHARED/weights/resnet18-imagenet-stem-to-layer3.pth}
OUT=${OUT:-out}
build/patchcore fit --data "$DATA" --weights "$WEIGHTS" --out "$OUT/model"
build/patchcore evaluate --model "$OUT/model" --data "$DATA" --out "$OUT/report" --json "$OUT/metrics.json"
