#!/usr/bin/env bash
# Cross-compile the generic + NEON kernels and tests/cpp/test_kernels.cpp for AArch64 and run them under
# qemu-user, once on a CPU with the dotprod extension and once without (the widening-multiply path).
# Needs: apt-get install -y g++-aarch64-linux-gnu qemu-user
set -euo pipefail
cd "$(dirname "$0")/../.."
CXX=${CXX:-aarch64-linux-gnu-g++}
QEMU=${QEMU:-qemu-aarch64}
command -v "$CXX" >/dev/null || { echo "missing $CXX: apt-get install -y g++-aarch64-linux-gnu" >&2; exit 2; }
command -v "$QEMU" >/dev/null || { echo "missing $QEMU: apt-get install -y qemu-user" >&2; exit 2; }
out=${OUT_DIR:-build/neon-qemu}
mkdir -p "$out"
flags=(-O2 -std=c++17 -Icpp/include -Icpp/src -DLOWBIT_HAVE_NEON=1 '-DLOWBIT_ISAS_BUILT="generic,neon"'
       -Wall -Wextra -Wno-unused-parameter)
pids=()
# The core's type registry (types.cpp + the reference quantizers), the dispatcher, the driver and every generic
# kernel file; then each NEON file with its own flags (*_neon.cpp as today's table, *_neondot.cpp with dotprod).
rm -f "$out"/*.o
for src in cpp/src/types.cpp cpp/src/quants_*.cpp cpp/src/threads.cpp cpp/src/cpu/dispatch.cpp cpp/src/cpu/matmul.cpp \
           cpp/src/cpu/*_generic.cpp tests/cpp/test_kernels.cpp; do
  "$CXX" "${flags[@]}" -c "$src" -o "$out/$(basename "$src" .cpp).o" &
  pids+=($!)
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for src in cpp/src/cpu/*_neon.cpp cpp/src/cpu/*_neondot.cpp; do
  [ -e "$src" ] || continue
  "$CXX" "${flags[@]}" -march=armv8.2-a+dotprod+fp16 -c "$src" -o "$out/$(basename "$src" .cpp).o"
done
for p in "${pids[@]}"; do wait "$p"; done
"$CXX" -static -pthread "$out"/*.o -o "$out/test_kernels"
echo "== qemu -cpu max (NEON + dotprod)"
"$QEMU" -cpu max "$out/test_kernels"
echo "== qemu -cpu cortex-a57 (NEON without dotprod)"
"$QEMU" -cpu cortex-a57 "$out/test_kernels"
