"""CUDA backend tests (skipped without a GPU): kernels against independent oracles, a layer against numpy,
and whole models with n_gpu_layers against the CPU path.

Oracles: lowbit.dequantize (itself proven against gguf-py and bitsandbytes' definition) and gguf-py for the
weight bytes; float64 numpy for the arithmetic. Tolerances are derived in the comments next to them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

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


def np_rope(x: np.ndarray, pos: np.ndarray, rope_dim: int, base: float, scale: float) -> np.ndarray:
    """llama.cpp "normal" RoPE: pairs (2i, 2i+1), i < rope_dim/2, angle pos * scale * base^(-2i/rope_dim)."""
    x = x.astype(np.float64).copy()
    i = np.arange(rope_dim // 2, dtype=np.float64)
    theta = pos.astype(np.float64)[:, None] * scale * base ** (-2.0 * i / rope_dim)  # (n_tok, rope_dim/2)
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0:rope_dim:2].copy(), x[..., 1:rope_dim:2].copy()
    x[..., 0:rope_dim:2] = x0 * c - x1 * s
    x[..., 1:rope_dim:2] = x0 * s + x1 * c
    return x


def np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_past: int) -> np.ndarray:
    """Causal GQA attention, float64. q (n_tok, n_head, hd); k, v (n_past + n_tok, n_head_kv, hd)."""
    n_tok, n_head, hd = q.shape
    group = n_head // k.shape[1]
    out = np.zeros((n_tok, n_head, hd))
    for t in range(n_tok):
        n_kv = n_past + t + 1
        for h in range(n_head):
            kh, vh = k[:n_kv, h // group].astype(np.float64), v[:n_kv, h // group].astype(np.float64)
            s = kh @ q[t, h].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ vh
    return out


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
    (128, 64, 5, 10000.0, 0.5), (80, 80, 3, 10000.0, 0.25),
])
def test_rope(head_dim: int, rope_dim: int, pos0: int, base: float, scale: float):
    rng = np.random.default_rng(8)
    n_tok, n_heads = 9, 3
    x = rng.standard_normal((n_tok, n_heads, head_dim)).astype(np.float32)
    got = cuda().rope(x, rope_dim, pos0, base, scale)
    want = np_rope(x, np.arange(pos0, pos0 + n_tok), rope_dim, base, scale)
    # fp32 angle: |theta| <= pos ~ 210 carries an absolute error ~ 210 * 2^-24 ~ 1.3e-5 rad.
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-5)
    np.testing.assert_array_equal(got[..., rope_dim:], x[..., rope_dim:])  # dims past rope_dim untouched


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


def test_silu_mul():
    rng = np.random.default_rng(11)
    g = (rng.standard_normal(10007) * 4).astype(np.float32)
    u = rng.standard_normal(10007).astype(np.float32)
    g64 = g.astype(np.float64)
    want = g64 / (1 + np.exp(-g64)) * u
    np.testing.assert_allclose(cuda().silu_mul(g, u), want, rtol=1e-5, atol=1e-7)


# ---- one transformer block through the Backend vs a numpy llama block ------------------------------------

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


def make_block(shape: BlockShape, name: str, rng: np.random.Generator):
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
    for key in ("attn_norm", "ffn_norm"):
        weights[key] = (1 + 0.2 * rng.standard_normal(e)).astype(np.float32)
        values[key] = weights[key].astype(np.float64)
    return weights, values


class NumpyBlock:
    """The llama block in float64 with its own KV cache (K/V rounded to fp16 like the GPU cache)."""

    def __init__(self, shape: BlockShape, values: dict):
        self.s, self.v = shape, values
        self.k = np.zeros((0, shape.n_head_kv, shape.head_dim))
        self.vv = np.zeros((0, shape.n_head_kv, shape.head_dim))

    def forward(self, x: np.ndarray, n_past: int) -> np.ndarray:
        s, w = self.s, self.v
        n_tok = x.shape[0]
        pos = np.arange(n_past, n_past + n_tok)
        x = x.astype(np.float64)
        h = np_rmsnorm(x, w["attn_norm"], s.eps)
        q = (h @ w["wq"].T).reshape(n_tok, s.n_head, s.head_dim)
        k = (h @ w["wk"].T).reshape(n_tok, s.n_head_kv, s.head_dim)
        v = (h @ w["wv"].T).reshape(n_tok, s.n_head_kv, s.head_dim)
        q = np_rope(q, pos, s.rope_dim, s.base, s.scale)
        k = np_rope(k, pos, s.rope_dim, s.base, s.scale)
        self.k = np.concatenate([self.k[:n_past], fp16(k)])
        self.vv = np.concatenate([self.vv[:n_past], fp16(v)])
        att = np_attention(q, self.k, self.vv, n_past).reshape(n_tok, -1)
        x = x + att @ w["wo"].T
        h = np_rmsnorm(x, w["ffn_norm"], s.eps)
        g, u = h @ w["w_gate"].T, h @ w["w_up"].T
        return x + (g / (1 + np.exp(-g)) * u) @ w["w_down"].T


def backend_config(shape: BlockShape, matvec: str = "int8") -> dict:
    return {"n_embd": shape.n_embd, "n_head": shape.n_head, "n_head_kv": shape.n_head_kv,
            "head_dim": shape.head_dim, "n_ff": shape.n_ff, "n_ctx": shape.n_ctx, "rms_eps": shape.eps,
            "rope_freq_base": shape.base, "rope_freq_scale": shape.scale, "rope_dim": shape.rope_dim,
            "matvec": matvec}


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
    n_past = 0
    for n_tok in (11, 1, 1, 2, 5):
        x = rng.standard_normal((n_tok, shape.n_embd)).astype(np.float32)
        got = be.forward(x, n_past)
        want = ref.forward(x, n_past)
        assert_block_close(got, want, x, f"{name} n_past={n_past} n_tok={n_tok}")
        n_past += n_tok
        assert be.n_cached(0) == n_past
    assert be.device_bytes > 0


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


# ---- whole models: n_gpu_layers in {0, 1, half, all} against the CPU -----------------------------------

def _load_gpu(path, n_gpu_layers: int, **kw):
    return lowbit.load(path, n_gpu_layers=n_gpu_layers, **kw)


def _model_helpers():
    mh = pytest.importorskip("model_helpers")
    return mh


@pytest.mark.parametrize("qtype", ["f32", "q8_0", "q4_0"])
def test_model_logits_with_offload(qtype: str):
    mh = _model_helpers()
    path = mh.tiny_gguf(qtype)
    ids = mh.random_ids(24, 300, seed=3)
    with lowbit.load(path, n_gpu_layers=0) as cpu:
        n_layer = cpu.config.n_layer if hasattr(cpu.config, "n_layer") else 2
        want = np.asarray(cpu.logits(ids), dtype=np.float64)
    for ngl in sorted({1, max(1, n_layer // 2), n_layer, n_layer + 1, -1}):
        with _load_gpu(path, ngl) as gpu:
            fp = gpu.memory_footprint()
            assert fp["cuda"]["weights"] > 0, f"n_gpu_layers={ngl} placed nothing on the GPU"
            got = np.asarray(gpu.logits(ids), dtype=np.float64)
        assert got.shape == want.shape
        # Same file, same weights: only runtime arithmetic differs (fp16 KV cache and fp16 GEMM operands,
        # ~5e-4 relative per matmul), far from changing the distribution.
        kl, top1 = mh.kl_and_top1(want, got)
        assert kl < 1e-4 and top1 == 1.0, (qtype, ngl, kl, top1)


def test_model_decode_with_offload_matches_cpu():
    """Token-by-token decode (the matvec path) on the GPU tracks the CPU."""
    mh = _model_helpers()
    path = mh.tiny_gguf("q4_0")
    ids = mh.random_ids(12, 300, seed=4)
    with lowbit.load(path, n_gpu_layers=0) as cpu, _load_gpu(path, -1) as gpu:
        for n in range(6, 13):
            want = np.asarray(cpu.logits(ids[:n]), dtype=np.float64)
            got = np.asarray(gpu.logits(ids[:n]), dtype=np.float64)
            kl, top1 = mh.kl_and_top1(want.reshape(-1, want.shape[-1]), got.reshape(-1, got.shape[-1]))
            assert kl < 1e-4 and top1 == 1.0, (n, kl, top1)


def test_model_gpu_layers_clamp():
    """Asking for more layers than exist offloads everything, like llama.cpp's -ngl 999."""
    mh = _model_helpers()
    with _load_gpu(mh.tiny_gguf("q8_0"), 1000) as m:
        assert m.memory_footprint()["cuda"]["weights"] > 0


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
