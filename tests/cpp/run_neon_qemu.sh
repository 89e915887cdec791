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
for src in cpp/src/threads.cpp cpp/src/cpu/dispatch.cpp cpp/src/cpu/matmul.cpp cpp/src/cpu/kernels_generic.cpp \
           tests/cpp/test_kernels.cpp; do
  "$CXX" "${flags[@]}" -c "$src" -o "$out/$(basename "$src" .cpp).o" &
  pids+=($!)
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
"$CXX" "${flags[@]}" -march=armv8.2-a+dotprod+fp16 -c cpp/src/cpu/kernels_neon.cpp -o "$out/kernels_neon.o"
for p in "${pids[@]}"; do wait "$p"; done
"$CXX" -static -pthread "$out"/*.o -o "$out/test_kernels"
echo "== qemu -cpu max (NEON + dotprod)"
"$QEMU" -cpu max "$out/test_kernels"
echo "== qemu -cpu cortex-a57 (NEON without dotprod)"
"$QEMU" -cpu cortex-a57 "$out/test_kernels"
