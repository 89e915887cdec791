"""Regenerate spec/golden/*.json from the independent oracles (gguf.quants, bitsandbytes, llama.cpp); run once, commit.

Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/F16/BF16 come from gguf.quants (llama.cpp's gguf-py), NF4 and FP4 from
bitsandbytes.functional.quantize_4bit (blocksize 64; stored as the float32 absmax bytes then the packed
codes). IQ4_NL has no gguf-py quantizer: it comes from llama.cpp's own quantizer (quantize_iq4_nl through
ggml_quantize_chunk, no importance matrix) in its ggml base library, loaded with ctypes. Give the library
path as the first argument or in LOWBIT_GGML_BASE; without it IQ4_NL is left out (with a message):

    LOWBIT_GGML_BASE=/path/to/libggml-base.so python spec/golden/make_golden.py
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

import numpy as np

GGML_TYPE_IQ4_NL = 20
IQ4_NL_BLOCK_BYTES = 18


def inputs() -> dict[str, np.ndarray]:
    ramp = (np.arange(64, dtype=np.float32) - 31) / np.float32(4)  # hand-checkable: quarter steps
    ties = np.concatenate([np.arange(-8, 8, 0.5, dtype=np.float32), np.arange(-16, 16, dtype=np.float32)])
    rng = np.random.default_rng(2024)
    return {"ramp": ramp, "ties": ties, "normal": rng.standard_normal(64).astype(np.float32)}


def ggml_base() -> ctypes.CDLL | None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LOWBIT_GGML_BASE")
    if not path:
        print("IQ4_NL skipped: give the path of llama.cpp's libggml-base.so as the first argument "
              "or in LOWBIT_GGML_BASE to include it", file=sys.stderr)
        return None
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    return lib


def iq4_nl_llama(lib: ctypes.CDLL, x: np.ndarray) -> bytes:
    x = np.ascontiguousarray(x, dtype=np.float32)
    buf = np.zeros(x.size // 32 * IQ4_NL_BLOCK_BYTES, dtype=np.uint8)
    lib.ggml_quantize_chunk(GGML_TYPE_IQ4_NL, x.ctypes.data, buf.ctypes.data, 0, 1, x.size, None)
    return buf.tobytes()


def bnb_4bit(x: np.ndarray, quant_type: str) -> bytes:
    import torch
    import bitsandbytes.functional as F

    packed, st = F.quantize_4bit(torch.from_numpy(x.copy()), blocksize=64, quant_type=quant_type)
    return st.absmax.numpy().astype(np.float32).tobytes() + packed.numpy().tobytes()


def main() -> None:
    import gguf
    from gguf import GGMLQuantizationType as G

    lib = ggml_base()
    out = Path(__file__).parent
    for name, x in inputs().items():
        rec: dict[str, object] = {"input_f32_hex": x.tobytes().hex()}
        for t in ("Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "Q5_0", "Q5_1"):
            q = np.ascontiguousarray(gguf.quants.quantize(x.reshape(1, -1), G[t])).view(np.uint8).reshape(-1)
            rec[t] = q.tobytes().hex()
        if lib is not None:
            rec["IQ4_NL"] = iq4_nl_llama(lib, x).hex()
        rec["FP4"] = bnb_4bit(x, "fp4").hex()
        # NF4 stays the last key, as in the first version of these files.
        rec["NF4"] = bnb_4bit(x, "nf4").hex()
        (out / f"{name}.json").write_text(json.dumps(rec, indent=1) + "\n")
        print(f"wrote {out / f'{name}.json'}")


if __name__ == "__main__":
    main()
