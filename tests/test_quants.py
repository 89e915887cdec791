"""Every type of the registry (lowbit.QType) against independent oracles: gguf-py and llama.cpp's own library
(tests/llamacpp_oracle.py) for ggml's types, bitsandbytes for NF4, NF4_DQ and FP4, numpy (tests/oracle.py).

The type lists come from the registry, so a type added to cpp/include/lowbit/qtypes.def is tested here without
an edit; what the registry does not know (which oracle covers a type) is the ORACLE_FACTS table below, and
test_every_type_has_oracles fails until a new type has its row there or an oracle by its ggml name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import lowbit
from lowbit import quants as Q
from lowbit.quants import QType

import llamacpp_oracle
import oracle

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as G  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

# lowbit's private types take ids from here up (qtypes.def): no ggml or gguf-py counterpart.
PRIVATE_ID_BASE = 1024


def dequantize_q8_k(data: np.ndarray, n: int) -> np.ndarray:
    """Q8_K (ggml-common.h): fp32 d, 256 int8 qs, 16 int16 bsums that dequantize ignores; y = d * qs in fp32."""
    blk = np.asarray(data, np.uint8).reshape(-1, 292)
    d = blk[:, :4].copy().view(np.float32)
    return (blk[:, 4:260].view(np.int8).astype(np.float32) * d).reshape(-1)[:n]


@dataclass(frozen=True)
class OracleFacts:
    """What the registry does not hold about a type's oracles (defaults: a ggml type gguf-py dequantizes)."""

    gguf_quantizes: bool = False  # gguf.quants.quantize has the type (same name in GGMLQuantizationType)
    dequantize: Callable[[np.ndarray, int], np.ndarray] | None = None  # when gguf.quants.dequantize lacks it
    bnb_quant_type: str | None = None  # bitsandbytes quantize_4bit(quant_type=...)


ORACLE_FACTS: dict[str, OracleFacts] = {
    "F16": OracleFacts(gguf_quantizes=True),
    "BF16": OracleFacts(gguf_quantizes=True),
    "Q4_0": OracleFacts(gguf_quantizes=True),
    "Q4_1": OracleFacts(gguf_quantizes=True),
    "Q5_0": OracleFacts(gguf_quantizes=True),
    "Q5_1": OracleFacts(gguf_quantizes=True),
    "Q8_0": OracleFacts(gguf_quantizes=True),
    "Q8_K": OracleFacts(dequantize=dequantize_q8_k),
    "NF4": OracleFacts(dequantize=oracle.dequantize_nf4, bnb_quant_type="nf4"),
    "NF4_DQ": OracleFacts(dequantize=oracle.dequantize_nf4_dq),  # quant_state tests below
    "FP4": OracleFacts(dequantize=oracle.dequantize_fp4, bnb_quant_type="fp4"),
}


def facts(t: QType) -> OracleFacts:
    return ORACLE_FACTS.get(t.name, OracleFacts())


def names(types) -> list[str]:
    return [t.name for t in types]


ALL_TYPES = list(QType)
GGML_TYPES = [t for t in QType if int(t) < PRIVATE_ID_BASE]
# Block types (NF4_DQ's layout is tensor-level: its own tests below).
BLOCK_TYPES = [t for t in QType if t.is_quantized and not Q.type_info(t).tensor_level]
GGUF_QUANTIZED = [t for t in QType if facts(t).gguf_quantizes]
BNB_TYPES = [t for t in QType if facts(t).bnb_quant_type]
ISAS = [i for i in ("generic", "avx2", "avx512", "neon") if Q.quantize_isa_available(i)]


@pytest.fixture(params=ISAS)
def isa(request):
    Q.set_quantize_isa(request.param)
    yield request.param
    Q.set_quantize_isa("auto")


@pytest.fixture(scope="module")
def llamacpp() -> llamacpp_oracle.LlamaCpp:
    lib, why = llamacpp_oracle.load()
    if lib is None:
        pytest.skip(f"no llama.cpp oracle: {why}")
    return lib


def gguf_bytes(x: np.ndarray, t: QType) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.ascontiguousarray(gguf.quants.quantize(x, G[t.name])).view(np.uint8).reshape(x.shape[0], -1)


def reference_dequantize(raw: np.ndarray, t: QType, n: int) -> np.ndarray:
    """The oracle's float32 values of n elements of raw blocks of t."""
    own = facts(t).dequantize
    if own is not None:
        return own(raw.reshape(-1), n)
    return gguf.quants.dequantize(raw.reshape(-1), G[t.name]).astype(np.float32).reshape(-1)[:n]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---- inputs --------------------------------------------------------------------------------------------

ROW = int(np.lcm.reduce([t.block_size for t in QType]))  # one row holds whole blocks of every type (256)


def _input_kinds(rng: np.random.Generator, n: int = 16) -> dict[str, np.ndarray]:
    """(n, ROW) float32 rows per kind of input the quantizers' corners live in."""
    normal = rng.standard_normal((n, ROW))
    outlier = normal * 0.01
    outlier[np.arange(n)[:, None], np.arange(0, ROW, 32) + rng.integers(0, 32, (n, ROW // 32))] = (
        rng.standard_normal((n, ROW // 32)) * 10)
    flat = np.zeros((n, ROW))
    flat[1::2] = rng.standard_normal((n // 2, 1))  # constant rows
    flat[2::4, 32:96] = 0.75  # constant blocks among zeros
    return {
        "normal": normal,
        "uniform": rng.uniform(-1, 1, (n, ROW)),
        "t3": rng.standard_t(3, (n, ROW)),
        "outlier": outlier,
        "zero_const": flat,
        "tiny": normal * 1e-30,
        "mixed_magnitudes": normal * 10.0 ** rng.uniform(-40, 2, (n, ROW)),  # subnormals among normals
        "half_integers": rng.integers(-16, 17, (n, ROW)) / 2,
        "row_scales": normal * 10.0 ** rng.uniform(-17, 29, (n, 1)),  # scales from 1e-17 to 1e29
        "ramps": np.linspace(-1, 1, ROW)[None, :] * rng.uniform(0.1, 10, (n, 1)) + rng.uniform(-1, 1, (n, 1)),
    }


@pytest.fixture(scope="module")
def quant_inputs() -> tuple[np.ndarray, list[str]]:
    """All kinds stacked: (rows, ROW) float32 and each row's kind."""
    kinds = _input_kinds(np.random.default_rng(2024))
    with np.errstate(under="ignore"):
        x = np.concatenate([v.astype(np.float32) for v in kinds.values()])
    return x, [k for k, v in kinds.items() for _ in range(len(v))]


def differing_rows(ours: np.ndarray, ref: np.ndarray, kinds: list[str]) -> str:
    bad = np.nonzero((ours != ref).reshape(ours.shape[0], -1).any(axis=1))[0]
    if bad.size == 0:
        return ""
    return f"{bad.size} rows differ, kinds {sorted({kinds[i] for i in bad})}, rows {bad[:8].tolist()}"


def edge_rows() -> np.ndarray:
    rng = np.random.default_rng(1)
    rows = []
    rows.append(np.zeros(64, np.float32))  # zeros
    r = (rng.standard_normal(64) * 1e-3).astype(np.float32)
    r[5] = 1e4  # a single huge value
    rows.append(r)
    r = rng.standard_normal(64).astype(np.float32)
    r[3], r[40] = -7.0, -7.0  # negative abs-max first
    r[10], r[50] = 7.0, 7.0
    rows.append(r)
    # exact ties: with abs-max -8, id = 1 and x + 8.5 lands on .5 / integers; Q8_0 with amax 127 -> halves
    rows.append(np.concatenate([np.arange(-8, 8, 0.5, dtype=np.float32), np.arange(-127, 127, 8, dtype=np.float32)]))
    r = np.linspace(-1, 1, 64, dtype=np.float32)
    r[0] = -1.0
    rows.append(r)
    # subnormal elements with a normal scale, and 65504-ish / 1e30 magnitudes
    r = rng.standard_normal(64).astype(np.float32)
    r[:16] = np.float32(1e-40) * np.arange(16, dtype=np.float32)
    rows.append(r)
    rows.append((rng.standard_normal(64) * 65504).astype(np.float32))
    rows.append(np.full(64, 65519.0, np.float32))
    rows.append(np.full(64, 65520.0, np.float32) * np.where(np.arange(64) % 2, 1, -1).astype(np.float32))
    rows.append((rng.standard_normal(64) * 1e30).astype(np.float32))
    rows.append((rng.standard_normal(64) * 1e-30).astype(np.float32))
    # all-subnormal block: 1/d overflows in fp32 (the reference's non-finite path)
    rows.append(np.float32(1e-39) * np.arange(1, 65, dtype=np.float32))
    # values just around the Q4_0 / Q4_1 decision points (x*id + 8.5 rounding, ties in fp32)
    base = (np.arange(64, dtype=np.float32) % 17 - 8) / np.float32(8)
    rows.append(np.nextafter(base, np.float32(2)).astype(np.float32))
    rows.append(np.nextafter(base, np.float32(-2)).astype(np.float32))
    rows.append(((np.arange(64) % 31) * np.float32(1 / 3)).astype(np.float32))
    return np.stack(rows)


def edge_block_rows() -> np.ndarray:
    """edge_rows regrouped into ROW-wide rows (padded with normal values), for types with 256-element blocks."""
    e = edge_rows().reshape(-1)
    pad = np.random.default_rng(4).standard_normal(-e.size % ROW).astype(np.float32)
    return np.concatenate([e, pad]).reshape(-1, ROW)


# ---- the registry --------------------------------------------------------------------------------------

def test_qtype_is_the_supported_rows():
    infos = Q.all_type_infos()
    assert [i.id for i in infos] == sorted({i.id for i in infos})  # ids unique, in id order
    supported = [i for i in infos if i.supported]
    assert [(i.name, i.id) for i in supported] == [(m.name, int(m)) for m in QType]
    for m in QType:
        info = Q.type_info(m)
        assert (m.block_size, m.type_size, m.is_quantized) == (info.block_size, info.type_size, info.is_quantized)
        assert info.is_quantized == (info.block_size > 1)


def test_registry_ids_and_sizes_equal_gguf():
    for gt, (bs, ts) in GGML_QUANT_SIZES.items():
        info = Q.type_info(int(gt))
        assert info.name == gt.name
        assert info.block_size == bs
        if gt != G.Q8_1:  # gguf-py's Q8_1 size (40) is stale: ggml's block is 36 bytes
            assert info.type_size == ts, gt.name
    for info in Q.all_type_infos():
        if info.id >= PRIVATE_ID_BASE:
            assert info.name not in G.__members__, f"{info.name} is private to lowbit, yet gguf-py names it"
        elif info.supported:
            assert int(G[info.name]) == info.id, info.name


def test_registry_sizes_equal_llama_cpp(llamacpp):
    for info in Q.all_type_infos():
        if info.id < PRIVATE_ID_BASE:
            assert (llamacpp.block_size(info.id), llamacpp.type_size(info.id)) == (info.block_size, info.type_size), (
                info.name)


def test_every_type_has_oracles():
    for t in QType:
        f = facts(t)
        if f.dequantize is None:
            assert t.name in G.__members__, f"{t.name}: no dequantize oracle; add an ORACLE_FACTS row"
            one_block = np.zeros(t.type_size, np.uint8)
            reference_dequantize(one_block, t, t.block_size)  # gguf-py raises where it has no layout
        ggml = int(t) < PRIVATE_ID_BASE  # llama.cpp's quantizer covers every ggml type
        assert ggml or f.bnb_quant_type or t.name == "NF4_DQ", f"{t.name}: no quantize oracle; add one"


# ---- dequantize ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", BLOCK_TYPES, ids=names(BLOCK_TYPES))
def test_dequantize_random_blocks_equals_oracle(t):
    rng = np.random.default_rng(int(t))
    nblk = 384
    raw = llamacpp_oracle.random_blocks(t.name, t.type_size, nblk, rng)
    n = nblk * t.block_size
    ours = lowbit.dequantize(raw, t, (n,))
    with np.errstate(all="ignore"):
        ref = reference_dequantize(raw, t, n)
    assert same_bits(ours, ref)
    if t.name in oracle.DEQUANTIZE:
        assert same_bits(ours, oracle.DEQUANTIZE[t.name](raw.reshape(-1), n))


GGML_BLOCK_TYPES = [t for t in BLOCK_TYPES if int(t) < PRIVATE_ID_BASE]


@pytest.mark.parametrize("t", GGML_BLOCK_TYPES, ids=names(GGML_BLOCK_TYPES))
def test_dequantize_random_blocks_equals_llama_cpp(t, llamacpp):
    rng = np.random.default_rng(int(t) + 1)
    nblk = 384
    raw = llamacpp_oracle.random_blocks(t.name, t.type_size, nblk, rng)
    n = nblk * t.block_size
    assert same_bits(lowbit.dequantize(raw, t, (n,)), llamacpp.dequantize(raw, t.name, n))


# ---- quantize against gguf-py and llama.cpp --------------------------------------------------------------

@pytest.mark.parametrize("t", GGUF_QUANTIZED, ids=names(GGUF_QUANTIZED))
def test_quantize_equals_gguf(t, isa, quant_inputs):
    x, kinds = quant_inputs
    assert differing_rows(lowbit.quantize(x, t), gguf_bytes(x, t), kinds) == ""


@pytest.mark.parametrize("t", GGUF_QUANTIZED, ids=names(GGUF_QUANTIZED))
def test_quantize_edges_equal_gguf(t, isa):
    x = edge_rows()
    ours = lowbit.quantize(x, t)
    ref = gguf_bytes(x, t)
    bad = np.nonzero((ours != ref).any(axis=1))[0]
    assert bad.size == 0, f"rows {bad.tolist()} differ from gguf"


ORACLE_QUANTIZED = [t for t in GGUF_QUANTIZED if t.name in oracle.QUANTIZE]


@pytest.mark.parametrize("t", ORACLE_QUANTIZED, ids=names(ORACLE_QUANTIZED))
def test_oracle_equals_gguf(t):
    x = np.concatenate([edge_rows(), np.random.standard_normal((8, 64)).astype(np.float32)])
    with np.errstate(all="ignore"):
        ours = oracle.QUANTIZE[t.name](x).reshape(x.shape[0], -1)
    assert np.array_equal(ours, gguf_bytes(x, t))


def test_q4_0_tie_rounding_matches_gguf(isa):
    # Values where x*id lands within an fp32 rounding of k - 8.5: a fused multiply-add or a float64
    # evaluation would give a different nibble than gguf-py's two fp32 roundings.
    rng = np.random.default_rng(7)
    rows = []
    for _ in range(64):
        d = np.float32(rng.uniform(0.01, 2.0))
        k = rng.integers(-7, 8, size=31).astype(np.float32) + np.float32(0.5)
        v = (k * d).astype(np.float32)
        v = np.nextafter(v, np.where(rng.random(31) < 0.5, -np.inf, np.inf).astype(np.float32)).astype(np.float32)
        rows.append(np.concatenate([[-8 * d], v]).astype(np.float32))
    x = np.stack(rows)
    assert np.array_equal(lowbit.quantize(x, QType.Q4_0), gguf_bytes(x, QType.Q4_0))


@pytest.mark.parametrize("t", GGML_TYPES, ids=names(GGML_TYPES))
def test_quantize_equals_llama_cpp(t, llamacpp, quant_inputs):
    x, kinds = quant_inputs
    ref = llamacpp.quantize(x, t.name, int(t))
    assert differing_rows(lowbit.quantize(x, t), ref, kinds) == ""
    edges = edge_block_rows()
    assert differing_rows(lowbit.quantize(edges, t), llamacpp.quantize(edges, t.name, int(t)),
                          ["edges"] * len(edges)) == ""


def test_fp16_bf16_conversion_all_float_classes():
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = np.concatenate([x, np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.996, 65520, 6.1e-5, 5.96e-8,
                                     2.98e-8, 2.9802326e-08, 1e-45], np.float32)])
    finite = np.isfinite(x)
    ours16 = lowbit.quantize(x, QType.F16).view(np.uint16)
    with np.errstate(all="ignore"):
        ref16 = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(ours16[finite], ref16[finite])
    assert np.all(np.isnan(ours16[~np.isnan(x)].view(np.float16)) == False)  # noqa: E712
    assert np.all(np.isnan(ours16[np.isnan(x)].view(np.float16)))
    ours_bf = lowbit.quantize(x, QType.BF16).view(np.uint16)
    assert np.array_equal(ours_bf, gguf.quants.quantize(x, G.BF16).view(np.uint16))
    # dequantize: every fp16 bit pattern
    allh = np.arange(0x10000, dtype=np.uint32).astype(np.uint16)
    back = lowbit.dequantize(allh.view(np.uint8), QType.F16, (0x10000,))
    ref = allh.view(np.float16).astype(np.float32)
    same = (back.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(back) & np.isnan(ref))
    assert same.all()


# ---- NF4, NF4_DQ and FP4 against bitsandbytes -------------------------------------------------------------

bnbF = None


def _bnb():
    global bnbF
    if bnbF is None:
        bnbF = pytest.importorskip("bitsandbytes.functional")
    return bnbF


def test_4bit_code_values_equal_bitsandbytes():
    F = _bnb()
    ref = F.get_4bit_type("nf4", device="cpu").numpy().astype(np.float32)
    assert np.array_equal(Q.nf4_codes(), ref)
    assert np.array_equal(oracle.NF4_CODES, ref)
    assert np.array_equal(oracle.FP4_CODES, F.get_4bit_type("fp4", device="cpu").numpy().astype(np.float32))
    dyn = F.create_dynamic_map(signed=True).numpy().astype(np.float32)
    assert np.array_equal(np.asarray(lowbit._core.dynamic_codes(), np.float32), dyn)
    assert np.array_equal(oracle.dynamic_codes(), dyn)


def _bnb_inputs(codes: np.ndarray, more: np.ndarray) -> np.ndarray:
    """(rows, 128) float32: the code book's decision points and their neighbours, corners, then `more`."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal((24, 128)).astype(np.float32)
    a[0] = 0.0
    a[1, :64] = 1e-40  # subnormal absmax: the 1e-38 clamp
    # With absmax 1 the scaled values are the inputs: exact midpoints between sorted code values (a tie goes
    # to the lower value), and one ulp either side of each.
    values = np.unique(codes.astype(np.float32))
    mids = ((values[:-1] + values[1:]) / np.float32(2)).astype(np.float32)
    m = mids.size
    for row, shifted in ((3, mids), (5, np.nextafter(mids, np.float32(2))), (6, np.nextafter(mids, np.float32(-2)))):
        a[row] = 0.0
        a[row, :m], a[row, m] = shifted, 1.0
        a[row, 64:64 + m], a[row, 64 + m] = shifted, -1.0
    a[4] *= np.float32(1e30)
    return np.concatenate([a, more.reshape(-1, 128)])


@pytest.mark.parametrize("t", BNB_TYPES, ids=names(BNB_TYPES))
def test_4bit_equals_bitsandbytes(t, quant_inputs):
    F = _bnb()
    import torch

    qt = facts(t).bnb_quant_type
    x = _bnb_inputs(F.get_4bit_type(qt, device="cpu").numpy(), quant_inputs[0])
    packed, st = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type=qt)
    ours = lowbit.quantize(x, t).reshape(-1, t.type_size)
    assert same_bits(ours[:, :4].copy().view(np.float32).reshape(-1), st.absmax.numpy())
    assert np.array_equal(ours[:, 4:].reshape(-1), packed.numpy().reshape(-1))
    if t.name in oracle.QUANTIZE:
        assert np.array_equal(oracle.QUANTIZE[t.name](x), ours.reshape(-1))
    ref = F.dequantize_4bit(packed, st).numpy()
    got = lowbit.dequantize(ours, t, x.shape)
    if t.name == "FP4":
        # FP4 code 8 is a zero whose sign bitsandbytes is not consistent about: its CUDA kernel multiplies +0 by
        # the sign (-0.0), while get_4bit_type("fp4") and the CPU kernel of bitsandbytes 0.50.2 give +0.0.
        # lowbit returns -0.0 (spec/quant-types.md#fp4). Every other element is compared bit for bit.
        q = ours[:, 4:]
        code8 = (np.stack([q >> 4, q & 0x0F], axis=-1).reshape(x.shape) == 8) & (st.absmax.numpy() > 0).repeat(
            64).reshape(x.shape)
        assert code8.any() and same_bits(got[~code8], ref[~code8])
        assert (ref[code8] == 0).all() and np.signbit(got[code8]).all()
    else:
        assert same_bits(got, ref)


@pytest.mark.parametrize("t", BNB_TYPES, ids=names(BNB_TYPES))
def test_4bit_nibble_order_is_high_first(t):
    x = np.zeros(64, np.float32)
    x[0], x[1] = 1.0, -1.0
    b = lowbit.quantize(x, t)
    assert b[4] >> 4 != b[4] & 15  # the first element's code is in the high nibble, the second's in the low
    assert np.array_equal(reference_dequantize(b, t, 64)[:2], [1.0, -1.0])


def _dyadic_absmax_input(nb: int, rng) -> np.ndarray:
    # Each block's absmax is k/1024: every fp32 sum of them is exact, so torch's summation order cannot
    # move bitsandbytes' offset and the whole quant_state must match bit for bit.
    x = (rng.uniform(-1, 1, size=(nb, 64)) * 0.01).astype(np.float32)
    am = rng.integers(20, 2000, size=nb).astype(np.float32) / np.float32(1024)
    x *= am[:, None] / np.abs(x).max(axis=1, keepdims=True)
    x[np.arange(nb), rng.integers(0, 64, size=nb)] = am * np.where(rng.random(nb) < 0.5, -1, 1)
    return x.astype(np.float32)


def _dq_parts(buf: np.ndarray, n: int):
    nb, ng = n // 64, -(-(n // 64) // 256)
    offset = buf[:4].copy().view(np.float32)[0]
    absmax2 = buf[4:4 + 4 * ng].copy().view(np.float32)
    qabs = buf[4 + 4 * ng:4 + 4 * ng + nb]
    qs = buf[4 + 4 * ng + nb:]
    return offset, absmax2, qabs, qs


def _bnb_blockwise_reference():
    # bitsandbytes' pure-PyTorch quantize_blockwise (backends/default): nearest code, ties to the lower.
    import gc
    import types

    import bitsandbytes.backends.default.ops as dops

    for f in gc.get_objects():
        if (isinstance(f, types.FunctionType) and f.__module__ == dops.__name__
                and f.__code__.co_varnames[:3] == ("A", "code", "blocksize")):
            return f
    pytest.fail("bitsandbytes' default quantize_blockwise kernel not found")


@pytest.mark.parametrize("nb", [3, 256, 700])
def test_nf4_dq_equals_bitsandbytes_quant_state(nb):
    F = _bnb()
    import torch

    x = _dyadic_absmax_input(nb, np.random.default_rng(nb))
    packed, st = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = lowbit.quantize(x, QType.NF4_DQ)
    assert ours.size == Q.tensor_nbytes(QType.NF4_DQ, x.size)
    offset, absmax2, qabs, qs = _dq_parts(ours, x.size)
    assert offset == np.float32(st.offset.item())
    assert np.array_equal(absmax2, st.state2.absmax.numpy())
    assert np.array_equal(qs, packed.numpy().reshape(-1))
    # nested codes: bitsandbytes' reference blockwise kernel on the same absmax - offset
    plain, st_plain = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4")
    ref_q, ref_a2 = _bnb_blockwise_reference()(st_plain.absmax - st.offset, st.state2.code, 256)
    assert np.array_equal(qabs, ref_q.numpy())
    assert np.array_equal(absmax2, ref_a2.numpy())
    assert np.array_equal(ours, oracle.quantize_nf4_dq(x))
    # dequantize with bitsandbytes from OUR state
    st.absmax = torch.from_numpy(qabs.copy())
    st.state2.absmax = torch.from_numpy(absmax2.copy())
    ref = F.dequantize_4bit(torch.from_numpy(qs.copy()).reshape(-1, 1), st).numpy()
    back = lowbit.dequantize(ours, QType.NF4_DQ, x.shape)
    assert np.array_equal(back, ref)
    assert np.array_equal(back.reshape(-1), oracle.dequantize_nf4_dq(ours, x.size))


def test_nf4_dq_random_normal_offset_close_to_bitsandbytes():
    F = _bnb()
    import torch

    x = np.random.standard_normal((300, 256)).astype(np.float32)
    _, st = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4", compress_statistics=True)
    offset, *_ = _dq_parts(lowbit.quantize(x, QType.NF4_DQ), x.size)
    ref = np.float32(st.offset.item())
    # torch sums in fp32 in its own order; ours is the correctly rounded mean: at most a few ulps apart
    assert abs(int(offset.view(np.int32)) - int(ref.view(np.int32))) <= 2




# ---- threads, ISAs, API -------------------------------------------------------------------------------

@pytest.mark.parametrize("t", ALL_TYPES, ids=names(ALL_TYPES))
def test_threaded_equals_single_threaded(t):
    x = np.random.standard_normal((288, 1024)).astype(np.float32)  # 295K elements: above the threading threshold
    one = lowbit.quantize(x, t, n_threads=1)
    many = lowbit.quantize(x, t, n_threads=3)
    assert np.array_equal(one, many)
    a = lowbit.dequantize(one, t, x.shape, n_threads=1)
    b = lowbit.dequantize(one, t, x.shape, n_threads=3)
    assert same_bits(a, b)


@pytest.mark.parametrize("t", ALL_TYPES, ids=names(ALL_TYPES))
def test_every_isa_quantizer_equals_generic(t, quant_inputs):
    x = np.concatenate([edge_block_rows(), quant_inputs[0]])
    x[1, 7] = np.inf
    x[2, 3] = np.nan
    Q.set_quantize_isa("generic")
    ref = lowbit.quantize(x, t)
    try:
        for isa in ISAS:
            Q.set_quantize_isa(isa)
            assert Q.quantize_isa() == isa
            assert np.array_equal(lowbit.quantize(x, t), ref), isa
    finally:
        Q.set_quantize_isa("auto")


def test_qtype_helpers_and_sizes():
    assert QType.from_name("q4_0") is QType.Q4_0
    assert QType.from_name("Iq4_Xs") is QType.IQ4_XS
    for t in QType:
        assert QType.parse(t.name.lower()) is t and QType.parse(int(t)) is t
    assert QType.Q8_0.block_size == 32 and QType.Q8_0.type_size == 34
    assert Q.row_size(QType.Q4_0, 4096) == 4096 // 32 * 18
    assert Q.tensor_nbytes(QType.NF4_DQ, 64 * 300) == 4 + 4 * 2 + 300 + 300 * 32
    assert Q.type_info(1024).block_size == 64 and Q.type_info(1024).type_size == 36
    with pytest.raises(lowbit.LowbitError):
        Q.type_info(4)  # a ggml id retired before lowbit existed
    with pytest.raises(lowbit.LowbitError):
        Q.tensor_nbytes(QType.F32, 2**62)  # 2**64 bytes: overflows 63 bits
    with pytest.raises(lowbit.LowbitError):
        QType.from_name("q3_x")


def test_bad_inputs_raise():
    x = np.zeros((2, 48), np.float32)
    with pytest.raises(lowbit.LowbitError, match="block size"):
        lowbit.quantize(x, QType.Q4_0)
    with pytest.raises(lowbit.LowbitError, match="block size"):
        lowbit.quantize(np.zeros((2, 64), np.float32), QType.Q4_K)
    with pytest.raises(lowbit.LowbitError, match="floating-point"):
        lowbit.quantize(np.zeros((2, 32), np.int32), QType.Q8_0)
    known_not_computed = next(i for i in Q.all_type_infos() if not i.supported)
    with pytest.raises(lowbit.LowbitError, match=known_not_computed.name):
        lowbit.quantize(np.zeros(256, np.float32), known_not_computed.id)
    good = lowbit.quantize(np.zeros((2, 32), np.float32), QType.Q8_0)
    with pytest.raises(lowbit.LowbitError, match="bytes"):
        lowbit.dequantize(good[:, :-1], QType.Q8_0, (2, 32))
    with pytest.raises(lowbit.LowbitError, match="uint8"):
        lowbit.dequantize(good.view(np.int8), QType.Q8_0, (2, 32))
    with pytest.raises(lowbit.LowbitError):
        Q.set_quantize_isa("sse9")


def test_non_contiguous_and_float64_inputs_convert():
    x = np.random.standard_normal((64, 64))
    xt = x.T  # not C-contiguous, float64
    contiguous = np.ascontiguousarray(xt, np.float32)
    assert np.array_equal(lowbit.quantize(xt, QType.Q8_0), lowbit.quantize(contiguous, QType.Q8_0))
