#!/usr/bin/env bash
# Build the C++ core and lowbit._core into build/dev-NAME for running from the source tree:
#   tools/dev_build.sh NAME [extra cmake args]   then
#   LOWBIT_CORE_DIR=build/dev-NAME PYTHONPATH=python pytest tests/...
set -euo pipefail
name=${1:-default}; shift || true
cd "$(dirname "$0")/.."
dir=build/dev-$name
if [ ! -f "$dir/CMakeCache.txt" ]; then
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOWBIT_CUDA=${LOWBIT_CUDA:-OFF} \
    -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" "$@" >/dev/null
fi
cmake --build "$dir" -j2
