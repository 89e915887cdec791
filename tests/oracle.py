"""Numpy reference oracles for every lowbit quant type, written from spec/quant-types.md (not from our C++).

Other tests import these: quantize_*(x) -> packed uint8 bytes, dequantize_*(bytes, n) -> float32.
"""
from __future__ import annotations

import numpy as np

# bitsandbytes get_4bit_type("nf4"), as float32
NF4_CODES = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)


def dynamic_codes() -> np.ndarray:
    """bitsandbytes create_dynamic_map(signed=True), rebuilt from its definition (float32, ascending).

    The linspace must be torch's (its fp32 rounding differs from numpy's in 22 of the 256 codes).
    """
    import torch

    max_exp, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exp):
        fraction_items = 2 ** (i + non_sign_bits - max_exp) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10 ** (-(max_exp - 1) + i) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    return np.sort(np.array(data, dtype=np.float32))


def _blocks(x: np.ndarray, bs: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    assert x.size % bs == 0
    return x.reshape(-1, bs)


def _to_u8(v: np.ndarray) -> np.ndarray:
    """float -> integer the way x86 truncates: non-finite becomes 0 (INT32_MIN's low byte)."""
    out = np.zeros(v.shape, dtype=np.int64)
    ok = np.isfinite(v) & (np.abs(v) < 2**31)
    out[ok] = np.trunc(v[ok]).astype(np.int64)
    return (out & 0xFF).astype(np.uint8)


def fp16_bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    n = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = np.where(nan, (n & 0xFFFF0000) | (64 << 16), n)
    return ((n + 0x7FFF + ((n >> 16) & 1)) >> 16).astype(np.uint16)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    b = _blocks(x, 32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    with np.errstate(invalid="ignore"):
        v = (b * idv).astype(np.float32)
        a = np.abs(v)
        f = np.floor(a)
        r = np.sign(v) * (f + np.floor(np.float32(2) * (a - f)))  # round half away from zero
    qs = _to_u8(r.astype(np.float32))
    return np.concatenate([fp16_bits(d).view(np.uint8).reshape(-1, 2), qs], axis=1).reshape(-1)


def dequantize_q8_0(data: np.ndarray, n: int) -> np.ndarray:
    blk = np.asarray(data, dtype=np.uint8).reshape(-1, 34)
    d = blk[:, :2].copy().view(np.float16).astype(np.float32)
    return (blk[:, 2:].view(np.int8).astype(np.float32) * d).reshape(-1)[:n]


def _pack_q4(q: np.ndarray) -> np.ndarray:
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    b = _blocks(x, 32)
    imax = np.abs(b).argmax(axis=1)[:, None]
    mx = np.take_along_axis(b, imax, axis=1)
    d = (mx / np.float32(-8)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        idv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        v = ((b * idv).astype(np.float32) + np.float32(8.5)).astype(np.float32)
    q = np.minimum(_to_u8(v), 15)
    return np.concatenate([fp16_bits(d).view(np.uint8).reshape(-1, 2), _pack_q4(q)], axis=1).reshape(-1)


def dequantize_q4_0(data: np.ndarray, n: int) -> np.ndarray:
    blk = np.asarray(data, dtype=np.uint8).reshape(-1, 18)
    d = blk[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blk[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - np.float32(8)
    return (q * d).reshape(-1)[:n]


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    b = _blocks(x, 32)
    mn = b.min(axis=1, keepdims=True)
    mx = b.max(axis=1, keepdims=True)
    d = ((mx - mn) / np.float32(15)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        idv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        v = (((b - mn).astype(np.float32) * idv).astype(np.float32) + np.float32(0.5)).astype(np.float32)
    q = np.minimum(_to_u8(v), 15)
    head = np.concatenate([fp16_bits(d).view(np.uint8).reshape(-1, 2), fp16_bits(mn).view(np.uint8).reshape(-1, 2)], axis=1)
    return np.concatenate([head, _pack_q4(q)], axis=1).reshape(-1)


def dequantize_q4_1(data: np.ndarray, n: int) -> np.ndarray:
    blk = np.asarray(data, dtype=np.uint8).reshape(-1, 20)
    d = blk[:, :2].copy().view(np.float16).astype(np.float32)
    m = blk[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blk[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (q * d + m).reshape(-1)[:n]


def _nearest_code(scaled: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Index of the nearest code: count of midpoints ((c[i]+c[i+1])/2 in fp32) strictly below the value."""
    bounds = ((codes[:-1] + codes[1:]) / np.float32(2)).astype(np.float32)
    return np.searchsorted(bounds, scaled, side="left").astype(np.uint8)


def _scale_clamp(b: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    inv = (np.float32(1) / np.maximum(absmax, np.float32(1e-38))).astype(np.float32)
    return np.clip((b * inv).astype(np.float32), -1, 1)


def quantize_nf4(x: np.ndarray) -> np.ndarray:
    b = _blocks(x, 64)
    absmax = np.abs(b).max(axis=1, keepdims=True).astype(np.float32)
    q = _nearest_code(_scale_clamp(b, absmax), NF4_CODES)
    packed = ((q[:, 0::2] << 4) | q[:, 1::2]).astype(np.uint8)  # first element in the HIGH nibble
    return np.concatenate([absmax.view(np.uint8).reshape(-1, 4), packed], axis=1).reshape(-1)


def dequantize_nf4(data: np.ndarray, n: int) -> np.ndarray:
    blk = np.asarray(data, dtype=np.uint8).reshape(-1, 36)
    absmax = blk[:, :4].copy().view(np.float32)
    qs = blk[:, 4:]
    q = np.stack([qs >> 4, qs & 0x0F], axis=2).reshape(-1, 64)
    return (NF4_CODES[q] * absmax).astype(np.float32).reshape(-1)[:n]


# bitsandbytes get_4bit_type("fp4") in its index order (sign bit 3, then 2 exponent bits and 1 mantissa bit);
# index 8 is -0.0, as bitsandbytes' CUDA dequantize kernel returns it (spec/quant-types.md#fp4).
FP4_CODES = np.array([0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25,
                      -0.0, -1 / 192, -2 / 3, -1.0, -1 / 3, -0.5, -1 / 6, -0.25], dtype=np.float32)


def dequantize_fp4(data: np.ndarray, n: int) -> np.ndarray:
    """Same block as NF4 (fp32 absmax, first element of a pair in the high nibble), FP4's code book."""
    blk = np.asarray(data, dtype=np.uint8).reshape(-1, 36)
    absmax = blk[:, :4].copy().view(np.float32)
    qs = blk[:, 4:]
    q = np.stack([qs >> 4, qs & 0x0F], axis=2).reshape(-1, 64)
    return (FP4_CODES[q] * absmax).astype(np.float32).reshape(-1)[:n]


def quantize_nf4_dq(x: np.ndarray) -> np.ndarray:
    b = _blocks(x, 64)
    nb = b.shape[0]
    absmax = np.abs(b).max(axis=1).astype(np.float32)
    q = _nearest_code(_scale_clamp(b, absmax[:, None]), NF4_CODES)
    packed = ((q[:, 0::2] << 4) | q[:, 1::2]).astype(np.uint8).reshape(-1)
    offset = np.float32(np.float32(absmax.astype(np.float64).sum()) / np.float32(nb))
    v = (absmax - offset).astype(np.float32)
    ng = -(-nb // 256)
    pad = np.zeros(ng * 256, dtype=np.float32)
    pad[:nb] = v
    groups = pad.reshape(ng, 256)
    absmax2 = np.array([np.abs(v[g * 256:(g + 1) * 256]).max() for g in range(ng)], dtype=np.float32)
    qabs = _nearest_code(_scale_clamp(groups, absmax2[:, None]), dynamic_codes()).reshape(-1)[:nb]
    return np.concatenate([np.array([offset], np.float32).view(np.uint8), absmax2.view(np.uint8), qabs, packed])


def dequantize_nf4_dq(data: np.ndarray, n: int) -> np.ndarray:
    buf = np.asarray(data, dtype=np.uint8)
    nb = n // 64
    ng = -(-nb // 256)
    offset = buf[:4].copy().view(np.float32)[0]
    absmax2 = buf[4:4 + 4 * ng].copy().view(np.float32)
    qabs = buf[4 + 4 * ng:4 + 4 * ng + nb]
    qs = buf[4 + 4 * ng + nb:].reshape(nb, 32)
    scale = ((dynamic_codes()[qabs] * np.repeat(absmax2, 256)[:nb]).astype(np.float32) + offset).astype(np.float32)
    q = np.stack([qs >> 4, qs & 0x0F], axis=2).reshape(nb, 64)
    return (NF4_CODES[q] * scale[:, None]).astype(np.float32).reshape(-1)


QUANTIZE = {
    "Q8_0": quantize_q8_0,
    "Q4_0": quantize_q4_0,
    "Q4_1": quantize_q4_1,
    "NF4": quantize_nf4,
    "NF4_DQ": quantize_nf4_dq,
    "F16": lambda x: fp16_bits(x).view(np.uint8).reshape(-1),
    "BF16": lambda x: bf16_bits(x).view(np.uint8).reshape(-1),
    "F32": lambda x: np.ascontiguousarray(x, dtype=np.float32).view(np.uint8).reshape(-1),
}
DEQUANTIZE = {
    "FP4": dequantize_fp4,
    "Q8_0": dequantize_q8_0,
    "Q4_0": dequantize_q4_0,
    "Q4_1": dequantize_q4_1,
    "NF4": dequantize_nf4,
    "NF4_DQ": dequantize_nf4_dq,
    "F16": lambda d, n: np.asarray(d, np.uint8).view(np.float16).astype(np.float32)[:n],
    "BF16": lambda d, n: (np.asarray(d, np.uint8).view(np.uint16).astype(np.uint32) << 16).view(np.float32)[:n],
    "F32": lambda d, n: np.asarray(d, np.uint8).view(np.float32)[:n].copy(),
}
