#!/usr/bin/env bash
# Builds the libFuzzer harness for the GGUF reader (clang, ASan + UBSan) into build/fuzz:
#   tests/fuzz/build.sh            then   build/fuzz/fuzz_gguf_reader CORPUS_DIR ...   (see tests/fuzz/README.md)
# Only the container and quant-type sources are compiled (the harness needs nothing else), with coverage
# instrumentation (-fsanitize=fuzzer-no-link); the harness alone links the libFuzzer driver.
set -euo pipefail
cd "$(dirname "$0")/../.."
CXX=${CXX:-clang++}
if ! command -v "$CXX" >/dev/null; then
  echo "tests/fuzz/build.sh: $CXX not found; install clang (Debian: apt-get install clang)" >&2
  exit 2
fi
dir=build/fuzz
mkdir -p "$dir/obj"
common=(-std=c++17 -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
        -Icpp/include -Icpp/src -DLOWBIT_HAVE_AVX2=1 -DLOWBIT_HAVE_AVX512=1 -DLOWBIT_ISAS_BUILT=\"generic,avx2,avx512\")
# clang <= 15 rejects __builtin_cpu_supports("f16c") (cpp/src/types.cpp uses it): there the runtime ISA
# checks answer "no" and the generic (reference) quantizers run.
if ! echo 'int main() { return __builtin_cpu_supports("f16c"); }' | "$CXX" -x c++ -fsyntax-only - 2>/dev/null; then
  common+=(-include "$PWD/tests/fuzz/cpu_compat.h")
fi
avx2=(-mavx2 -mfma -mf16c -mbmi2)
avx512=(-mavx512f -mavx512bw -mavx512vl -mavx512dq "${avx2[@]}")
avx512vnni=(-mavx512vnni "${avx512[@]}")
objs=()
compile() {  # source, extra flags...
  local src=$1; shift
  local obj="$dir/obj/$(basename "${src%.cpp}").o"
  if [ ! -f "$obj" ] || [ "$src" -nt "$obj" ] || [ cpp/include/lowbit/gguf.h -nt "$obj" ] ||
     [ cpp/include/lowbit/types.h -nt "$obj" ] || [ cpp/include/lowbit/qtypes.def -nt "$obj" ]; then
    "$CXX" "${common[@]}" -fsanitize=fuzzer-no-link "$@" -c "$src" -o "$obj"
  fi
  objs+=("$obj")
}
# The container, and the type registry with everything it links: the reference quantizers, the thread pool
# quantize() runs on, and the kernel tables whose row quantizers it dispatches to (each ISA with its flags).
compile cpp/src/gguf.cpp
for src in cpp/src/types.cpp cpp/src/quants_*.cpp cpp/src/threads.cpp cpp/src/cpu/dispatch.cpp \
           cpp/src/cpu/matmul.cpp cpp/src/cpu/*_generic.cpp; do
  compile "$src"
done
for src in cpp/src/cpu/*_avx2.cpp; do compile "$src" "${avx2[@]}"; done
for src in cpp/src/cpu/*_avx512.cpp; do compile "$src" "${avx512[@]}"; done
for src in cpp/src/cpu/*_avx512vnni.cpp; do compile "$src" "${avx512vnni[@]}"; done
"$CXX" "${common[@]}" -fsanitize=fuzzer -Itests/fuzz tests/fuzz/fuzz_gguf_reader.cpp "${objs[@]}" -lpthread \
  -o "$dir/fuzz_gguf_reader"
echo "built $dir/fuzz_gguf_reader"
