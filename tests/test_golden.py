"""spec/golden vectors, made once by independent oracles (gguf.quants, bitsandbytes, llama.cpp's own quantizer
through spec/golden/make_golden_kquants.py): lowbit reproduces every one byte for byte, and dequantizes them as
the oracles do (the numpy oracle written from the spec where it has the type, gguf-py otherwise)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import lowbit
from lowbit.quants import QType

import oracle

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "spec" / "golden"
GOLDEN = sorted(GOLDEN_DIR.glob("*.json")) + sorted(GOLDEN_DIR.glob("kquants/*.json"))


def _cases() -> list[tuple[Path, str]]:
    out = []
    for path in GOLDEN:
        rec = json.loads(path.read_text())
        out += [(path, t) for t in rec if t != "input_f32_hex"]
    return out


CASES = _cases()


def test_golden_files_exist():
    assert len(GOLDEN) >= 6
    # Every K-quant has llama.cpp-made vectors, the legacy types gguf-py-made ones.
    kinds = {t for _, t in CASES}
    assert {"Q8_0", "Q4_0", "Q4_1", "NF4", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"} <= kinds


def _oracle_dequantize(t: str, data: np.ndarray, n: int) -> np.ndarray:
    if t in oracle.DEQUANTIZE:
        return oracle.DEQUANTIZE[t](data, n)
    if t == "Q8_K":  # gguf-py has no Q8_K: float32 d, 256 int8, 16 int16 sums; x = d * q
        blocks = data.reshape(-1, 292)
        d = blocks[:, :4].copy().view(np.float32)
        q = blocks[:, 4:260].view(np.int8).astype(np.float32)
        return (d * q).reshape(-1)[:n]
    import gguf

    return np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[t]), dtype=np.float32).reshape(-1)[:n]


@pytest.mark.parametrize("path,t", CASES, ids=[f"{p.parent.name}/{p.stem}-{t}" for p, t in CASES])
def test_golden(path, t):
    rec = json.loads(path.read_text())
    x = np.frombuffer(bytes.fromhex(rec["input_f32_hex"]), dtype=np.float32)
    want = np.frombuffer(bytes.fromhex(rec[t]), dtype=np.uint8)
    assert np.array_equal(lowbit.quantize(x, QType[t]), want)
    if t in oracle.QUANTIZE:
        assert np.array_equal(oracle.QUANTIZE[t](x), want)
    back = lowbit.dequantize(want, QType[t], x.shape)
    assert np.array_equal(back, _oracle_dequantize(t, want, x.size))
