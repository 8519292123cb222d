#!/usr/bin/env bash
# Checks the build as its users receive it. Installs it into a temporary prefix, then builds and runs
# tests/package/consumer against that prefix with find_package(patchcore); configures tests/package/subproject,
# which adds the source tree with add_subdirectory (not built: that is the library's build again); builds the
# Debian package with cpack, checks that its Depends are installed here, unpacks it into a temporary root and runs
# the CLI and imports the Python module from there.
# Usage: scripts/test_package.sh [BUILD_DIR]   (default: build, already built by scripts/build.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=$(realpath "${1:-${BUILD_DIR:-build}}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== find_package(patchcore) from an installed tree"
cmake --install "$build_dir" --prefix "$work/prefix" >/dev/null
cmake -S tests/package/consumer -B "$work/consumer" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/consumer" >/dev/null
"$work/consumer/consumer"

echo "== add_subdirectory(patchcore): configures alone, adds no tests"
cmake -S tests/package/subproject -B "$work/subproject" -G Ninja -DPATCHCORE_SOURCE_DIR="$PWD" >/dev/null
echo ok

echo "== the Debian package"
(cd "$build_dir" && cpack -G DEB -B "$work/deb" >/dev/null)
deb=$(echo "$work"/deb/*.deb)
depends=$(dpkg-deb --field "$deb" Depends)
echo "Depends: $depends"
# dpkg-checkbuilddeps checks a dependency list, versions and alternatives included, against what is installed.
printf 'Source: patchcore-depends\n\nPackage: patchcore-depends\nArchitecture: any\n' >"$work/control"
dpkg-checkbuilddeps -d "$depends" "$work/control"
dpkg -x "$deb" "$work/root"
"$work/root/usr/bin/patchcore" --version
PYTHONPATH="$work/root/usr/lib/python3/dist-packages" "${PYTHON:-/usr/bin/python3}" -c "
import sys, patchcore
assert patchcore.__file__.startswith('$work/root/'), patchcore.__file__
print('import patchcore:', patchcore.__version__, 'from the package')"
