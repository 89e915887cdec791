"""llama.cpp as a test oracle: its quantizers and dequantizers (libggml-base of the llama_cpp package, via ctypes),
and where its block layouts keep their scales, so tests can make random valid blocks of any block type.

`load()` gives a LlamaCpp or the reason there is none (llama_cpp not importable, library missing), so a test can
skip with that reason. Types are named by their lowbit.QType name, which is ggml's name.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

# Where each block type keeps its floating-point scales, as (numpy dtype, byte offset) per field
# (ggml-common.h; NF4 and FP4, whose blocks lowbit shares with bitsandbytes: spec/quant-types.md). Every other
# byte of a block holds codes, and any value of them is valid.
SCALE_FIELDS: dict[str, tuple[tuple[str, int], ...]] = {
    "Q4_0": (("<f2", 0),),
    "Q4_1": (("<f2", 0), ("<f2", 2)),
    "Q5_0": (("<f2", 0),),
    "Q5_1": (("<f2", 0), ("<f2", 2)),
    "Q8_0": (("<f2", 0),),
    "Q2_K": (("<f2", 80), ("<f2", 82)),
    "Q3_K": (("<f2", 108),),
    "Q4_K": (("<f2", 0), ("<f2", 2)),
    "Q5_K": (("<f2", 0), ("<f2", 2)),
    "Q6_K": (("<f2", 208),),
    "Q8_K": (("<f4", 0),),
    "IQ4_NL": (("<f2", 0),),
    "IQ4_XS": (("<f2", 0),),
    "NF4": (("<f4", 0),),
    "FP4": (("<f4", 0),),
}

# Scale values every random set of blocks starts with: zeros of both signs, the smallest subnormal, one, and
# the largest finite magnitude of each sign (per dtype, as bit patterns).
_EXTREME_BITS = {
    "<f2": np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x3C00, 0x7BFF, 0xFBFF, 0x0400], np.uint16),
    "<f4": np.array([0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x3F800000, 0x7F7FFFFF, 0xFF7FFFFF,
                     0x00800000], np.uint32),
}


def random_blocks(name: str, type_size: int, n_blocks: int, rng: np.random.Generator,
                  scales: str = "any") -> np.ndarray:
    """(n_blocks, type_size) uint8 blocks of type `name`: random codes, finite scales.

    scales="any": any finite bit pattern (subnormals and the largest values included), the first blocks
    taking the extremes above; scales="moderate": fp16 fields ~ N(0, 0.02), fp32 fields |N(0, 0.1)|, so
    products of many blocks stay in the range a matmul test can bound.
    """
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for dtype, off in SCALE_FIELDS[name]:
        width = np.dtype(dtype).itemsize
        if scales == "moderate":
            if width == 2:
                vals = (rng.standard_normal(n_blocks) * 0.02).astype(np.float16)
            else:
                vals = np.abs(rng.standard_normal(n_blocks) * 0.1).astype(np.float32)
        else:
            utype = np.uint16 if width == 2 else np.uint32
            exp_mask = 0x7C00 if width == 2 else 0x7F800000
            bits = rng.integers(0, 1 << (8 * width), size=n_blocks, dtype=np.uint64).astype(utype)
            bits = np.where((bits & exp_mask) == exp_mask, bits & ~utype(exp_mask), bits).astype(utype)
            extremes = _EXTREME_BITS[dtype][:n_blocks]
            bits[:extremes.size] = extremes
            vals = bits
        raw[:, off:off + width] = np.ascontiguousarray(vals).view(np.uint8).reshape(n_blocks, width)
    return raw


# ggml_quantize_chunk has no case for these (it aborts the process): quantize_row_<stem>_ref quantizes them.
# Q8_K is the activation type of ggml's K-quant dot products, never a tensor type llama-quantize writes.
ROW_REF_ONLY = frozenset({"Q8_K"})


def ggml_stem(name: str) -> str:
    """ggml's lowercase stem of a type's C names: Q4_K -> q4_K, IQ4_NL -> iq4_nl (the K stays upper case)."""
    stem = name.lower()
    return stem[:-2] + "_K" if stem.endswith("_k") else stem


class LlamaCpp:
    """ctypes bindings of the few libggml-base entry points the tests call."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.lib = lib
        self.path = path
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_type_size.restype = ctypes.c_size_t
        lib.ggml_type_size.argtypes = [ctypes.c_int]
        lib.ggml_blck_size.restype = ctypes.c_int64
        lib.ggml_blck_size.argtypes = [ctypes.c_int]

    def type_size(self, type_id: int) -> int:
        return int(self.lib.ggml_type_size(type_id))

    def block_size(self, type_id: int) -> int:
        return int(self.lib.ggml_blck_size(type_id))

    def _row_fn(self, symbol: str):
        fn = getattr(self.lib, symbol)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        return fn

    def quantize(self, x: np.ndarray, name: str, type_id: int) -> np.ndarray:
        """(rows, n) float32 -> (rows, row bytes) uint8, as llama-quantize writes them (no importance matrix)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n = x.shape
        out = np.zeros((rows, n // self.block_size(type_id) * self.type_size(type_id)), np.uint8)
        if name in ROW_REF_ONLY:
            self._row_fn(f"quantize_row_{ggml_stem(name)}_ref")(x.ctypes.data, out.ctypes.data, x.size)
        else:
            written = self.lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, rows, n, None)
            assert written == out.nbytes, f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}"
        return out

    def dequantize(self, raw: np.ndarray, name: str, n: int) -> np.ndarray:
        """Blocks of a ggml block type -> n float32, through dequantize_row_<stem>."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.empty(n, np.float32)
        self._row_fn(f"dequantize_row_{ggml_stem(name)}")(raw.ctypes.data, out.ctypes.data, n)
        return out


def load() -> tuple[LlamaCpp | None, str]:
    """(oracle, "") or (None, why there is none)."""
    try:
        import llama_cpp
    except Exception as e:  # noqa: BLE001 - any import failure means no oracle, and the reason is reported
        return None, f"llama_cpp is not importable ({type(e).__name__}: {e}); pip install llama-cpp-python"
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*"))
    if not candidates:
        return None, f"llama_cpp at {lib_dir.parent} ships no libggml-base shared library"
    try:
        lib = ctypes.CDLL(str(candidates[0]))
        return LlamaCpp(lib, candidates[0]), ""
    except (OSError, AttributeError) as e:
        return None, f"cannot use {candidates[0]}: {e}"
