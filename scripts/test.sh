#!/usr/bin/env bash
# Builds everything and runs the whole test suite: ctest, then the Python module's tests with pytest (the
# published code's own test_common.py among them), then the installed CMake package and the Debian package
# (scripts/test_package.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
build_dir=${BUILD_DIR:-build}
(cd "$build_dir" && ctest --output-on-failure -j "${JOBS:-2}" --timeout 1800)

# Debian's interpreter, which has the python3-* packages, even where another python3 comes first on PATH.
python=${PYTHON:-/usr/bin/python3}
python_tests=(tests/python)
published_tests=../shared/reference/tests/test_common.py
if [ -f "$published_tests" ]; then
  python_tests+=("$published_tests")
else
  echo "test.sh: $published_tests is absent; the published test suite is not run" >&2
fi
# pytest's exit status 5 (no tests collected) fails this script like any other failure: here it can only mean
# that the tests went missing. Tests that lack ../shared or python3-torch are collected and skipped, with a reason.
# No bytecode files: they would land in ../shared beside the published code.
PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$(realpath "$build_dir")/python" \
  "$python" -m pytest -p no:cacheprovider -q -rs "${python_tests[@]}"

PYTHON=$python scripts/test_package.sh "$build_dir"
