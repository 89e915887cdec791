// Forced include for the fuzz build on clang versions whose __builtin_cpu_supports rejects "f16c":
// every runtime ISA check answers "no", so the core runs its generic (reference) paths under the fuzzer.
#pragma once
#define __builtin_cpu_supports(feature) 0
