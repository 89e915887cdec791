"""CPU kernels on every runnable ISA against numpy oracles written from the spec, and against each other.

The types come from the registry (lowbit.QType, cpp/include/lowbit/qtypes.def): a type added there is
multiplied here on every ISA without an edit. The kernel facts the registry does not hold are in the small
tables below: the types without a CPU matmul, the panel kernels AVX-512 VNNI must have, and the int8 code
tables of the 4-bit code-book types.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

import lowbit
from lowbit import _core
from lowbit.quants import QType

import llamacpp_oracle
import oracle

ISAS = _core.kernels_available()

# Types lowbit quantizes and dequantizes but never multiplies on the CPU, and why.
NO_CPU_MATMUL = {
    "Q8_K": "ggml's activation-side K block, never a weight type",
    "NF4_DQ": "tensor-level layout, expanded to NF4 rows at load",
}
MATMUL_TYPES = [t for t in QType if t.name not in NO_CPU_MATMUL]
QUANTIZED = [t for t in MATMUL_TYPES if t.is_quantized]

# The panel kernels an AVX-512 VNNI table must have (cpp/include/lowbit/kernels.h).
VNNI_PANEL_TYPES = ("Q4_0", "Q4_1", "Q8_0", "NF4")


def names(types) -> list[str]:
    return [t.name for t in types]


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
    """The activations the kernels use: x (..., k) quantized and dequantized per block of 32, float64."""
    d, _, q = quantize_act_np(x)
    return (q.astype(np.float64) * d.astype(np.float64)[:, None]).reshape(x.shape)


# The matmul's documented runtime approximation of the code-book types (spec/quant-types.md#runtime,
# cpp/src/cpu/kernels_more.h): codes as int8 roundf(code * 127), block scale absmax / 127.
INT8_CODES = {"NF4": np_roundf(oracle.NF4_CODES.astype(np.float64) * 127).astype(np.int64),
              "FP4": np_roundf(oracle.FP4_CODES.astype(np.float64) * 127).astype(np.int64)}


def code_indices(raw: np.ndarray) -> np.ndarray:
    """NF4/FP4 blocks (nb, 36) -> code indices (nb, 64); the FIRST element of a pair is in the HIGH nibble."""
    qs = raw[:, 4:]
    return np.stack([qs >> 4, qs & 15], axis=2).reshape(-1, 64).astype(np.int64)


def random_weights(t: QType, n_out: int, k: int, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """Random valid rows of type t -> (raw bytes, float64 (n_out, k) weights the kernel must use)."""
    if not t.is_quantized:
        w = rng.standard_normal((n_out, k)).astype(np.float32)
        if t == QType.F32:
            return w.tobytes(), w.astype(np.float64)
        if t == QType.F16:
            h = w.astype(np.float16)
            return h.tobytes(), h.astype(np.float64)
        bits = (w.view(np.uint32) >> 16).astype(np.uint16)
        return bits.tobytes(), (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    nb = n_out * k // t.block_size
    raw = llamacpp_oracle.random_blocks(t.name, t.type_size, nb, rng, scales="moderate")
    if t.name in INT8_CODES:
        absmax = raw[:, :4].copy().view(np.float32).astype(np.float64)
        w = INT8_CODES[t.name][code_indices(raw)] * (absmax / 127.0)
    else:
        # The file's values exactly: lowbit.dequantize is bit-exact with gguf-py and llama.cpp (test_quants.py).
        w = lowbit.dequantize(raw, t, (nb * t.block_size,)).astype(np.float64)
    return raw.tobytes(), w.reshape(n_out, k)


def oracle_product(t: QType, w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference Y = X W^T and the tolerance 1e-5 * sum|terms| per output."""
    if t.is_quantized:
        xd = dequant_act_np(x)
    else:
        xd = x.astype(np.float64)
    return xd @ w.T, 1e-5 * (np.abs(xd) @ np.abs(w).T) + 1e-30


def make_x(n_tok: int, k: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    x[:, 5::97] *= 20  # outliers, as real activations have
    return x


def matmul_ks(t: QType) -> tuple[int, ...]:
    """One block, a few, and an odd number of blocks past 2048 elements (256, 512, 2304 for 256-element blocks)."""
    b = max(t.block_size, 32)  # activation blocks are 32 long
    return b, (2 if b >= 256 else 3) * b, b * (2 * (2048 // b // 2) + 1)


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


@pytest.mark.parametrize("isa", ISAS)
def test_type_kernels_report_every_type(isa):
    """type_kernels(): one row per QType; a dot ISA for every type with a CPU matmul ("none" for the others);
    each kernel is the ISA's own or the generic fallback; panels and prompt GEMMs are never borrowed."""
    _core.set_isa(isa)
    rows = _core.type_kernels()
    assert [r[0] for r in rows] == names(QType)
    for (name, dot, quant, panel, gemm), t in zip(rows, QType):
        if name in NO_CPU_MATMUL:
            assert dot == "none", name
            with pytest.raises(lowbit.LowbitError, match="no CPU matmul kernel"):
                _core.matmul(int(t), b"\0" * t.type_size, 1, t.block_size, np.zeros(t.block_size, np.float32))
        else:
            assert dot in (isa, "generic"), (name, dot)
        assert quant in (isa, "generic"), (name, quant)
        if dot != isa or isa == "generic":  # the generic table has none, and a fallback type borrows none
            assert not panel and not gemm, name
        if isa == "avx512" and cpu_has_vnni() and name in VNNI_PANEL_TYPES:
            assert panel, f"AVX-512 VNNI must have the {name} panel kernel"


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "generic"])
def test_fallback_types_run_the_generic_kernel(isa):
    """Where type_kernels() names "generic" on another ISA, that ISA's matmul is the generic one, bit for bit."""
    rng = np.random.default_rng(17)
    _core.set_isa(isa)
    fallback = [t for t, r in zip(QType, _core.type_kernels()) if r[1] == "generic"]
    for t in fallback:
        k = matmul_ks(t)[1]
        wb, _ = random_weights(t, 5, k, rng)
        for n_tok in (1, 3, 8, 17):
            x = make_x(n_tok, k, rng)
            _core.set_isa(isa)
            y = _core.matmul(int(t), wb, 5, k, x)
            _core.set_isa("generic")
            np.testing.assert_array_equal(y, _core.matmul(int(t), wb, 5, k, x), err_msg=f"{t.name} n_tok={n_tok}")


def test_nf4_codebook_follows_qlora_construction():
    # QLoRA / bitsandbytes create_normal_map(offset=0.9677083): normal quantiles of the two halves, a shared
    # exact zero, normalized to [-1, 1] (spec/quant-types.md#nf4); equal up to float32 rounding.
    nd = statistics.NormalDist()
    pos = [nd.inv_cdf(p) for p in np.linspace(0.9677083, 0.5, 9)[:-1]]
    neg = [-nd.inv_cdf(p) for p in np.linspace(0.9677083, 0.5, 8)[:-1]]
    codes = np.sort(np.array(pos + [0.0] + neg))
    np.testing.assert_allclose(codes / codes.max(), oracle.NF4_CODES, rtol=0, atol=2.5e-7)


@pytest.mark.slow
def test_4bit_codebooks_match_bitsandbytes():
    pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    for qt, codes in (("nf4", oracle.NF4_CODES), ("fp4", oracle.FP4_CODES)):
        np.testing.assert_array_equal(functional.get_4bit_type(qt, device="cpu").numpy().astype(np.float32), codes)


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


def matmul_cases(t: QType) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """(k, n_outs, n_toks): every tile edge at one block; decode (1) and prompt (>= 8, the panel GEMM's 16-row
    panels and 8-column groups where an ISA has them) token counts at the larger k."""
    k1, k2, k3 = matmul_ks(t)
    return [(k1, tuple(range(1, 18)), (1, 2, 3, 4, 5, 8, 9, 17, 33)),
            (k2, (1, 4, 5, 16, 17), (1, 3, 8, 17)),
            (k3, (1, 5, 17), (1, 3, 8, 17, 33))]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("t,case", [(t, i) for t in MATMUL_TYPES for i in range(3)],
                         ids=[f"{t.name}-k{matmul_ks(t)[i]}" for t in MATMUL_TYPES for i in range(3)])
def test_matmul_vs_oracle_and_generic(isa, t, case):
    k, n_outs, n_toks = matmul_cases(t)[case]
    rng = np.random.default_rng(int(t) * 10007 + k)
    for n_out in n_outs:
        wb, w = random_weights(t, n_out, k, rng)
        for n_tok in n_toks:
            x = make_x(n_tok, k, rng)
            ref, tol = oracle_product(t, w, x)
            _core.set_isa(isa)
            y1 = _core.matmul(int(t), wb, n_out, k, x, n_threads=1)
            y2 = _core.matmul(int(t), wb, n_out, k, x, n_threads=2)
            assert y1.shape == (n_tok, n_out)
            err = np.abs(y1 - ref)
            assert np.all(err <= tol), (
                f"{isa} {t.name} k={k} n_out={n_out} n_tok={n_tok}: max err/tol {np.max(err / tol):.3g}")
            np.testing.assert_array_equal(y1, y2)
            if isa != "generic":
                _core.set_isa("generic")
                yg = _core.matmul(int(t), wb, n_out, k, x, n_threads=1)
                assert np.all(np.abs(y1 - yg) <= 2 * tol), f"{isa} {t.name} k={k} n_out={n_out} n_tok={n_tok}"


CODEBOOK_TYPES = [t for t in MATMUL_TYPES if t.name in INT8_CODES]
EXACT_CODES = {"NF4": oracle.NF4_CODES, "FP4": oracle.FP4_CODES}


@pytest.mark.parametrize("t", CODEBOOK_TYPES, ids=names(CODEBOOK_TYPES))
def test_runtime_approximation_is_close_to_exact_codes(t):
    # The int8 code table moves each weight by at most half an int8 step of its block's absmax.
    exact = EXACT_CODES[t.name].astype(np.float64)
    assert np.max(np.abs(INT8_CODES[t.name] / 127.0 - exact)) <= 0.5 / 127 + 1e-12
    rng = np.random.default_rng(7)
    k, n_out = 256, 5
    wb, w_approx = random_weights(t, n_out, k, rng)
    raw = np.frombuffer(wb, np.uint8).reshape(-1, t.type_size)
    w_exact = (exact[code_indices(raw)] * raw[:, :4].copy().view(np.float32)).reshape(n_out, k)
    x = make_x(3, k, rng)
    y = _core.matmul(int(t), wb, n_out, k, x)
    bound = (np.abs(x.astype(np.float64)) @ np.abs(w_exact - w_approx).T
             + np.abs(x.astype(np.float64) - dequant_act_np(x)) @ np.abs(w_exact).T)
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
    gate64 = gate.astype(np.float64)  # GELU's tanh approximation (torch's gelu(approximate="tanh"))
    ref = 0.5 * gate64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate64 + 0.044715 * gate64**3))) * x64
    np.testing.assert_allclose(_core.gelu_mul(gate, x), ref, rtol=1e-5, atol=1e-6)

    dot = _core.dot_f32(x, g)
    assert abs(dot - float(x64 @ g64)) <= 1e-5 * float(np.abs(x64) @ np.abs(g64)) + 1e-30

    ref = x64 + np.float64(np.float32(0.37)) * g64
    np.testing.assert_allclose(_core.axpy_f32(x, 0.37, g), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rmsnorm_eps_where_it_dominates(isa, eps):
    """At activations of 1e-3 the mean square (~1e-6) is the size of eps, so eps inside the square root
    (x / sqrt(mean(x^2) + eps)) and eps added after it (x / (sqrt(mean(x^2)) + eps)) differ by tens of percent:
    a kernel that put it in the wrong place fails here at once."""
    rng = np.random.default_rng(7)
    _core.set_isa(isa)
    for n in (8, 64, 576, 2048):
        x = (rng.standard_normal(n) * 1e-3).astype(np.float32)
        w = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
        x64 = x.astype(np.float64)
        ref = x64 / np.sqrt(np.mean(x64 * x64) + eps) * w
        np.testing.assert_allclose(_core.rmsnorm(x, w, eps), ref, rtol=1e-5, atol=1e-9)
        wrong = x64 / (np.sqrt(np.mean(x64 * x64)) + eps) * w
        assert np.max(np.abs(wrong - ref)) > 0.05 * np.max(np.abs(ref))  # the test can tell the two apart


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("nh,hd,n", [(1, 64, 1), (3, 64, 37), (4, 128, 300), (5, 256, 9), (7, 80, 20), (2, 24, 5)])
def test_weighted_rows(isa, dtype, nh, hd, n):
    """Attention's probability-weighted sum of value rows (Kernels::weighted_rows) against float64 numpy: every
    head tile (1-4 heads and more), head sizes that are and are not multiples of 16, fp16 and f32 rows."""
    rng = np.random.default_rng(nh * 1000 + n)
    _core.set_isa(isa)
    out = rng.standard_normal((nh, hd)).astype(np.float32)
    p = rng.random((nh, n)).astype(np.float32)
    p /= p.sum(axis=1, keepdims=True)
    rows = (rng.standard_normal((n, hd)) * 4).astype(dtype)
    ref = out.astype(np.float64) + p.astype(np.float64) @ rows.astype(np.float64)
    got = _core.weighted_rows(out, p, rows)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(lowbit.LowbitError, match="weighted_rows"):
        _core.weighted_rows(out, p[:, :-1], rows)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("nh,hd,n", [(1, 64, 1), (3, 64, 37), (4, 128, 300), (2, 256, 8), (7, 80, 15), (2, 24, 5),
                                     (1, 520, 3)])
def test_attn_scores(isa, dtype, nh, hd, n):
    """Attention scores (Kernels::attn_scores) against float64 numpy: key counts that are and are not
    multiples of the kernel's 8, head sizes that are and are not multiples of 8, fp16 and f32 keys."""
    rng = np.random.default_rng(nh * 1000 + n + hd)
    _core.set_isa(isa)
    q = rng.standard_normal((nh, hd)).astype(np.float32)
    rows = (rng.standard_normal((n, hd)) * 2).astype(dtype)
    scale = 1 / np.sqrt(hd)
    ref = scale * q.astype(np.float64) @ rows.astype(np.float64).T
    bound = 1e-5 * scale * np.abs(q.astype(np.float64)) @ np.abs(rows.astype(np.float64)).T + 1e-6
    got = _core.attn_scores(q, rows, scale)
    assert got.shape == (nh, n)
    assert np.all(np.abs(got - ref) <= bound)
    with pytest.raises(lowbit.LowbitError, match="attn_scores"):
        _core.attn_scores(q, rows[:, :-1], scale)


def test_matmul_errors():
    with pytest.raises(lowbit.LowbitError, match="multiple of the weight block size"):
        _core.matmul(int(QType.Q4_0), b"\0" * 18, 1, 48, np.zeros(48, np.float32))
    with pytest.raises(lowbit.LowbitError, match="bytes"):
        _core.matmul(int(QType.Q8_0), b"\0" * 10, 1, 32, np.zeros(32, np.float32))
    with pytest.raises(lowbit.LowbitError, match="no CPU matmul kernel"):
        _core.matmul(16, b"\0" * 66, 1, 256, np.zeros(256, np.float32))  # IQ2_XXS: known by size only



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
@pytest.mark.parametrize("t", QUANTIZED, ids=names(QUANTIZED))
def test_load_time_panels_vs_oracle_and_rows(isa, t):
    """Weights repacked into 16-row panels (what the model does at load on CPUs with panel kernels): the same
    products as the row layout within the oracle's tolerance, for decode and prompt column counts. A type
    without a panel kernel on the ISA (type_kernels()) has no panel layout."""
    _core.set_isa(isa)
    has_panel = dict((r[0], r[3]) for r in _core.type_kernels())[t.name]
    rng = np.random.default_rng(int(t) * 31)
    for k in matmul_ks(t)[::2]:
        for n_out in (16, 48):
            wb, w = random_weights(t, n_out, k, rng)
            for n_tok in (1, 3, 8, 9, 33):
                x = make_x(n_tok, k, rng)
                yp = _core.matmul_panels(int(t), wb, n_out, k, x, n_threads=1)
                if not has_panel:
                    assert yp is None, f"{isa} reports no {t.name} panel kernel, yet matmul_panels ran one"
                    continue
                assert yp is not None, f"{isa} reports a {t.name} panel kernel, yet matmul_panels has none"
                ref, tol = oracle_product(t, w, x)
                err = np.abs(yp - ref)
                assert np.all(err <= tol), f"{isa} {t.name} k={k} n_out={n_out} n_tok={n_tok}: {np.max(err / tol):.3g}"
                np.testing.assert_array_equal(yp, _core.matmul_panels(int(t), wb, n_out, k, x, n_threads=2))
                yr = _core.matmul(int(t), wb, n_out, k, x, n_threads=1)
                assert np.all(np.abs(yp - yr) <= 2 * tol)
        # 17 rows have no panel layout: the caller must use the rows.
        wb, _ = random_weights(t, 17, k, rng)
        assert _core.matmul_panels(int(t), wb, 17, k, make_x(1, k, rng), n_threads=1) is None


def cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_vnni" in f.read()
    except OSError:
        return False
