"""CUDA backend tests (skipped without a GPU): kernels against independent oracles, a block of every
architecture against numpy, and whole models (llama, Llama 3 RoPE scaling, qwen2, qwen3, gemma3) with
n_gpu_layers against the CPU path.

Oracles: lowbit.dequantize (itself proven against gguf-py and bitsandbytes' definition) and gguf-py for the
weight bytes; float64 numpy for the arithmetic. Tolerances are derived in the comments next to them.
"""
from __future__ import annotations

import re
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

import lowbit
from lowbit import QType, _core

pytestmark = pytest.mark.cuda

NMSE_MAX = 5e-4  # matmul paths vs float64 (task contract)

BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q8_0": 32, "NF4": 64, "Q5_0": 32, "Q5_1": 32, "IQ4_NL": 32, "IQ4_XS": 256,
         "FP4": 64, "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "F32": 1, "F16": 1, "BF16": 1}
QUANTIZED = ("Q4_0", "Q4_1", "Q8_0", "NF4", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "FP4",
             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GGML_QUANTIZED = tuple(n for n in QUANTIZED if n not in ("NF4", "FP4"))  # types gguf-py knows
FLOATS = ("F32", "F16", "BF16")

# Raw block layouts (blocks.h), as numpy structured dtypes: no padding, little-endian.
BLOCK_DTYPES = {
    "Q4_0": np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    "Q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
    "Q8_0": np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
    "NF4": np.dtype([("absmax", "<f4"), ("qs", "u1", 32)]),
    "Q5_0": np.dtype([("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)]),
    "Q5_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)]),
    "IQ4_NL": np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    "IQ4_XS": np.dtype([("d", "<f2"), ("scales_h", "<u2"), ("scales_l", "u1", 4), ("qs", "u1", 128)]),
    "FP4": np.dtype([("absmax", "<f4"), ("qs", "u1", 32)]),
    "Q2_K": np.dtype([("scales", "u1", 16), ("qs", "u1", 64), ("d", "<f2"), ("dmin", "<f2")]),
    "Q3_K": np.dtype([("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2")]),
    "Q4_K": np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)]),
    "Q5_K": np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)]),
    "Q6_K": np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")]),
}

# bitsandbytes' code books (get_4bit_type), in the order of the 4-bit codes; FP4's code 8 reads as -0.0
# (spec/quant-types.md#fp4).
CODE_BOOKS = {
    "NF4": np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32),
    "FP4": np.array([float.fromhex(h) for h in (
        "0x0p+0", "0x1.555556p-8", "0x1.555556p-1", "0x1p+0", "0x1.555556p-2", "0x1p-1", "0x1.555556p-3", "0x1p-2",
        "-0x0p+0", "-0x1.555556p-8", "-0x1.555556p-1", "-0x1p+0", "-0x1.555556p-2", "-0x1p-1", "-0x1.555556p-3",
        "-0x1p-2")], dtype=np.float32),
}


def cols_for(name: str, n_cols: int) -> int:
    """n_cols rounded up to a whole number of the type's blocks (256 for the K-quants and IQ4_XS)."""
    return -(-n_cols // BLOCK[name]) * BLOCK[name]


def cuda():
    return _core.cuda


def nmse(got: np.ndarray, ref: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(((got - ref) ** 2).sum() / max((ref ** 2).sum(), 1e-300))


def float_bytes(x: np.ndarray, name: str) -> np.ndarray:
    """Raw bytes of a float tensor type, made with numpy (an oracle independent of lowbit)."""
    if name == "F32":
        return np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint8)
    if name == "F16":
        return np.ascontiguousarray(x.astype(np.float16)).reshape(-1).view(np.uint8)
    # BF16: round to nearest even on the top 16 bits (finite inputs only here).
    u = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return u.view(np.uint8)


def float_values(raw: np.ndarray, name: str) -> np.ndarray:
    if name == "F32":
        return raw.view(np.float32).copy()
    if name == "F16":
        return raw.view(np.float16).astype(np.float32)
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def weight_bytes(w: np.ndarray, name: str) -> np.ndarray:
    """Row-major bytes of w (n_rows, n_cols) in type `name`: lowbit's quantizers for block types."""
    if name in FLOATS:
        return float_bytes(w, name)
    return np.ascontiguousarray(lowbit.quantize(np.ascontiguousarray(w, dtype=np.float32), QType[name])) \
        .reshape(-1).view(np.uint8)


def weight_values(raw: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    """What the weights ARE (the CPU's dequantize): the reference side of every matmul check."""
    if name in FLOATS:
        return float_values(raw, name).reshape(shape)
    return np.asarray(lowbit.dequantize(raw, QType[name], shape), dtype=np.float32).reshape(shape)


def random_blocks(name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Arbitrary block bytes (every bit pattern of quants, sub-block scales and high bits), with finite
    fp16 / fp32 block scales."""
    dt = BLOCK_DTYPES[name]
    b = rng.integers(0, 256, size=n_blocks * dt.itemsize, dtype=np.uint8).view(dt)
    for field, sigma in (("d", 0.05), ("dmin", 0.05), ("m", 0.5)):
        if field in dt.names:
            b[field] = (rng.standard_normal(n_blocks) * sigma).astype(np.float16)
    if "absmax" in dt.names:
        b["absmax"] = np.abs(rng.standard_normal(n_blocks)).astype(np.float32) * 3
    return b.view(np.uint8).reshape(-1)


# ---- dequantize: bit-exact ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("source", ["quantized", "random_bytes"])
def test_dequantize_bit_exact(name: str, source: str):
    rng = np.random.default_rng(1)
    n = BLOCK[name] * 1031  # odd block count: partial thread groups at the end
    if source == "quantized":
        raw = weight_bytes(rng.standard_normal((1, n)).astype(np.float32) * 2, name)
    else:
        raw = random_blocks(name, n // BLOCK[name], rng)
    want = np.asarray(lowbit.dequantize(raw, QType[name], (n,)), dtype=np.float32).reshape(-1)
    got = cuda().dequantize(QType[name], raw, n)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    got16 = cuda().dequantize(QType[name], raw, n, f16=True)
    assert got16.dtype == np.float16
    np.testing.assert_array_equal(got16.view(np.uint16), want.astype(np.float16).view(np.uint16))


def test_block_dtypes_match_core():
    for name, dt in BLOCK_DTYPES.items():
        assert dt.itemsize == lowbit.quants.row_size(QType[name], BLOCK[name]), name


@pytest.mark.parametrize("name", GGML_QUANTIZED)
def test_dequantize_matches_gguf_py(name: str):
    gq = pytest.importorskip("gguf.quants")
    import gguf

    rng = np.random.default_rng(2)
    raw = random_blocks(name, 257, rng)
    want = gq.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType[name]).reshape(-1).astype(np.float32)
    got = cuda().dequantize(QType[name], raw, 257 * BLOCK[name])
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", ["NF4", "FP4"])
def test_dequantize_4bit_high_nibble_first(name: str):
    """bitsandbytes packs the first element of a pair in the HIGH nibble (spec/quant-types.md#nf4); FP4's
    code 8 comes back as -0.0 (compared bit for bit)."""
    b = np.zeros(1, dtype=BLOCK_DTYPES[name])
    b["absmax"] = 2.0
    q = np.arange(64) % 16
    b["qs"][0] = (q[0::2] << 4) | q[1::2]
    got = cuda().dequantize(QType[name], b.view(np.uint8), 64)
    np.testing.assert_array_equal(got.view(np.uint32), (CODE_BOOKS[name][q] * np.float32(2.0)).view(np.uint32))


@pytest.mark.parametrize("name", FLOATS)
def test_dequantize_float_types(name: str):
    rng = np.random.default_rng(3)
    n = 1000 + 7  # not a multiple of 16: the last thread's group is partial
    raw = float_bytes(rng.standard_normal(n).astype(np.float32), name)
    np.testing.assert_array_equal(cuda().dequantize(QType[name], raw, n), float_values(raw, name))


def test_dequantize_rejects_partial_blocks():
    with pytest.raises(lowbit.LowbitError):
        cuda().dequantize(QType.Q4_0, np.zeros(18, np.uint8), 16)


# ---- activation quantization: the CPU's formula, bit-exact ----------------------------------------------

def test_quantize_act_matches_formula():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3, 32 * 37)) * rng.uniform(0.01, 100, size=(3, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block: d = 0, id = 0
    x[1, 5] = 0.5 * x[1, :32].max()  # ordinary values next to the maximum
    d, s, qs = cuda().quantize_act(x)
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    want_d = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(want_d != 0, np.float32(1) / np.where(want_d != 0, want_d, 1), 0).astype(np.float32)
    v = (blocks * inv[:, None]).astype(np.float32).astype(np.float64)
    want_q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)  # roundf: half away from zero
    np.testing.assert_array_equal(d, want_d)
    np.testing.assert_array_equal(qs, want_q)
    np.testing.assert_array_equal(s, (want_d * want_q.astype(np.int32).sum(axis=1).astype(np.float32)))


def test_quantize_act_matches_cpu_reference_kernel():
    """Same blocks as the CPU's generic quantize_act, which the CPU matmul feeds its dot products."""
    if not hasattr(_core, "quantize_act") or not hasattr(_core, "set_isa"):
        pytest.skip("this build exposes no CPU quantize_act")
    rng = np.random.default_rng(41)
    x = (rng.standard_normal(32 * 301) * 7).astype(np.float32)
    _core.set_isa("generic")
    try:
        want = _core.quantize_act(x)
    finally:
        _core.reset_isa()
    got = cuda().quantize_act(x.reshape(1, -1))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# ---- matmul paths: NMSE vs float64 --------------------------------------------------------------------

def _matmul_case(name: str, n_rows: int, n_cols: int, n_tok: int, path: str, seed: int = 5):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    x = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
    raw = weight_bytes(w, name)
    ref = x.astype(np.float64) @ weight_values(raw, name, (n_rows, n_cols)).astype(np.float64).T
    got = cuda().matmul(QType[name], raw, n_rows, n_cols, x, path)
    assert got.shape == (n_tok, n_rows)
    assert np.isfinite(got).all()
    # int8 activations: step amax/127 per block, error variance ~ step^2/12 ~ 3e-5 of the signal;
    # fp16 GEMM operands: 2^-11 relative rounding on both sides ~ 1e-7. Both far below the 5e-4 contract.
    err = nmse(got, ref)
    assert err < NMSE_MAX, (name, n_rows, n_cols, n_tok, path, err)
    return got, ref


MATVEC_SHAPES = [(1, 64, 1), (37, 128, 1), (130, 320, 3), (257, 4160, 2), (4100, 64, 1)]
GEMM_SHAPES = [(1, 64, 4), (65, 128, 5), (130, 320, 67), (300, 640, 130), (64, 4160, 64)]


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("shape", MATVEC_SHAPES)
@pytest.mark.parametrize("path", ["int8", "float"])
def test_matvec_quantized(name: str, shape, path: str):
    n_rows, n_cols, n_tok = shape
    _matmul_case(name, n_rows, cols_for(name, n_cols), n_tok, path)


@pytest.mark.parametrize("name", QUANTIZED + FLOATS)
@pytest.mark.parametrize("shape", GEMM_SHAPES)
def test_gemm(name: str, shape):
    n_rows, n_cols, n_tok = shape
    _matmul_case(name, n_rows, cols_for(name, n_cols), n_tok, "gemm")


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("shape", [(7, 37, 1), (33, 100, 2), (70, 37, 5), (129, 1000, 70)])
def test_float_weights_odd_k(name: str, shape):
    """F32/F16/BF16 rows may have any length: tails inside a 16/32 group are masked."""
    _matmul_case(name, *shape, "float" if shape[2] < _core.cuda.GEMM_MIN_TOKENS else "gemm")


@pytest.mark.parametrize("name", QUANTIZED)
def test_matvec_int8_matches_cpu_scheme(name: str):
    """The int8 path equals dequant(W) . dequant(quantize_act(x)) up to fp32 summation order (the K-quants'
    sub-block scales and minima are applied exactly; NF4/FP4 use their exact fp32 code books)."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((50, 512)).astype(np.float32)
    x = rng.standard_normal((1, 512)).astype(np.float32)
    raw = weight_bytes(w, name)
    d, _, qs = cuda().quantize_act(x)
    xq = (qs.astype(np.float64) * d[:, None].astype(np.float64)).reshape(1, -1)
    ref = xq @ weight_values(raw, name, w.shape).astype(np.float64).T
    got = cuda().matmul(QType[name], raw, 50, 512, x, "int8")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_matmul_rejects_bad_shapes():
    raw = weight_bytes(np.ones((4, 64), np.float32), "Q4_0")
    with pytest.raises(lowbit.LowbitError):
        cuda().matmul(QType.Q4_0, raw, 4, 32, np.ones((1, 32), np.float32), "int8")
    with pytest.raises(lowbit.LowbitError):
        cuda().matmul(QType.Q4_0, raw, 4, 64, np.ones((1, 64), np.float32), "sideways")
    with pytest.raises(lowbit.LowbitError):
        cuda().matmul(QType.F16, float_bytes(np.ones((4, 64), np.float32), "F16"), 4, 64,
                      np.ones((1, 64), np.float32), "int8")


# ---- layer ops vs numpy --------------------------------------------------------------------------------

def np_rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w.astype(np.float64)


def np_inv_freq(rope_dim: int, base: float, scale: float = 1.0, factors=None) -> np.ndarray:
    """RoPE's per-pair angular frequencies scale * base^(-2i/rope_dim) / factors[i] as the model builds its
    tables (cpp/src/model.cpp load_tensors), rounded to float32 as the backend receives them."""
    i = np.arange(rope_dim // 2, dtype=np.float64)
    f = scale * base ** (-2.0 * i / rope_dim)
    if factors is not None:
        f = f / np.asarray(factors, dtype=np.float64)
    return f.astype(np.float32)


def np_rope(x: np.ndarray, pos: np.ndarray, rope_dim: int, inv_freq: np.ndarray, neox: bool = False,
            mscale: float = 1.0) -> np.ndarray:
    """RoPE of x (n_tok, n_heads, head_dim), float64: pairs (2i, 2i+1) (ggml "normal") or (i, i + rope_dim/2)
    ("neox"), i < rope_dim/2, turned by pos * inv_freq[i], cos and sin scaled by mscale (YaRN's attn_factor);
    dims past rope_dim untouched."""
    x = x.astype(np.float64).copy()
    theta = pos.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]  # (n_tok, rope_dim/2)
    c, s = mscale * np.cos(theta)[:, None, :], mscale * np.sin(theta)[:, None, :]
    half = rope_dim // 2
    first = slice(0, half) if neox else slice(0, rope_dim, 2)
    second = slice(half, rope_dim) if neox else slice(1, rope_dim, 2)
    x0, x1 = x[..., first].copy(), x[..., second].copy()
    x[..., first] = x0 * c - x1 * s
    x[..., second] = x0 * s + x1 * c
    return x


def np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_past: int, window: int = 0,
                 scale: float = 0.0) -> np.ndarray:
    """Causal GQA attention, float64. q (n_tok, n_head, hd); k, v (n_past + n_tok, n_head_kv, hd). window > 0:
    query t sees positions max(0, n_past + t + 1 - window) .. n_past + t. scale 0: 1/sqrt(hd)."""
    n_tok, n_head, hd = q.shape
    group = n_head // k.shape[1]
    scale = scale or 1.0 / np.sqrt(hd)
    out = np.zeros((n_tok, n_head, hd))
    for t in range(n_tok):
        n_kv = n_past + t + 1
        t0 = max(0, n_kv - window) if window > 0 else 0
        for h in range(n_head):
            kh, vh = k[t0:n_kv, h // group].astype(np.float64), v[t0:n_kv, h // group].astype(np.float64)
            s = kh @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ vh
    return out


def np_gelu_tanh(g: np.ndarray) -> np.ndarray:
    """GELU with the tanh approximation (HF's gelu_pytorch_tanh), float64."""
    g = g.astype(np.float64)
    return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))


def np_silu(g: np.ndarray) -> np.ndarray:
    g = g.astype(np.float64)
    return g / (1 + np.exp(-g))


def fp16(x: np.ndarray) -> np.ndarray:
    """What the fp16 KV cache holds."""
    return x.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("n_rows,n", [(1, 64), (5, 4096), (3, 1000), (2, 7)])
def test_rmsnorm(n_rows: int, n: int):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((n_rows, n)) * 3).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    # fp32 sum of squares over n terms: relative error ~ n * 2^-24 at worst (1000 terms: 6e-5; typical far less).
    np.testing.assert_allclose(cuda().rmsnorm(x, w, 1e-5), np_rmsnorm(x, w, 1e-5), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim,rope_dim,pos0,base,scale", [
    (16, 16, 0, 10000.0, 1.0), (64, 64, 37, 10000.0, 1.0), (128, 128, 200, 500000.0, 1.0),
    (128, 64, 5, 10000.0, 0.5), (80, 80, 3, 10000.0, 0.25), (24, 24, 11, 1e6, 1.0),
])
@pytest.mark.parametrize("mode", ["normal", "neox"])
def test_rope(head_dim: int, rope_dim: int, pos0: int, base: float, scale: float, mode: str):
    rng = np.random.default_rng(8)
    n_tok, n_heads = 9, 3
    x = rng.standard_normal((n_tok, n_heads, head_dim)).astype(np.float32)
    got = cuda().rope(x, rope_dim, pos0, base, scale, mode=mode)
    want = np_rope(x, np.arange(pos0, pos0 + n_tok), rope_dim, np_inv_freq(rope_dim, base, scale), mode == "neox")
    # cos/sin from a double angle, rounded to fp32 (2^-24 relative), then two fp32 products and a sum: a few
    # 1e-7 of |x| ~ 4.
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6, err_msg=f"mode={mode}")
    np.testing.assert_array_equal(got[..., rope_dim:], x[..., rope_dim:])  # dims past rope_dim untouched


def test_rope_table_with_factors_and_far_positions():
    """A table of the model's own (Llama 3's per-pair factors folded in) at positions where an fp32 angle
    would be off by ~1e-3 rad (pos 30000 * 2^-24 relative): the angle is formed in double, as on the CPU."""
    rng = np.random.default_rng(81)
    head_dim = rope_dim = 16
    factors = np.array([1, 1, 1, 1.8, 3.5, 6, 8, 8], dtype=np.float32)  # wavelengths kept, blended, divided
    inv = np_inv_freq(rope_dim, 10000.0, 1.0, factors)
    x = rng.standard_normal((5, 2, head_dim)).astype(np.float32)
    for mode in ("normal", "neox"):
        got = cuda().rope(x, rope_dim, 30000, mode=mode, inv_freq=inv)
        want = np_rope(x, np.arange(30000, 30005), rope_dim, inv, mode == "neox")
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-6, err_msg=f"mode={mode}")


def test_rope_yarn_magnitude():
    """YaRN scales every cos and sin of the global table by attn_factor = 1 + 0.1 ln(factor)."""
    rng = np.random.default_rng(83)
    x = rng.standard_normal((6, 3, 32)).astype(np.float32)
    mscale = 1 + 0.1 * np.log(4.0)
    inv = np_inv_freq(32, 1e4, 0.25)
    got = cuda().rope(x, 32, 7, mode="neox", inv_freq=inv, mscale=mscale)
    np.testing.assert_allclose(got, np_rope(x, np.arange(7, 13), 32, inv, True, mscale), rtol=0, atol=5e-6)


@pytest.mark.parametrize("n_rows,head_dim", [(1, 24), (37, 64), (300, 128), (5, 256), (3, 7)])
def test_head_norm(n_rows: int, head_dim: int):
    rng = np.random.default_rng(82)
    x = (rng.standard_normal((n_rows, head_dim)) * 3).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(head_dim)).astype(np.float32)
    # fp32 sum of <= 256 squares in a warp tree: ~1e-7 relative; the same bound as test_rmsnorm.
    np.testing.assert_allclose(cuda().head_norm(x, w, 1e-6), np_rmsnorm(x, w, 1e-6), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("n_head,n_head_kv,head_dim,n_tok,n_past", [
    (4, 4, 16, 1, 0), (4, 2, 16, 7, 0), (8, 2, 64, 1, 100), (8, 8, 128, 5, 37), (4, 1, 96, 70, 3),
    (2, 2, 256, 3, 300), (32, 8, 128, 1, 1000),
])
def test_attention(n_head: int, n_head_kv: int, head_dim: int, n_tok: int, n_past: int):
    rng = np.random.default_rng(9)
    q = rng.standard_normal((n_tok, n_head, head_dim)).astype(np.float32)
    k = rng.standard_normal((n_past + n_tok, n_head_kv, head_dim)).astype(np.float32)
    v = rng.standard_normal((n_past + n_tok, n_head_kv, head_dim)).astype(np.float32)
    got = cuda().attention(q, k, v, n_past)
    want = np_attention(q, fp16(k), fp16(v), n_past)
    # fp32 dot products and softmax over <= 1001 positions: ~1e-6 relative per term.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window,n_tok,n_past", [(1, 4, 0), (5, 7, 0), (8, 40, 0), (8, 1, 39), (6, 3, 20),
                                                 (100, 5, 10), (4096, 9, 30)])
@pytest.mark.parametrize("scale", [0.0, 0.0625])
def test_attention_sliding_window(window: int, n_tok: int, n_past: int, scale: float):
    """window > 0: query t sees only the last `window` positions up to its own (Gemma 3's sliding blocks);
    a window at least as long as the sequence is plain causal attention. scale: the model's query scale."""
    rng = np.random.default_rng(91)
    n_head, n_head_kv, head_dim = 4, 2, 32
    q = rng.standard_normal((n_tok, n_head, head_dim)).astype(np.float32)
    k = rng.standard_normal((n_past + n_tok, n_head_kv, head_dim)).astype(np.float32)
    v = rng.standard_normal((n_past + n_tok, n_head_kv, head_dim)).astype(np.float32)
    got = cuda().attention(q, k, v, n_past, window=window, scale=scale)
    want = np_attention(q, fp16(k), fp16(v), n_past, window=window, scale=scale)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"window={window} scale={scale}")
    if window >= n_past + n_tok:
        np.testing.assert_array_equal(got, cuda().attention(q, k, v, n_past, scale=scale))


def test_attention_window_ignores_older_positions():
    """Keys and values before a query's window must not change its output."""
    rng = np.random.default_rng(92)
    q = rng.standard_normal((3, 2, 32)).astype(np.float32)
    k = rng.standard_normal((13, 2, 32)).astype(np.float32)
    v = rng.standard_normal((13, 2, 32)).astype(np.float32)
    a = cuda().attention(q, k, v, 10, window=4)  # query 0 (position 10) sees 7..10
    k2, v2 = k.copy(), v.copy()
    k2[:7] += 10
    v2[:7] -= 10
    np.testing.assert_array_equal(a, cuda().attention(q, k2, v2, 10, window=4))


def test_attention_is_causal():
    """Changing keys/values after a query's position must not change that query's output."""
    rng = np.random.default_rng(10)
    q = rng.standard_normal((6, 2, 32)).astype(np.float32)
    k = rng.standard_normal((6, 2, 32)).astype(np.float32)
    v = rng.standard_normal((6, 2, 32)).astype(np.float32)
    a = cuda().attention(q, k, v, 0)
    k2, v2 = k.copy(), v.copy()
    k2[4:] += 10
    v2[4:] -= 10
    b = cuda().attention(q, k2, v2, 0)
    np.testing.assert_array_equal(a[:4], b[:4])
    assert not np.allclose(a[4:], b[4:])


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_activation(act: str):
    rng = np.random.default_rng(11)
    g = (rng.standard_normal(10007) * 4).astype(np.float32)
    u = rng.standard_normal(10007).astype(np.float32)
    fn, ref = (cuda().silu_mul, np_silu) if act == "silu" else (cuda().gelu_tanh_mul, np_gelu_tanh)
    # fp32 expf/tanhf: a few ulp.
    np.testing.assert_allclose(fn(g, u), ref(g) * u, rtol=1e-5, atol=1e-6)


# ---- one transformer block through the Backend vs a numpy block ------------------------------------------

@dataclass
class BlockShape:
    n_embd: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 32
    n_ff: int = 192
    n_ctx: int = 64
    rope_dim: int = 32
    base: float = 10000.0
    scale: float = 1.0
    eps: float = 1e-5


@dataclass
class BlockArch:
    """What an architecture adds to the llama block, as the backend takes it (a row of the core's ArchSpec,
    plus what a block of that model gets on add_layer)."""
    bias: bool = False          # qwen2: q/k/v biases
    qk_norm: bool = False       # qwen3, gemma3: RMSNorm of every q/k head before RoPE
    neox: bool = False          # qwen2, qwen3, gemma3: pairs (i, i + rope_dim/2)
    gelu: bool = False          # gemma3: GELU-tanh gate instead of SiLU
    post_norms: bool = False    # gemma3: attention and feed-forward outputs normed before the residual add
    window: int = 0             # gemma3's sliding blocks: attend to the last `window` positions
    rope_table: int = 0         # 1: the sliding blocks' table (another base, no scaling)
    attn_scale: float = 0.0     # queries' scale (0: 1/sqrt(head_dim))
    freq_factors: bool = False  # llama3: per-pair divisors (rope_freqs.weight) folded into the table
    mscale: float = 1.0         # YaRN: the global table's cos/sin magnitude (attn_factor)
    softcap: float = 0.0        # the head's logit soft-capping (gemma 2/3 files that set it)


BLOCK_ARCHS = {
    "llama": BlockArch(),
    "llama3": BlockArch(freq_factors=True),
    "qwen2": BlockArch(bias=True, neox=True),
    "qwen2-yarn": BlockArch(bias=True, neox=True, freq_factors=True, mscale=1 + 0.1 * np.log(4.0)),
    "qwen3": BlockArch(qk_norm=True, neox=True),
    "gemma3-global": BlockArch(qk_norm=True, neox=True, gelu=True, post_norms=True, attn_scale=0.15),
    "gemma3-sliding": BlockArch(qk_norm=True, neox=True, gelu=True, post_norms=True, attn_scale=0.15, window=6,
                                rope_table=1),
}
SWA_BASE = 10000.0  # the sliding table's base in these tests (Gemma 3's); the global one is BlockShape.base


def rope_tables(shape: BlockShape, arch: BlockArch) -> list[np.ndarray]:
    """The two RoPE tables a model hands the backend: global (scaled, Llama 3 factors where the row has them)
    and the sliding blocks' (own base, unscaled)."""
    half = shape.rope_dim // 2
    # Llama 3's per-pair factors, or a blend like YaRN's: the backend takes the table as the model made it.
    factors = np.linspace(1.0, 8.0, half).astype(np.float32) if arch.freq_factors else None
    return [np_inv_freq(shape.rope_dim, shape.base, shape.scale, factors), np_inv_freq(shape.rope_dim, SWA_BASE)]


def make_block(shape: BlockShape, name: str, rng: np.random.Generator, arch: BlockArch = BlockArch()):
    """Random block weights: the backend's dict and the values numpy computes with."""
    e, qd, kvd = shape.n_embd, shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    dims = {"wq": (qd, e), "wk": (kvd, e), "wv": (kvd, e), "wo": (e, qd), "w_gate": (shape.n_ff, e),
            "w_up": (shape.n_ff, e), "w_down": (e, shape.n_ff)}
    weights, values = {}, {}
    for key, (r, c) in dims.items():
        w = (rng.standard_normal((r, c)) / np.sqrt(c)).astype(np.float32)
        raw = weight_bytes(w, name)
        weights[key] = (QType[name], raw, r, c)
        values[key] = weight_values(raw, name, (r, c)).astype(np.float64)
    vectors = {"attn_norm": e, "ffn_norm": e}
    if arch.bias:
        vectors.update(bq=qd, bk=kvd, bv=kvd)
    if arch.qk_norm:
        vectors.update(q_norm=shape.head_dim, k_norm=shape.head_dim)
    if arch.post_norms:
        vectors.update(attn_post_norm=e, ffn_post_norm=e)
    for key, n in vectors.items():
        if key.startswith("b"):  # biases: large enough that dropping one shows
            weights[key] = (0.5 * rng.standard_normal(n)).astype(np.float32)
        else:
            weights[key] = (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)
        values[key] = weights[key].astype(np.float64)
    return weights, values


class NumpyBlock:
    """The block in float64 with its own KV cache (K/V rounded to fp16 like the GPU cache), op for op as the
    CPU's Model::run_layer_cpu."""

    def __init__(self, shape: BlockShape, values: dict, arch: BlockArch = BlockArch()):
        self.s, self.v, self.a = shape, values, arch
        self.inv_freq = rope_tables(shape, arch)[arch.rope_table]
        self.k = np.zeros((0, shape.n_head_kv, shape.head_dim))
        self.vv = np.zeros((0, shape.n_head_kv, shape.head_dim))

    def forward(self, x: np.ndarray, n_past: int) -> np.ndarray:
        s, w, a = self.s, self.v, self.a
        n_tok = x.shape[0]
        pos = np.arange(n_past, n_past + n_tok)
        x = x.astype(np.float64)
        h = np_rmsnorm(x, w["attn_norm"], s.eps)
        q, k, v = h @ w["wq"].T, h @ w["wk"].T, h @ w["wv"].T
        if a.bias:
            q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
        q = q.reshape(n_tok, s.n_head, s.head_dim)
        k = k.reshape(n_tok, s.n_head_kv, s.head_dim)
        v = v.reshape(n_tok, s.n_head_kv, s.head_dim)
        if a.qk_norm:
            q, k = np_rmsnorm(q, w["q_norm"], s.eps), np_rmsnorm(k, w["k_norm"], s.eps)
        mscale = a.mscale if a.rope_table == 0 else 1.0
        q = np_rope(q, pos, s.rope_dim, self.inv_freq, a.neox, mscale)
        k = np_rope(k, pos, s.rope_dim, self.inv_freq, a.neox, mscale)
        self.k = np.concatenate([self.k[:n_past], fp16(k)])
        self.vv = np.concatenate([self.vv[:n_past], fp16(v)])
        att = np_attention(q, self.k, self.vv, n_past, a.window, a.attn_scale).reshape(n_tok, -1)
        o = att @ w["wo"].T
        x = x + (np_rmsnorm(o, w["attn_post_norm"], s.eps) if a.post_norms else o)
        h = np_rmsnorm(x, w["ffn_norm"], s.eps)
        g, u = h @ w["w_gate"].T, h @ w["w_up"].T
        o = ((np_gelu_tanh(g) if a.gelu else np_silu(g)) * u) @ w["w_down"].T
        return x + (np_rmsnorm(o, w["ffn_post_norm"], s.eps) if a.post_norms else o)


def backend_config(shape: BlockShape, matvec: str = "int8", arch: Optional[BlockArch] = None) -> dict:
    cfg = {"n_embd": shape.n_embd, "n_head": shape.n_head, "n_head_kv": shape.n_head_kv,
           "head_dim": shape.head_dim, "n_ff": shape.n_ff, "n_ctx": shape.n_ctx, "rms_eps": shape.eps,
           "rope_freq_base": shape.base, "rope_freq_scale": shape.scale, "rope_dim": shape.rope_dim,
           "matvec": matvec}
    if arch is not None:
        table, table_swa = rope_tables(shape, arch)
        cfg.update(rope_inv_freq=table, rope_inv_freq_swa=table_swa, rope_mscale=arch.mscale,
                   rope_mode="neox" if arch.neox else "normal",
                   act="gelu_tanh" if arch.gelu else "silu", attn_scale=arch.attn_scale,
                   logit_softcap=arch.softcap)
    return cfg


def assert_block_close(got: np.ndarray, want: np.ndarray, x_in: np.ndarray, what: str):
    # Compare what the block ADDS to the residual stream, so the identity part cannot hide errors.
    err = nmse(got - x_in, want - x_in)
    assert err < NMSE_MAX, (what, err)


@pytest.mark.parametrize("name", ["F32", "Q8_0", "Q4_0", "Q4_1", "NF4", "F16", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS",
                                  "FP4", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("matvec", ["int8", "float"])
def test_backend_block_matches_numpy(name: str, matvec: str):
    rng = np.random.default_rng(12)
    # Super-block types need every matrix's n_cols (n_embd, n_head * head_dim, n_ff) to be a multiple of 256.
    shape = BlockShape() if BLOCK[name] <= 64 else BlockShape(n_embd=256, head_dim=64, n_ff=512, rope_dim=64)
    weights, values = make_block(shape, name, rng)
    be = _core.cuda.Backend(backend_config(shape, matvec), n_batch=16)
    assert be.add_layer(weights) == 0 and be.n_layers == 1
    ref = NumpyBlock(shape, values)
    # Prompt of 11 tokens (GEMM), then single tokens (matvec), then 2 at once (matvec, n < GEMM_MIN_TOKENS).
    _forward_in_chunks(be, ref, rng, shape.n_embd, (11, 1, 1, 2, 5), name)
    assert be.device_bytes > 0


def _forward_in_chunks(be, ref, rng, n_embd: int, sizes, label: str) -> None:
    """Random hidden states, a chunk of each size in turn, through the backend's block and the numpy one from
    the same position on; every chunk's outputs compared and the backend's cache length checked."""
    n_past = 0
    for n_tok in sizes:
        x = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
        got = be.forward(x, n_past)
        want = ref.forward(x, n_past)
        assert_block_close(got, want, x, f"{label} n_past={n_past} n_tok={n_tok}")
        n_past += n_tok
        assert be.n_cached(0) == n_past


@pytest.mark.parametrize("arch", list(BLOCK_ARCHS))
@pytest.mark.parametrize("name", ["F32", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("matvec", ["int8", "float"])
def test_backend_block_of_each_architecture(arch: str, name: str, matvec: str):
    """Each architecture's block (biases, q/k head norms, neox RoPE, Llama 3 RoPE factors, GELU-tanh, post-norms,
    a sliding window with its own RoPE table, a query scale) against numpy, through a prompt that runs past
    the window, in chunks (GEMM) and single tokens (matvec)."""
    rng = np.random.default_rng(17)
    a = BLOCK_ARCHS[arch]
    # The global table's base 1e6 (qwen3's, gemma3's) differs from the sliding one's (SWA_BASE), so a block
    # turned by the wrong table shows.
    if BLOCK[name] > 64:  # every n_cols a multiple of 256; head_dim 64 != n_embd / n_head as in qwen3 and gemma3
        shape = BlockShape(n_embd=256, n_head=8, n_head_kv=4, head_dim=64, n_ff=512, rope_dim=64, base=1e6)
    else:  # head_dim 48 != n_embd / n_head (qwen3's explicit head size)
        shape = BlockShape(head_dim=48, rope_dim=48, base=1e6)
    weights, values = make_block(shape, name, rng, a)
    be = _core.cuda.Backend(backend_config(shape, matvec, a), n_batch=16)
    assert be.add_layer(weights, window=a.window, rope_table=a.rope_table) == 0
    ref = NumpyBlock(shape, values, a)
    # 11 (GEMM), single tokens (matvec), 2 (matvec), 20 in chunks of 16 + 4 (GEMM): 35 positions, window 6.
    _forward_in_chunks(be, ref, rng, shape.n_embd, (11, 1, 1, 2, 20), f"{arch} {name} matvec={matvec}")


def test_backend_sliding_block_truncate():
    """A sliding block keeps all n_ctx positions on the GPU (the window is a mask), so truncating to any earlier
    position and recomputing gives the numpy states again."""
    rng = np.random.default_rng(18)
    a = BLOCK_ARCHS["gemma3-sliding"]
    shape = BlockShape(base=1e6)
    weights, values = make_block(shape, "Q8_0", rng, a)
    be = _core.cuda.Backend(backend_config(shape, "int8", a), n_batch=8)
    be.add_layer(weights, window=a.window, rope_table=a.rope_table)
    ref = NumpyBlock(shape, values, a)
    x = rng.standard_normal((30, shape.n_embd)).astype(np.float32)
    assert_block_close(be.forward(x, 0), ref.forward(x, 0), x, "30 tokens, window 6")
    be.truncate(3)  # far before the last window
    x2 = rng.standard_normal((12, shape.n_embd)).astype(np.float32)
    assert_block_close(be.forward(x2, 3), ref.forward(x2, 3), x2, "after truncate(3)")


def test_backend_chunks_and_truncate():
    """Prompts longer than n_batch run in chunks; truncate + recompute gives the same states."""
    rng = np.random.default_rng(13)
    shape = BlockShape(n_ctx=48)
    w0, v0 = make_block(shape, "Q8_0", rng)
    w1, v1 = make_block(shape, "Q4_0", rng)
    be = _core.cuda.Backend(backend_config(shape), n_batch=6)
    be.add_layer(w0)
    be.add_layer(w1)
    ref0, ref1 = NumpyBlock(shape, v0), NumpyBlock(shape, v1)
    x = rng.standard_normal((17, shape.n_embd)).astype(np.float32)  # chunks of 6, 6, 5 tokens
    got = be.forward(x, 0)
    want = ref1.forward(ref0.forward(x, 0), 0)
    assert_block_close(got, want, x, "two blocks, chunked")
    # Split across calls: blocks [0, 1) then [1, 2) equals running both at once.
    x2 = rng.standard_normal((3, shape.n_embd)).astype(np.float32)
    mid = be.forward(x2, 17, 0, 1)
    both = be.forward(mid, 17, 1, 2)
    want2 = ref1.forward(ref0.forward(x2, 17), 17)
    assert_block_close(both, want2, x2, "split range")
    # Rewind to 10 positions and recompute from there.
    be.truncate(10)
    assert be.n_cached(0) == 10 and be.n_cached(1) == 10
    x3 = rng.standard_normal((4, shape.n_embd)).astype(np.float32)
    got3 = be.forward(x3, 10)
    want3 = ref1.forward(ref0.forward(x3, 10), 10)
    assert_block_close(got3, want3, x3, "after truncate")


def test_backend_errors():
    rng = np.random.default_rng(14)
    shape = BlockShape(n_ctx=8)
    weights, _ = make_block(shape, "Q8_0", rng)
    be = _core.cuda.Backend(backend_config(shape), n_batch=4)
    be.add_layer(weights)
    x = np.zeros((2, shape.n_embd), np.float32)
    with pytest.raises(lowbit.LowbitError, match="n_past"):
        be.forward(x, 3)  # nothing cached yet
    with pytest.raises(lowbit.LowbitError, match="n_ctx"):
        be.forward(np.zeros((9, shape.n_embd), np.float32), 0)
    with pytest.raises(lowbit.LowbitError, match="block range"):
        be.forward(x, 0, 0, 2)
    bad = dict(weights)
    bad["wq"] = (QType.Q8_0, weights["wk"][1], weights["wk"][2], weights["wk"][3])  # K's shape in Q's slot
    before = be.device_bytes
    with pytest.raises(lowbit.LowbitError, match="attn_q"):
        be.add_layer(bad)
    assert be.device_bytes == before and be.n_layers == 1  # nothing allocated for the rejected block
    with pytest.raises(lowbit.LowbitError, match="head_dim"):
        _core.cuda.Backend(dict(backend_config(shape), head_dim=512, rope_dim=512), n_batch=4)
    with pytest.raises(lowbit.LowbitError, match="rope_table"):
        be.add_layer(weights, rope_table=1)  # the config has no second table
    with pytest.raises(lowbit.LowbitError, match="window"):
        be.add_layer(weights, window=-1)
    with pytest.raises(lowbit.LowbitError, match="bq"):
        be.add_layer(dict(weights, bq=np.zeros(3, np.float32)))
    assert be.device_bytes == before and be.n_layers == 1
    with pytest.raises(lowbit.LowbitError, match="rope_inv_freq"):
        _core.cuda.Backend(dict(backend_config(shape), rope_inv_freq=np.ones(3, np.float32)), n_batch=4)
    with pytest.raises(lowbit.LowbitError, match="rope_mode"):
        _core.cuda.Backend(dict(backend_config(shape), rope_mode="sideways"), n_batch=4)
    with pytest.raises(lowbit.LowbitError, match="act"):
        _core.cuda.Backend(dict(backend_config(shape), act="relu"), n_batch=4)


def test_backend_output_head():
    rng = np.random.default_rng(15)
    shape = BlockShape()
    be = _core.cuda.Backend(backend_config(shape), n_batch=8)
    n_vocab = 1000
    w = (rng.standard_normal((n_vocab, shape.n_embd)) / np.sqrt(shape.n_embd)).astype(np.float32)
    raw = weight_bytes(w, "Q8_0")
    norm = (1 + 0.2 * rng.standard_normal(shape.n_embd)).astype(np.float32)
    be.set_output(norm, (QType.Q8_0, raw, n_vocab, shape.n_embd))
    for n_tok in (1, 3, 70):  # matvec, matvec, GEMM in chunks of min(64, n_batch)
        x = rng.standard_normal((n_tok, shape.n_embd)).astype(np.float32)
        want = np_rmsnorm(x, norm, shape.eps) @ weight_values(raw, "Q8_0", w.shape).astype(np.float64).T
        got = be.output(x)
        assert got.shape == (n_tok, n_vocab)
        assert nmse(got, want) < NMSE_MAX


@pytest.mark.parametrize("cap", [0.0, 2.5])
def test_backend_output_head_softcap(cap: float):
    """logit_softcap > 0: logits = cap * tanh(logits / cap) after the head's matmul (Gemma's final soft-capping);
    0 leaves them alone."""
    rng = np.random.default_rng(19)
    shape = BlockShape()
    be = _core.cuda.Backend(dict(backend_config(shape), logit_softcap=cap), n_batch=8)
    n_vocab = 300
    w = (rng.standard_normal((n_vocab, shape.n_embd)) * 3 / np.sqrt(shape.n_embd)).astype(np.float32)
    norm = np.ones(shape.n_embd, np.float32)
    be.set_output(norm, (QType.F32, float_bytes(w, "F32"), n_vocab, shape.n_embd))
    for n_tok in (1, 9):
        x = rng.standard_normal((n_tok, shape.n_embd)).astype(np.float32)
        want = np_rmsnorm(x, norm, shape.eps) @ w.astype(np.float64).T
        if cap > 0:
            want = cap * np.tanh(want / cap)
        got = be.output(x)
        assert nmse(got, want) < NMSE_MAX, (cap, n_tok, nmse(got, want))
        if cap > 0:
            assert np.abs(got).max() <= cap


def test_estimates_cover_allocations():
    rng = np.random.default_rng(16)
    shape = BlockShape(n_ctx=256)
    weights, _ = make_block(shape, "Q4_0", rng)
    be = _core.cuda.Backend(backend_config(shape), n_batch=32)
    base = be.device_bytes
    be.add_layer(weights)
    per_layer = be.device_bytes - base
    kv = 2 * shape.n_ctx * shape.n_head_kv * shape.head_dim * 2  # fp16 K and V
    w_bytes = sum(len(weights[k][1]) for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
    assert kv + w_bytes <= per_layer <= kv + w_bytes + 16 * 256


def test_estimates_cover_optional_vectors():
    """Biases, head norms and post-norms are uploaded too and counted by estimate_layer_bytes; a sliding block
    keeps a full-length cache."""
    rng = np.random.default_rng(20)
    shape = BlockShape(n_ctx=256)
    arch = BlockArch(bias=True, qk_norm=True, post_norms=True, window=6, rope_table=1)
    weights, _ = make_block(shape, "Q4_0", rng, arch)
    be = _core.cuda.Backend(backend_config(shape, "int8", arch), n_batch=32)
    base = be.device_bytes
    be.add_layer(weights, window=arch.window, rope_table=arch.rope_table)
    per_layer = be.device_bytes - base
    kv = 2 * shape.n_ctx * shape.n_head_kv * shape.head_dim * 2  # fp16 K and V, every position
    w_bytes = sum(len(weights[k][1]) for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
    vec_bytes = sum(4 * weights[k].size for k in weights if not isinstance(weights[k], tuple))
    pieces = len(weights) + 2  # each rounded up to 256 bytes
    assert kv + w_bytes + vec_bytes <= per_layer <= kv + w_bytes + vec_bytes + pieces * 256


# ---- whole models: n_gpu_layers in {1, half, all, -1 (the head too)} against the CPU (n_gpu_layers=0) --------
#
# Same file, same weights: only the runtime arithmetic differs, so the GPU's logits are compared with the CPU's
# position by position, by KL(cpu || gpu) and by the argmax. Both sides keep an fp16 KV cache (kv_f16=True on
# the CPU; the GPU has no other), which leaves:
#   * decode (one token per call: the matvec kernels): quantized weights dot the same int8 activation blocks
#     as on the CPU (quantize_act is bit-exact, the sums are integer), float weights fp32 activations; what
#     differs is fp32 summation order and the ulps of expf/tanhf/sqrtf.
#   * prompt (>= GEMM_MIN_TOKENS tokens per call: tensor cores): weights and activations are rounded to fp16
#     (2^-11 relative, ~3e-4 RMS per element); the CPU keeps fp32 activations for float weights and rounds them
#     to int8 blocks for quantized ones (RMS error amax / (127 sqrt(12)) per element, ~5e-3 of a typical
#     value, 15-20x the fp16 rounding).
# Float files: every difference is a float rounding that propagates smoothly. Proxies measured on the CPU
# (these tiny models, 40 tokens, 4 seeds): the weights rounded to fp16 (an F16 file against the F32 one) move
# the logits by mean KL <= 9e-6, 3.3e-5 at one position (gemma3, the noisiest; the GPU also rounds the
# activations, about twice that); the CPU's generic kernels against its AVX2 ones (another summation order)
# by <= 3e-8.
# Quantized files: the prompt's logits sit one activation quantization away from the CPU's. Measured on the
# CPU as each Q8_0 model against an F32 file of its own dequantized weights (the same weights, exact
# activations): mean KL up to 4.8e-3 and 2.8e-2 at one position (gemma3; llama3 and qwen3 about 1.4e-4), and
# the argmax moved only where the CPU's top two log-probs were within 0.25 nats. Decode is not much closer:
# a last-bit difference upstream flips an int8 rounding now and then, and a flip moves an activation by a
# whole step, so the CPU's own generic and AVX-512 kernels differ in Q8_0 decode by up to mean KL 8.5e-4,
# 4.8e-3 at one position (gemma3, whose sandwich norms amplify it; the others <= 3e-5).
# Limits: FLOAT_WEIGHTS keeps the bound this file always had, mean KL < 1e-4, with 1e-3 at any one position
# and the argmax equal except between near-ties (top two within 0.05 nats); QUANTIZED_WEIGHTS is about 4x
# the measured spread. A dropped bias or norm, or the wrong RoPE pairing, costs a KL of nats
# (test_architectures), and the float files hold every op to the tight bound.

@dataclass(frozen=True)
class LogitTolerance:
    kl_mean: float  # mean over positions of KL(cpu || gpu), nats
    kl_max: float   # at any one position
    tie: float      # the GPU may pick another token only where the CPU's log-prob of it is this close to the top


FLOAT_WEIGHTS = LogitTolerance(kl_mean=1e-4, kl_max=1e-3, tie=0.05)
QUANTIZED_WEIGHTS = LogitTolerance(kl_mean=2e-2, kl_max=1e-1, tie=0.5)
MODES = ("prompt", "decode")


def logits_mismatch(ref: np.ndarray, got: np.ndarray, tol: LogitTolerance, what: str) -> Optional[str]:
    """None when got (n, n_vocab) is within tol of ref, else what went wrong, naming `what` and the positions."""
    if got.shape != ref.shape:
        return f"{what}: logits of shape {got.shape}, the CPU's are {ref.shape}"
    if not np.isfinite(got).all():
        return f"{what}: non-finite logits at positions {np.nonzero(~np.isfinite(got).all(-1))[0].tolist()}"
    lp = ref - ref.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = got - got.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    rows = np.arange(len(ref))
    r, g = ref.argmax(-1), got.argmax(-1)
    gap = lp[rows, r] - lp[rows, g]  # 0 where both pick the same token
    problems = []
    if kl.mean() > tol.kl_mean:
        problems.append(f"mean KL {kl.mean():.2e} > {tol.kl_mean:.0e}")
    worst = int(kl.argmax())
    if kl[worst] > tol.kl_max:
        problems.append(f"KL {kl[worst]:.2e} > {tol.kl_max:.0e} at position {worst}")
    for pos in np.nonzero(gap > tol.tie)[0][:5]:
        problems.append(f"position {pos}: GPU picks token {g[pos]}, CPU {r[pos]}, which the CPU prefers by "
                        f"{gap[pos]:.3f} nats > {tol.tie}")
    return f"{what}: " + "; ".join(problems) if problems else None


def eval_logits(m, ids: np.ndarray, mode: str) -> np.ndarray:
    """(len(ids), n_vocab) from an empty cache: "prompt" evaluates all ids in one call, "decode" one per call."""
    if mode == "prompt":
        return np.asarray(m.logits(ids), dtype=np.float64)
    core = m._core
    core.truncate(0)
    return np.stack([np.asarray(core.eval(ids[i:i + 1]), dtype=np.float64).reshape(-1) for i in range(len(ids))])


def gpu_layer_counts(n_layer: int) -> list[int]:
    """1, half, all blocks, and -1 (every block and the output head)."""
    return list(dict.fromkeys([1, max(1, n_layer // 2), n_layer, -1]))


def offload_failures(path: Path, ids: np.ndarray, float_weights: bool, label: str) -> list[str]:
    """Every n_gpu_layers of gpu_layer_counts and both modes against the CPU; one message per failure."""
    n_threads = _model_helpers().N_THREADS
    with lowbit.load(path, n_gpu_layers=0, kv_f16=True, n_threads=n_threads) as cpu:
        n_layer = cpu.config.n_layer
        ref = {mode: eval_logits(cpu, ids, mode) for mode in MODES}
    failures = []
    for ngl in gpu_layer_counts(n_layer):
        with lowbit.load(path, n_gpu_layers=ngl, kv_f16=True, n_threads=n_threads) as gpu:
            if gpu.memory_footprint()["devices"]["cuda"]["weights"] == 0:
                failures.append(f"{label} n_gpu_layers={ngl}: nothing was placed on the GPU")
                continue
            for mode in MODES:
                got = eval_logits(gpu, ids, mode)
                what = f"{label} n_gpu_layers={ngl} of {n_layer} {mode} ({len(ids)} tokens)"
                msg = logits_mismatch(ref[mode], got, FLOAT_WEIGHTS if float_weights else QUANTIZED_WEIGHTS, what)
                if msg:
                    failures.append(msg)
    return failures


def _model_helpers():
    mh = pytest.importorskip("model_helpers")
    return mh


@pytest.mark.parametrize("qtype", ["f32", "q8_0", "q4_0"])
def test_model_logits_with_offload(qtype: str):
    """The tiny llama (model_helpers.tiny_gguf), prompt and decode, n_gpu_layers 1, half, all, -1."""
    mh = _model_helpers()
    ids = mh.random_ids(24, 300, seed=3)
    failures = offload_failures(mh.tiny_gguf(qtype), ids, qtype == "f32", f"llama {qtype}")
    assert not failures, "\n".join(failures)


# The architectures of the CPU's forward pass, each test_architectures' tiny converted checkpoint (checked there
# against transformers and llama.cpp); gemma3's slides over fewer positions than the prompt has, so its sliding
# blocks' mask and their own RoPE table are exercised; qwen2-yarn is test_architectures' YaRN-scaled qwen2
# (blended frequencies, cos/sin magnitude 1 + 0.1 ln 4).
ARCH_MODELS = ("llama3", "qwen2", "qwen3", "gemma3", "qwen2-yarn")
ARCH_GGUF_NAME = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3", "qwen2-yarn": "qwen2"}
ARCH_PROMPT_LEN = 40


@functools.lru_cache(maxsize=None)
def arch_gguf(arch: str, qtype: str) -> Path:
    """test_architectures' tiny checkpoint of arch converted with lowbit.convert to qtype."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    ta = pytest.importorskip("test_architectures")
    if arch != "qwen2-yarn":
        return ta.tiny_gguf(arch, qtype)
    from tiny_models import make_tiny_model

    root = _model_helpers()._ROOT
    hf = make_tiny_model(root / "hf-arch", "qwen2", tied=True, rope_parameters=ta.YARN, name="tiny-qwen2-yarn")
    out = root / f"cuda-qwen2-yarn-{qtype}.gguf"
    lowbit.convert(hf, out, outtype=qtype, progress=False, force=True)
    return out


def arch_config(path: Path, arch: str):
    """The file's config and vocabulary size, checked to be the architecture the test names."""
    with lowbit.load(path, n_threads=1) as m:
        c, n_vocab = m.config, m.n_vocab
    assert c.architecture == ARCH_GGUF_NAME[arch], (path, c.architecture)
    window = getattr(c, "sliding_window", 0)
    if arch == "gemma3":
        assert 0 < window < ARCH_PROMPT_LEN, (f"the tiny gemma3 should slide over fewer than {ARCH_PROMPT_LEN} "
                                              f"positions (sliding_window={window})")
    return c, n_vocab


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
@pytest.mark.parametrize("arch", ARCH_MODELS)
def test_architecture_logits_with_offload(arch: str, qtype: str):
    """Every architecture through the GPU block: n_gpu_layers 1, half, all and -1 (head too) against the CPU,
    on 40 tokens in one call (the tensor-core prompt path) and one token per call (the decode path)."""
    path = arch_gguf(arch, qtype)
    _, n_vocab = arch_config(path, arch)
    ids = _model_helpers().random_ids(ARCH_PROMPT_LEN, n_vocab, seed=21)
    failures = offload_failures(path, ids, qtype == "f32", f"{arch} {qtype}")
    assert not failures, "\n".join(failures)


GREEDY_TOKENS = 16
GREEDY_MIN_GAP = FLOAT_WEIGHTS.tie  # nats between the top two logits at every greedy step of the chosen prompt


def greedy_with_gaps(m, prompt: np.ndarray, n_new: int) -> tuple[list[int], list[float]]:
    """Greedy tokens by argmax over the core's logits, with the gap between the top two logits at each step."""
    core = m._core
    core.truncate(0)
    logits = np.asarray(core.eval(prompt), dtype=np.float64)
    tokens, gaps = [], []
    for _ in range(n_new):
        top2 = np.sort(logits)[-2:]
        gaps.append(float(top2[1] - top2[0]))
        tokens.append(int(logits.argmax()))
        logits = np.asarray(core.eval(np.array(tokens[-1:], dtype=np.int32)), dtype=np.float64)
    return tokens, gaps


@pytest.mark.parametrize("arch", ARCH_MODELS)
def test_architecture_greedy_generation_all_gpu(arch: str):
    """16 greedy tokens with every block and the head on the GPU equal the CPU's (F32 file). A greedy sequence
    is only defined where the top two logits are further apart than the arithmetic noise, so the prompt is the
    seeded one (of 30) whose CPU steps have the largest smallest top-2 gap, normally >= 0.05 nats."""
    path = arch_gguf(arch, "f32")
    _, n_vocab = arch_config(path, arch)
    mh = _model_helpers()
    with lowbit.load(path, kv_f16=True, n_threads=mh.N_THREADS) as cpu:
        best = None
        for seed in range(30):
            prompt = mh.random_ids(8, n_vocab, seed=100 + seed)
            tokens, gaps = greedy_with_gaps(cpu, prompt, GREEDY_TOKENS)
            if best is None or min(gaps) > min(best[2]):
                best = (prompt, tokens, gaps)
            if min(gaps) >= GREEDY_MIN_GAP:
                break
        prompt, cpu_tokens, gaps = best
        want = cpu.generate_tokens(prompt, max_new_tokens=GREEDY_TOKENS, temperature=0.0, stop_at_eos=False)
    assert want == cpu_tokens, f"{arch}: generate_tokens(temperature=0) is not the argmax sequence on the CPU"
    with lowbit.load(path, n_gpu_layers=-1, kv_f16=True, n_threads=mh.N_THREADS) as gpu:
        got = gpu.generate_tokens(prompt, max_new_tokens=GREEDY_TOKENS, temperature=0.0, stop_at_eos=False)
    assert len(got) == len(want) == GREEDY_TOKENS, f"{arch}: {len(got)} GPU tokens, {len(want)} CPU tokens"
    if got != want:
        i = next(j for j in range(GREEDY_TOKENS) if got[j] != want[j])
        pytest.fail(f"{arch} n_gpu_layers=-1: greedy token {i} is {got[i]} on the GPU, {want[i]} on the CPU (the "
                    f"CPU's top two logits were {gaps[i]:.4f} apart there; smallest gap over the steps "
                    f"{min(gaps):.4f}); prompt {prompt.tolist()}\nCPU {want}\nGPU {got}")


def test_model_gpu_layers_clamp():
    """Asking for more layers than exist offloads everything, like llama.cpp's -ngl 999."""
    mh = _model_helpers()
    with lowbit.load(mh.tiny_gguf("q8_0"), n_gpu_layers=1000) as m:
        assert m.memory_footprint()["devices"]["cuda"]["weights"] > 0


def test_offload_that_does_not_fit_names_the_largest_n():
    """Before allocating, the model estimates weights + KV + scratch and names the largest n_gpu_layers that
    fits. A KV cache sized to 1.5x the free memory over all blocks leaves room for some blocks, not all."""
    mh = _model_helpers()
    path = mh.tiny_gguf("q8_0")
    free = lowbit.cuda_info()["devices"][0]["free_memory"]
    with lowbit.load(path, n_gpu_layers=0) as cpu:
        c = cpu.config
    kv_per_pos = c.n_layer * 2 * c.n_head_kv * (c.n_embd // c.n_head) * 2  # fp16 K and V, all blocks
    n_ctx = int(1.5 * free // kv_per_pos)
    with pytest.raises(lowbit.LowbitError, match=r"the largest that fits is n_gpu_layers=(\d+)") as err:
        lowbit.load(path, n_gpu_layers=-1, n_ctx=n_ctx)
    fit = int(re.search(r"n_gpu_layers=(\d+) \(or lower", str(err.value)).group(1))
    assert 0 < fit < c.n_layer, str(err.value)
