"""spec/golden vectors (made once from gguf.quants / bitsandbytes): the C++ path and the numpy oracle reproduce them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import lowbit
from lowbit.quants import QType

import oracle

GOLDEN = sorted((Path(__file__).resolve().parent.parent / "spec" / "golden").glob("*.json"))
TYPES = ["Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "NF4"]


def test_golden_files_exist():
    assert len(GOLDEN) >= 3


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
@pytest.mark.parametrize("t", TYPES)
def test_golden(path, t):
    rec = json.loads(path.read_text())
    x = np.frombuffer(bytes.fromhex(rec["input_f32_hex"]), dtype=np.float32)
    want = np.frombuffer(bytes.fromhex(rec[t]), dtype=np.uint8)
    assert np.array_equal(lowbit.quantize(x, QType[t]), want)
    assert np.array_equal(oracle.QUANTIZE[t](x), want)
    back = lowbit.dequantize(want, QType[t], x.shape)
    assert np.array_equal(back, oracle.DEQUANTIZE[t](want, x.size))
