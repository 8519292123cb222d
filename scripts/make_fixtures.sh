#!/usr/bin/env bash
# Regenerates every golden fixture under tests/fixtures with Debian's python3 packages
# (python3-torch, python3-torchvision, python3-scipy, python3-faiss, python3-sklearn).
# The fixtures are committed; run this only when a generator changes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --fixtures
PY=${PYTHON:-/usr/bin/python3}
for script in scripts/fixtures/make_*.py; do
  echo "== $script"
  "$PY" "$script" tests/fixtures
done
