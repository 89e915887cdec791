"""Quant types against independent oracles: gguf.quants (llama.cpp) for Q4_0/Q4_1/Q8_0/F16/BF16, bitsandbytes for NF4."""
from __future__ import annotations

import numpy as np
import pytest

import lowbit
from lowbit import quants as Q
from lowbit.quants import QType

import oracle

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as G  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

GGUF_TYPES = {QType.Q8_0: G.Q8_0, QType.Q4_0: G.Q4_0, QType.Q4_1: G.Q4_1, QType.F16: G.F16, QType.BF16: G.BF16}
ISAS = [i for i in ("generic", "avx2", "avx512") if Q.quantize_isa_available(i)]


@pytest.fixture(params=ISAS)
def isa(request):
    Q.set_quantize_isa(request.param)
    yield request.param
    Q.set_quantize_isa("auto")


def gguf_bytes(x: np.ndarray, t: QType) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.ascontiguousarray(gguf.quants.quantize(x, GGUF_TYPES[t])).view(np.uint8).reshape(x.shape[0], -1)


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


@pytest.mark.parametrize("t", list(GGUF_TYPES))
def test_bytes_equal_gguf_random(t, isa):
    x = np.random.standard_normal((37, 256)).astype(np.float32)
    assert np.array_equal(lowbit.quantize(x, t), gguf_bytes(x, t))


@pytest.mark.parametrize("t", list(GGUF_TYPES))
def test_bytes_equal_gguf_edges(t, isa):
    x = edge_rows()
    ours = lowbit.quantize(x, t)
    ref = gguf_bytes(x, t)
    bad = np.nonzero((ours != ref).any(axis=1))[0]
    assert bad.size == 0, f"rows {bad.tolist()} differ from gguf"


@pytest.mark.parametrize("t", list(GGUF_TYPES))
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


@pytest.mark.parametrize("t", [QType.Q8_0, QType.Q4_0, QType.Q4_1])
def test_dequantize_equals_gguf_on_random_blocks(t):
    rng = np.random.default_rng(3)
    nblk = 500
    bs, ts = GGML_QUANT_SIZES[GGUF_TYPES[t]]
    raw = rng.integers(0, 256, size=(nblk, ts), dtype=np.uint8)
    # random fp16 scales, NaN/inf excluded
    for off in (0, 2) if t == QType.Q4_1 else (0,):
        h = rng.integers(0, 0x10000, size=nblk).astype(np.uint16)
        h = np.where((h & 0x7C00) == 0x7C00, h & 0x83FF, h).astype(np.uint16)
        raw[:, off:off + 2] = h.view(np.uint8).reshape(nblk, 2)
    ours = lowbit.dequantize(raw, t, (nblk * bs,))
    ref = gguf.quants.dequantize(raw, GGUF_TYPES[t]).reshape(-1)
    assert np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))
    assert np.array_equal(ours, oracle.DEQUANTIZE[t.name](raw.reshape(-1), nblk * bs))


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


# ---- NF4 against bitsandbytes ----------------------------------------------------------------------

bnbF = None


def _bnb():
    global bnbF
    if bnbF is None:
        bnbF = pytest.importorskip("bitsandbytes.functional")
    return bnbF


def test_nf4_code_values_equal_bitsandbytes():
    F = _bnb()
    ref = F.get_4bit_type("nf4", device="cpu").numpy().astype(np.float32)
    assert np.array_equal(Q.nf4_codes(), ref)
    assert np.array_equal(oracle.NF4_CODES, ref)
    dyn = F.create_dynamic_map(signed=True).numpy().astype(np.float32)
    assert np.array_equal(np.asarray(lowbit._core.dynamic_codes(), np.float32), dyn)
    assert np.array_equal(oracle.dynamic_codes(), dyn)


def _nf4_inputs():
    rng = np.random.default_rng(11)
    a = rng.standard_normal((24, 128)).astype(np.float32)
    a[0] = 0.0
    a[1, :64] = 1e-40  # subnormal absmax: the 1e-38 clamp
    # exact midpoints between codes (ties go to the lower code)
    codes = oracle.NF4_CODES
    mids = ((codes[:-1] + codes[1:]) / np.float32(2)).astype(np.float32)
    a[3, :15] = mids
    a[3, 15] = 1.0
    a[3, 64:79] = -mids
    a[3, 79] = -1.0
    a[4] *= np.float32(1e30)
    return a


def test_nf4_equals_bitsandbytes():
    F = _bnb()
    import torch

    x = _nf4_inputs()
    packed, st = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4")
    ours = lowbit.quantize(x, QType.NF4).reshape(-1, 36)
    assert np.array_equal(ours[:, :4].copy().view(np.float32).reshape(-1), st.absmax.numpy())
    assert np.array_equal(ours[:, 4:].reshape(-1), packed.numpy().reshape(-1))
    assert np.array_equal(oracle.quantize_nf4(x), ours.reshape(-1))
    ref = F.dequantize_4bit(packed, st).numpy()
    back = lowbit.dequantize(ours, QType.NF4, x.shape)
    assert np.array_equal(back, ref)


def test_nf4_nibble_order_is_high_first():
    x = np.zeros(64, np.float32)
    x[0], x[1] = 1.0, -1.0
    b = lowbit.quantize(x, QType.NF4)
    assert b[4] == (15 << 4 | 0)


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

@pytest.mark.parametrize("t", [QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.NF4, QType.F16, QType.BF16, QType.NF4_DQ])
def test_threaded_equals_single_threaded(t):
    x = np.random.standard_normal((320, 2048)).astype(np.float32)  # 2.6 MB: above the threading threshold
    one = lowbit.quantize(x, t, n_threads=1)
    many = lowbit.quantize(x, t, n_threads=3)
    assert np.array_equal(one, many)
    a = lowbit.dequantize(one, t, x.shape, n_threads=1)
    b = lowbit.dequantize(one, t, x.shape, n_threads=3)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("t", [QType.Q8_0, QType.Q4_0, QType.Q4_1])
def test_simd_equals_scalar(t):
    x = np.concatenate([edge_rows(), np.random.standard_normal((100, 64)).astype(np.float32)])
    x[5, 7] = np.inf
    x[6, 3] = np.nan
    Q.set_quantize_isa("generic")
    ref = lowbit.quantize(x, t)
    try:
        for isa in ISAS:
            Q.set_quantize_isa(isa)
            assert Q.quantize_isa() == isa
            assert np.array_equal(lowbit.quantize(x, t), ref), isa
    finally:
        Q.set_quantize_isa("auto")


def test_type_table_covers_gguf():
    for gt, (bs, ts) in GGML_QUANT_SIZES.items():
        info = Q.type_info(int(gt))
        assert info.name == gt.name
        assert info.block_size == bs
        if gt != G.Q8_1:  # gguf-py's Q8_1 size (40) is stale: ggml's block is 36 bytes
            assert info.type_size == ts
    supported = {i.name for i in Q.all_type_infos() if i.supported}
    assert supported == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                         "Q5_K", "Q6_K", "Q8_K", "IQ4_NL", "IQ4_XS", "NF4", "NF4_DQ", "FP4"}
    assert supported == {m.name for m in QType}  # Python's QType is the registry's computable rows
    assert Q.type_info(1024).block_size == 64 and Q.type_info(1024).type_size == 36
    with pytest.raises(lowbit.LowbitError):
        Q.type_info(4)


def test_qtype_helpers_and_sizes():
    assert QType.from_name("q4_0") is QType.Q4_0
    assert QType.Q8_0.block_size == 32 and QType.Q8_0.type_size == 34
    assert Q.row_size(QType.Q4_0, 4096) == 4096 // 32 * 18
    assert Q.tensor_nbytes(QType.NF4_DQ, 64 * 300) == 4 + 4 * 2 + 300 + 300 * 32
    with pytest.raises(lowbit.LowbitError):
        Q.tensor_nbytes(QType.F32, 2**62)  # 2**64 bytes: overflows 63 bits
    with pytest.raises(lowbit.LowbitError):
        QType.from_name("q3_x")


def test_bad_inputs_raise():
    x = np.zeros((2, 48), np.float32)
    with pytest.raises(lowbit.LowbitError, match="block size"):
        lowbit.quantize(x, QType.Q4_0)
    with pytest.raises(lowbit.LowbitError, match="floating-point"):
        lowbit.quantize(np.zeros((2, 32), np.int32), QType.Q8_0)
    with pytest.raises(lowbit.LowbitError):
        lowbit.quantize(np.zeros(32, np.float32), 12)  # Q4_K: known, not supported
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
    assert np.array_equal(lowbit.quantize(xt, QType.Q8_0), lowbit.quantize(np.ascontiguousarray(xt, np.float32), QType.Q8_0))
