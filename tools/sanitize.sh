#!/usr/bin/env bash
# CI sanitizer job: builds the C++ core and tests/cpp/*.cpp with AddressSanitizer + UndefinedBehaviorSanitizer
# (and LeakSanitizer) into build/sanitize, makes a tiny F32 llama GGUF + transformers logits as the forward-pass
# oracle, and runs ctest. Exit status 0 only when every test passed and no sanitizer reported anything.
#   tools/sanitize.sh                  # full job (needs numpy, torch, transformers, gguf for the reference model)
#   LOWBIT_SANITIZE_NO_REFERENCE=1 tools/sanitize.sh   # skip the Python reference (C++-only machines)
set -uo pipefail
cd "$(dirname "$0")/.."
dir=build/sanitize
jobs=${JOBS:-2}
python=${PYTHON:-python3}
start=$(date +%s)

fail() { echo "sanitize: FAILED: $*" >&2; exit 1; }

mkdir -p build
echo "== configure + build ($dir, -j$jobs)"
if [ ! -f "$dir/CMakeCache.txt" ]; then
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOWBIT_SANITIZE=ON -DLOWBIT_TESTS=ON \
    -DLOWBIT_PYTHON=OFF -DLOWBIT_CUDA=OFF >"$dir.configure.log" 2>&1 || { cat "$dir.configure.log"; fail "cmake configure"; }
fi
cmake --build "$dir" -j"$jobs" >"$dir.build.log" 2>&1 || { tail -40 "$dir.build.log"; fail "build (log: $dir.build.log)"; }

ref_dir=$dir/reference
if [ "${LOWBIT_SANITIZE_NO_REFERENCE:-0}" != "1" ]; then
  echo "== reference model (tests/cpp/make_forward_reference.py)"
  mkdir -p "$ref_dir"
  "$python" tests/cpp/make_forward_reference.py "$ref_dir" >"$ref_dir/make.log" 2>&1 ||
    { cat "$ref_dir/make.log"; fail "could not write the reference model (set LOWBIT_SANITIZE_NO_REFERENCE=1 to skip)"; }
  export LOWBIT_TEST_MODEL=$PWD/$ref_dir/tiny-f32.gguf
  export LOWBIT_TEST_LOGITS=$PWD/$ref_dir/tiny-f32.logits
fi

echo "== ctest"
# halt_on_error / -fno-sanitize-recover: the first report ends the test with a non-zero status.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-}
export LOWBIT_TEST_CORRUPTIONS=${LOWBIT_TEST_CORRUPTIONS:-500}
(cd "$dir" && ctest --output-on-failure --timeout 600 -j1) | tee "$dir.ctest.log"
status=${PIPESTATUS[0]}

# A report that did not stop its test (it should have) still fails the job.
reports=$(grep -cE "ERROR: (Address|Leak)Sanitizer|runtime error:" "$dir.ctest.log" "$dir"/Testing/Temporary/LastTest.log 2>/dev/null |
          awk -F: '{s += $NF} END {print s + 0}')
echo
echo "== summary"
grep -E "^test_[a-z_]+: [0-9]+ checks|tests passed|tests failed|reference model:|truncations:|corruptions:" "$dir"/Testing/Temporary/LastTest.log 2>/dev/null | sed 's/^/  /'
grep -E "tests passed|tests failed" "$dir.ctest.log" | sed 's/^/  ctest: /'
grep -hE "^FAIL: |^SUMMARY: |runtime error:" "$dir"/Testing/Temporary/LastTest.log 2>/dev/null | sort -u | head -20 | sed 's/^/  /'
echo "  sanitizer reports: $reports; wall time $(( $(date +%s) - start )) s"
[ "$status" -eq 0 ] || fail "ctest exit status $status"
[ "$reports" -eq 0 ] || fail "$reports sanitizer report(s); see $dir.ctest.log"
echo "sanitize: OK"
