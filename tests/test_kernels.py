"""CPU kernels on every runnable ISA against numpy oracles written from the spec, and against each other."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

import lowbit
from lowbit import _core

ISAS = _core.kernels_available()

# ggml / lowbit type ids (spec/quant-types.md).
F32, F16, Q4_0, Q4_1, Q8_0, BF16, NF4 = 0, 1, 2, 3, 8, 30, 1024

# bitsandbytes get_4bit_type("nf4") (spec/quant-types.md#nf4); cross-checked against bitsandbytes below.
NF4_CODES = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0], dtype=np.float32)
# The matmul's documented runtime approximation: codes as int8 round(code * 127), block scale absmax / 127.
NF4_INT8 = np.round(NF4_CODES.astype(np.float64) * 127).astype(np.int64)

BLOCK_DTYPES = {
    Q4_0: np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    Q4_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
    Q8_0: np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
    NF4: np.dtype([("absmax", "<f4"), ("qs", "u1", 32)]),
}
BLOCK_SIZE = {Q4_0: 32, Q4_1: 32, Q8_0: 32, NF4: 64, F16: 1, BF16: 1, F32: 1}
QUANTIZED = (Q4_0, Q4_1, Q8_0, NF4)
ALL_TYPES = (Q4_0, Q4_1, Q8_0, NF4, F16, BF16, F32)


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    _core.reset_isa()


# ---- numpy oracles -------------------------------------------------------------------------------

def np_roundf(v: np.ndarray) -> np.ndarray:
    """C roundf: half away from zero (np.round rounds half to even)."""
    a = np.abs(v)
    f = np.floor(a)
    return np.sign(v) * (f + np.floor(2 * (a - f)))


def quantize_act_np(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k,) float32 -> d (nb,), s (nb,), qs (nb, 32): d = amax/127, q = roundf(x * (1/d)), s = d*sum(q), in fp32."""
    xb = x.astype(np.float32).reshape(-1, 32)
    amax = np.abs(xb).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np_roundf((xb * inv[:, None]).astype(np.float32)).astype(np.int64)
    s = (d * q.sum(axis=1).astype(np.float32)).astype(np.float32)
    return d, s, q.astype(np.int8)


def dequant_act_np(x: np.ndarray) -> np.ndarray:
    d, _, q = quantize_act_np(x)
    return (q.astype(np.float64) * d.astype(np.float64)[:, None]).reshape(-1)


def random_weights(t: int, n_out: int, k: int, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """Random valid rows of type t -> (raw bytes, float64 (n_out, k) weights the kernel must use)."""
    if t in (F32, F16, BF16):
        w = rng.standard_normal((n_out, k)).astype(np.float32)
        if t == F32:
            return w.tobytes(), w.astype(np.float64)
        if t == F16:
            h = w.astype(np.float16)
            return h.tobytes(), h.astype(np.float64)
        bits = (w.view(np.uint32) >> 16).astype(np.uint16)
        return bits.tobytes(), (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    nb = n_out * k // BLOCK_SIZE[t]
    blk = np.zeros(nb, dtype=BLOCK_DTYPES[t])
    if t == NF4:
        blk["absmax"] = np.abs(rng.standard_normal(nb)).astype(np.float32) * 0.1
        blk["qs"] = rng.integers(0, 256, (nb, 32), dtype=np.uint8)
        idx = np.empty((nb, 64), dtype=np.int64)
        idx[:, 0::2] = blk["qs"] >> 4  # bitsandbytes packs the FIRST element of a pair in the HIGH nibble
        idx[:, 1::2] = blk["qs"] & 15
        w = NF4_INT8[idx] * (blk["absmax"].astype(np.float64)[:, None] / 127.0)
        return blk.tobytes(), w.reshape(n_out, k)
    blk["d"] = (rng.standard_normal(nb) * 0.02).astype(np.float16)
    d = blk["d"].astype(np.float64)[:, None]
    if t == Q8_0:
        blk["qs"] = rng.integers(-128, 128, (nb, 32), dtype=np.int8)
        w = blk["qs"].astype(np.float64) * d
        return blk.tobytes(), w.reshape(n_out, k)
    blk["qs"] = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
    q = np.concatenate([blk["qs"] & 15, blk["qs"] >> 4], axis=1).astype(np.float64)  # low = j, high = j + 16
    if t == Q4_0:
        w = (q - 8) * d
    else:
        blk["m"] = (rng.standard_normal(nb) * 0.05).astype(np.float16)
        w = q * d + blk["m"].astype(np.float64)[:, None]
    return blk.tobytes(), w.reshape(n_out, k)


def oracle(t: int, w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference Y = X W^T and the tolerance 1e-5 * sum|terms| per output."""
    if t in QUANTIZED:
        xd = np.stack([dequant_act_np(row) for row in x])
    else:
        xd = x.astype(np.float64)
    return xd @ w.T, 1e-5 * (np.abs(xd) @ np.abs(w).T) + 1e-30


def make_x(n_tok: int, k: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    x[:, 5::97] *= 20  # outliers, as real activations have
    return x


# ---- tests -----------------------------------------------------------------------------------------

def test_isa_table():
    assert "generic" in ISAS
    assert set(_core.compiled_isas().split(",")) >= set(ISAS)
    info = lowbit.build_info()
    assert info["cpu_isas_runnable"] == ISAS
    for name in ISAS:
        _core.set_isa(name)
        assert _core.active_isa() == name
    with pytest.raises(lowbit.LowbitError, match="unknown ISA"):
        _core.set_isa("sse9")


def test_nf4_codebook_follows_qlora_construction():
    # QLoRA / bitsandbytes create_normal_map(offset=0.9677083): normal quantiles of the two halves, a shared
    # exact zero, normalized to [-1, 1] (spec/quant-types.md#nf4); equal up to float32 rounding.
    nd = statistics.NormalDist()
    pos = [nd.inv_cdf(p) for p in np.linspace(0.9677083, 0.5, 9)[:-1]]
    neg = [-nd.inv_cdf(p) for p in np.linspace(0.9677083, 0.5, 8)[:-1]]
    codes = np.sort(np.array(pos + [0.0] + neg))
    np.testing.assert_allclose(codes / codes.max(), NF4_CODES, rtol=0, atol=2.5e-7)


@pytest.mark.slow
def test_nf4_codebook_matches_bitsandbytes():
    pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    codes = functional.get_4bit_type("nf4", device="cpu").numpy().astype(np.float32)
    np.testing.assert_array_equal(codes, NF4_CODES)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [32, 64, 96, 4096, 4128])
def test_quantize_act_bit_exact(isa, k):
    rng = np.random.default_rng(k)
    x = make_x(1, k, rng)[0]
    x[:32] = 0.0  # an all-zero block: d = 0, q = 0
    if k >= 64:
        # Exact ties: amax 127 gives d = 1 and id = 1, so x * id lands on .5 and roundf rounds away from zero.
        x[32:64] = np.array([127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5] * 4, dtype=np.float32)
    _core.set_isa(isa)
    d, s, q = _core.quantize_act(x)
    de, se, qe = quantize_act_np(x)
    np.testing.assert_array_equal(d, de)
    np.testing.assert_array_equal(q, qe)
    np.testing.assert_array_equal(s, se)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("t,k", [(t, k) for t in ALL_TYPES for k in ([64, 128, 4096, 4160] if t == NF4 else
                                                                    [32, 64, 96, 4096, 4128])])
def test_matmul_vs_oracle_and_generic(isa, t, k):
    rng = np.random.default_rng(t * 10007 + k)
    n_outs = range(1, 18) if k <= 128 else (1, 3, 4, 5, 8, 17)
    # n_tok >= 8 takes the panel GEMM where the ISA has one (16-row panels, 8-column groups): cover its edges.
    n_toks = (1, 2, 3, 4, 5, 8, 9, 17, 33) if k <= 128 else (1, 4, 5, 9, 33)
    for n_out in n_outs:
        wb, w = random_weights(t, n_out, k, rng)
        for n_tok in n_toks:
            if k > 128 and n_out * n_tok > 17 * 9 and n_tok != 33:
                continue
            x = make_x(n_tok, k, rng)
            ref, tol = oracle(t, w, x)
            _core.set_isa(isa)
            y1 = _core.matmul(t, wb, n_out, k, x, n_threads=1)
            y2 = _core.matmul(t, wb, n_out, k, x, n_threads=2)
            assert y1.shape == (n_tok, n_out)
            err = np.abs(y1 - ref)
            assert np.all(err <= tol), (
                f"{isa} type {t} k={k} n_out={n_out} n_tok={n_tok}: max err/tol {np.max(err / tol):.3g}")
            np.testing.assert_array_equal(y1, y2)
            if isa != "generic":
                _core.set_isa("generic")
                yg = _core.matmul(t, wb, n_out, k, x, n_threads=1)
                assert np.all(np.abs(y1 - yg) <= 2 * tol)


def test_nf4_runtime_approximation_is_close_to_exact_nf4():
    # The int8 code table moves each weight by at most half an int8 step of its block's absmax.
    assert np.max(np.abs(NF4_INT8 / 127.0 - NF4_CODES.astype(np.float64))) <= 0.5 / 127 + 1e-12
    rng = np.random.default_rng(7)
    k, n_out = 256, 5
    wb, w_approx = random_weights(NF4, n_out, k, rng)
    blk = np.frombuffer(wb, dtype=BLOCK_DTYPES[NF4])
    idx = np.empty((blk.size, 64), dtype=np.int64)
    idx[:, 0::2] = blk["qs"] >> 4
    idx[:, 1::2] = blk["qs"] & 15
    w_exact = (NF4_CODES[idx].astype(np.float64) * blk["absmax"][:, None]).reshape(n_out, k)
    x = make_x(3, k, rng)
    y = _core.matmul(NF4, wb, n_out, k, x)
    bound = (np.abs(x.astype(np.float64)) @ np.abs(w_exact - w_approx).T
             + np.abs(x.astype(np.float64) - np.stack([dequant_act_np(r) for r in x])) @ np.abs(w_exact).T)
    assert np.all(np.abs(y - x.astype(np.float64) @ w_exact.T) <= bound * 1.001 + 1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 7, 32, 100, 2048, 5632])
def test_layer_ops(isa, n):
    rng = np.random.default_rng(n)
    _core.set_isa(isa)
    x = rng.standard_normal(n).astype(np.float32) * 3
    g = rng.standard_normal(n).astype(np.float32)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)

    eps = 1e-5
    ref = x64 / np.sqrt(np.mean(x64 * x64) + eps) * g64
    np.testing.assert_allclose(_core.rmsnorm(x, g, eps), ref, rtol=1e-5, atol=1e-6)

    gate = rng.standard_normal(n).astype(np.float32) * 6
    ref = gate.astype(np.float64) / (1 + np.exp(-gate.astype(np.float64))) * x64
    np.testing.assert_allclose(_core.silu_mul(gate, x), ref, rtol=1e-5, atol=1e-6)

    dot = _core.dot_f32(x, g)
    assert abs(dot - float(x64 @ g64)) <= 1e-5 * float(np.abs(x64) @ np.abs(g64)) + 1e-30

    ref = x64 + np.float64(np.float32(0.37)) * g64
    np.testing.assert_allclose(_core.axpy_f32(x, 0.37, g), ref, rtol=1e-6, atol=1e-6)


def test_matmul_errors():
    with pytest.raises(lowbit.LowbitError, match="multiple of the weight block size"):
        _core.matmul(Q4_0, b"\0" * 18, 1, 48, np.zeros(48, np.float32))
    with pytest.raises(lowbit.LowbitError, match="bytes"):
        _core.matmul(Q8_0, b"\0" * 10, 1, 32, np.zeros(32, np.float32))
    with pytest.raises(lowbit.LowbitError, match="no CPU matmul kernel"):
        _core.matmul(16, b"\0" * 66, 1, 256, np.zeros(256, np.float32))


@pytest.mark.parametrize("value,ok", [("generic", True), ("avx9000", False)])
def test_lowbit_isa_env(value, ok):
    env = dict(os.environ, LOWBIT_ISA=value)
    code = "from lowbit import _core\ntry:\n print(_core.active_isa())\nexcept ValueError as e:\n print('ERR', e)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    if ok:
        assert out.strip() == value
    else:
        assert out.startswith("ERR") and "LOWBIT_ISA" in out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("t,k", [(t, k) for t in QUANTIZED for k in ([64, 128, 4160] if t == NF4 else [32, 96, 4128])])
def test_load_time_panels_vs_oracle_and_rows(isa, t, k):
    """Weights repacked into 16-row panels (what the model does at load on CPUs with panel kernels): the same
    products as the row layout within the oracle's tolerance, for decode and prompt column counts."""
    rng = np.random.default_rng(t * 31 + k)
    _core.set_isa(isa)
    for n_out in (16, 48):
        wb, w = random_weights(t, n_out, k, rng)
        for n_tok in (1, 3, 8, 9, 33):
            x = make_x(n_tok, k, rng)
            yp = _core.matmul_panels(t, wb, n_out, k, x, n_threads=1)
            if yp is None:
                assert not (isa == "avx512" and cpu_has_vnni()), "AVX-512 VNNI must have the panel kernels"
                pytest.skip(f"{isa} has no panel kernel")
            ref, tol = oracle(t, w, x)
            err = np.abs(yp - ref)
            assert np.all(err <= tol), f"{isa} t={t} k={k} n_out={n_out} n_tok={n_tok}: {np.max(err / tol):.3g}"
            np.testing.assert_array_equal(yp, _core.matmul_panels(t, wb, n_out, k, x, n_threads=2))
            yr = _core.matmul(t, wb, n_out, k, x, n_threads=1)
            assert np.all(np.abs(yp - yr) <= 2 * tol)
    # 17 rows have no panel layout: the caller must use the rows.
    wb, _ = random_weights(t, 17, k, rng)
    assert _core.matmul_panels(t, wb, 17, k, make_x(1, k, rng), n_threads=1) is None


def cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_vnni" in f.read()
    except OSError:
        return False
