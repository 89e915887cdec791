#!/usr/bin/env bash
# Cross-compile the generic + NEON kernels with tests/cpp/test_kernels.cpp and tests/cpp/test_kernels_more.cpp for
# AArch64 and run both under qemu-user, once on a CPU with the dotprod extension and once without (where the
# dispatcher picks the table of cpu/kernels_neon.cpp, compiled without dotprod).
# Needs: apt-get install -y g++-aarch64-linux-gnu qemu-user. JOBS (default 2): parallel compiles.
set -euo pipefail
cd "$(dirname "$0")/../.."
CXX=${CXX:-aarch64-linux-gnu-g++}
QEMU=${QEMU:-qemu-aarch64}
JOBS=${JOBS:-2}
command -v "$CXX" >/dev/null || { echo "missing $CXX: apt-get install -y g++-aarch64-linux-gnu" >&2; exit 2; }
command -v "$QEMU" >/dev/null || { echo "missing $QEMU: apt-get install -y qemu-user" >&2; exit 2; }
out=${OUT_DIR:-build/neon-qemu}
mkdir -p "$out/core" "$out/tests"
flags=(-O2 -std=c++17 -Icpp/include -Icpp/src -DLOWBIT_HAVE_NEON=1 '-DLOWBIT_ISAS_BUILT="generic,neon"'
       -Wall -Wextra -Wno-unused-parameter)
# One file per instruction set, as CMakeLists.txt builds them: *_neon.cpp without dotprod, *_neondot.cpp with it.
neon_flags=(-march=armv8.2-a+fp16)
neondot_flags=(-march=armv8.2-a+dotprod+fp16)
rm -f "$out"/core/*.o "$out"/tests/*.o
pids=()
compile() {  # compile SRC OBJ [extra flags...]
  local src=$1 obj=$2
  shift 2
  "$CXX" "${flags[@]}" "$@" -c "$src" -o "$obj" &
  pids+=($!)
  if [ ${#pids[@]} -ge "$JOBS" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
}
# The core's type registry (types.cpp + the reference quantizers), the dispatcher, the driver, every generic
# kernel file and every NEON file; then the two tests.
for src in cpp/src/types.cpp cpp/src/quants_*.cpp cpp/src/threads.cpp cpp/src/cpu/dispatch.cpp cpp/src/cpu/matmul.cpp \
           cpp/src/cpu/*_generic.cpp; do
  compile "$src" "$out/core/$(basename "$src" .cpp).o"
done
for src in cpp/src/cpu/*_neon.cpp; do compile "$src" "$out/core/$(basename "$src" .cpp).o" "${neon_flags[@]}"; done
for src in cpp/src/cpu/*_neondot.cpp; do
  compile "$src" "$out/core/$(basename "$src" .cpp).o" "${neondot_flags[@]}"
done
tests=(test_kernels test_kernels_more)
for t in "${tests[@]}"; do compile "tests/cpp/$t.cpp" "$out/tests/$t.o"; done
for p in "${pids[@]}"; do wait "$p"; done
for t in "${tests[@]}"; do "$CXX" -static -pthread "$out"/core/*.o "$out/tests/$t.o" -o "$out/$t"; done
for t in "${tests[@]}"; do
  echo "== $t: qemu -cpu max (NEON + dotprod)"
  "$QEMU" -cpu max "$out/$t"
  echo "== $t: qemu -cpu cortex-a57 (NEON without dotprod)"
  "$QEMU" -cpu cortex-a57 "$out/$t"
done
