"""Regenerate spec/golden/kquants/*.json from llama.cpp's own K-quant reference quantizers; run once, commit.

The oracle is llama.cpp's ggml base library (libggml-base.so, e.g. from a llama-cpp-python wheel), loaded
with ctypes; its quantize_row_q{2..6,8}_K_ref are what llama-quantize runs without an importance matrix.
Give the library path as the first argument or in the environment variable LOWBIT_GGML_BASE:

    LOWBIT_GGML_BASE=/path/to/libggml-base.so python spec/golden/make_golden_kquants.py

Each file holds 512 float32 inputs (two super-blocks) and the bytes of every K type, as hex:
{"input_f32_hex": ..., "Q2_K": ..., "Q3_K": ..., "Q4_K": ..., "Q5_K": ..., "Q6_K": ..., "Q8_K": ...}.
tests/cpp/test_quants_k.cpp checks lowbit's quantizers against them (spec/quant-types.md#k-quants).
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

import numpy as np

QK_K = 256
# name -> (ggml function suffix, bytes per super-block)
TYPES = {
    "Q2_K": ("q2_K", 84),
    "Q3_K": ("q3_K", 110),
    "Q4_K": ("q4_K", 144),
    "Q5_K": ("q5_K", 176),
    "Q6_K": ("q6_K", 210),
    "Q8_K": ("q8_K", 292),
}


def inputs() -> dict[str, np.ndarray]:
    n = 2 * QK_K
    # Hand-checkable: steps of 1/32 from -8 to just under 8 (every value exact in fp32).
    ramp = (np.arange(n, dtype=np.float32) - 256) / np.float32(32)
    normal = np.random.default_rng(2024).standard_normal(n).astype(np.float32)
    # Normal data with one large value (sign alternating, 20..35) in every 32-element group.
    outlier = np.random.default_rng(7).standard_normal(n).astype(np.float32)
    for g in range(n // 32):
        outlier[32 * g + (7 * g) % 32] = np.float32((20 + g) * (1 if g % 2 == 0 else -1))
    return {"normal": normal, "ramp": ramp, "outlier": outlier}


def library_path() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    path = os.environ.get("LOWBIT_GGML_BASE")
    if not path:
        sys.exit("give the path of llama.cpp's libggml-base.so as the first argument or in LOWBIT_GGML_BASE")
    return path


def main() -> None:
    lib = ctypes.CDLL(library_path())
    out = Path(__file__).parent / "kquants"
    out.mkdir(exist_ok=True)
    for name, x in inputs().items():
        x = np.ascontiguousarray(x, dtype=np.float32)
        rec: dict[str, str] = {"input_f32_hex": x.tobytes().hex()}
        for tname, (suffix, block_bytes) in TYPES.items():
            fn = getattr(lib, f"quantize_row_{suffix}_ref")
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            fn.restype = None
            # Zero-filled: Q8_K leaves bsums unwritten for an all-zero block (none here, but be safe).
            buf = np.zeros(x.size // QK_K * block_bytes, dtype=np.uint8)
            fn(x.ctypes.data, buf.ctypes.data, x.size)
            rec[tname] = buf.tobytes().hex()
        (out / f"{name}.json").write_text(json.dumps(rec, indent=1) + "\n")
        print(f"wrote {out / f'{name}.json'}")


if __name__ == "__main__":
    main()
