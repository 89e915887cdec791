#!/usr/bin/env bash
# Install a lowbit wheel into a fresh virtual environment whose PATH holds no C/C++ compiler and no CMake,
# with binary packages only, then run the demo from it. Prints the install time.
#
#   tools/check_wheel.sh dist/lowbit-*.whl
set -euo pipefail
wheel=$(realpath "$1")
py=${PYTHON:-python3}
venv=$(mktemp -d)/venv
"$py" -m venv "$venv"
# Nothing but the venv's own bin (and a directory with no tools) on PATH: no cc, c++, gcc, g++, cmake, nvcc.
export PATH="$venv/bin"
for tool in cc c++ gcc g++ clang cmake nvcc make; do
  if command -v "$tool" >/dev/null 2>&1; then echo "check_wheel: $tool is on PATH" >&2; exit 1; fi
done
now() { "$venv/bin/python" -c 'import time; print(time.time())'; }
start=$(now)
"$venv/bin/python" -m pip install -q --only-binary :all: "$wheel"
end=$(now)
echo "check_wheel: installed in $("$venv/bin/python" -c "print(round($end - $start, 1))") s"
"$venv/bin/python" -c 'import lowbit, lowbit._core as c; print("lowbit", lowbit.__version__, "kernels:", c.active_isa())'
"$venv/bin/lowbit" demo
