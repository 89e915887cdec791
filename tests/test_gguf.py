"""GGUF container: lowbit's files read by llama.cpp's gguf-py, gguf-py's files read by lowbit, round trips, the
writer's streaming and atomic behaviour, and the real SmolLM2 file from llama.cpp (slow)."""
from __future__ import annotations

import gc
import math
import os
from pathlib import Path

import gguf
import gguf.quants as gq
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf import GGUFValueType as PV

import lowbit
from lowbit import LowbitError
from lowbit.gguf import GGUFField, GGUFValueType as VT

# ---- shared data -----------------------------------------------------------------------------------------

# One key per GGUF value type, with edge values, plus arrays of every item type and nested arrays.
SCALARS = [
    ("t.u8", VT.UINT8, 255), ("t.i8", VT.INT8, -128), ("t.u16", VT.UINT16, 65535), ("t.i16", VT.INT16, -32768),
    ("t.u32", VT.UINT32, 2**32 - 1), ("t.i32", VT.INT32, -(2**31)), ("t.f32", VT.FLOAT32, 1.5),
    ("t.bool_t", VT.BOOL, True), ("t.bool_f", VT.BOOL, False), ("t.str", VT.STRING, "héllo wörld ✓"),
    ("t.str_empty", VT.STRING, ""), ("t.u64", VT.UINT64, 2**64 - 1), ("t.i64", VT.INT64, -(2**63)),
    ("t.f64", VT.FLOAT64, math.pi),
]
ARRAYS = [
    ("a.u8", VT.UINT8, [0, 1, 255]), ("a.i8", VT.INT8, [-128, 0, 127]), ("a.u16", VT.UINT16, [0, 65535]),
    ("a.i16", VT.INT16, [-32768, 32767]), ("a.u32", VT.UINT32, [0, 2**32 - 1]), ("a.i32", VT.INT32, [-1, 2, -3]),
    ("a.f32", VT.FLOAT32, [0.5, -2.25, 1e-3]), ("a.bool", VT.BOOL, [True, False, True]),
    ("a.str", VT.STRING, ["a", "", "ünïcode", "two words"]), ("a.u64", VT.UINT64, [2**64 - 1, 0]),
    ("a.i64", VT.INT64, [-(2**63), 2**63 - 1]), ("a.f64", VT.FLOAT64, [math.e, -1e300]),
]
NESTED = ("a.nested", [[1, 2, 3], [4, 5], [6]])            # array of INT32 arrays
NESTED3 = ("a.nested3", [[["x", "y"], ["z"]], [["w"]]])   # three levels, strings at the bottom

QUANT_TYPES = [G.Q8_0, G.Q4_0, G.Q4_1]


def f32_of(x: float) -> float:
    return float(np.float32(x))


def tensor_cases(rng: np.random.Generator) -> list[tuple[str, G, np.ndarray, np.ndarray]]:
    """(name, ggml type, float source in numpy shape, encoded bytes made by gguf-py) for every type we write."""
    cases = []
    for name, shape in (("f32.1d", (7,)), ("f32.2d", (3, 5)), ("f32.3d", (2, 3, 4)), ("f32.4d", (2, 1, 3, 2))):
        x = rng.standard_normal(shape).astype(np.float32)
        cases.append((name, G.F32, x, x.view(np.uint8).reshape(-1)))
    x = rng.standard_normal((4, 6)).astype(np.float32)
    cases.append(("f16", G.F16, x, x.astype(np.float16).view(np.uint8).reshape(-1)))
    x = rng.standard_normal((3, 8)).astype(np.float32)
    cases.append(("bf16", G.BF16, x, gq.quantize(x, G.BF16).view(np.uint8).reshape(-1)))
    for qt in QUANT_TYPES:
        x = rng.standard_normal((5, 64)).astype(np.float32)
        cases.append((qt.name.lower(), qt, x, gq.quantize(x, qt).view(np.uint8).reshape(-1)))
    return cases


def write_lowbit_file(path: Path, rng: np.random.Generator, alignment: int = 32):
    cases = tensor_cases(rng)
    with lowbit.GGUFWriter(path, alignment=alignment) as w:
        w.add_metadata("general.architecture", "llama")
        for key, t, v in SCALARS:
            w.add_metadata(key, v, t)
        for key, t, v in ARRAYS:
            w.add_metadata(key, v, VT.ARRAY, item_type=t)
        w.add_metadata(*NESTED)
        w.add_metadata(*NESTED3)
        for name, qt, x, raw in cases:
            w.add_tensor(name, raw, qtype=int(qt), shape=x.shape)
    return cases


def flatten(v):
    if isinstance(v, list):
        return [y for x in v for y in flatten(x)]
    return [v]


def expected_value(t: VT, v):
    return f32_of(v) if t == VT.FLOAT32 else v


# ---- lowbit writes, gguf-py reads -----------------------------------------------------------------------


def test_gguf_py_reads_lowbit_file(tmp_path):
    path = tmp_path / "ours.gguf"
    cases = write_lowbit_file(path, np.random.default_rng(1))
    r = gguf.GGUFReader(path)
    for key, t, v in SCALARS:
        f = r.fields[key]
        assert [int(x) for x in f.types] == [int(t)], key
        assert f.contents() == expected_value(t, v), key
    for key, t, v in ARRAYS:
        f = r.fields[key]
        assert [int(x) for x in f.types] == [int(PV.ARRAY), int(t)], key
        want = [f32_of(x) for x in v] if t == VT.FLOAT32 else v
        assert f.contents() == want, key
    # gguf-py flattens nested arrays; it sees the types of the first item at each level.
    f = r.fields[NESTED[0]]
    assert [int(x) for x in f.types] == [9, 9, int(PV.INT32)]
    assert f.contents() == flatten(NESTED[1])
    f = r.fields[NESTED3[0]]
    assert [int(x) for x in f.types] == [9, 9, 9, int(PV.STRING)]
    assert f.contents() == flatten(NESTED3[1])
    assert r.fields["general.alignment"].types == [PV.UINT32]
    assert r.fields["general.alignment"].contents() == 32

    by_name = {t.name: t for t in r.tensors}
    assert [t.name for t in r.tensors] == [c[0] for c in cases]
    for name, qt, x, raw in cases:
        t = by_name[name]
        assert t.tensor_type == qt, name
        assert list(map(int, t.shape)) == list(reversed(x.shape)), name  # gguf-py shows ggml order
        assert np.asarray(t.data).tobytes() == raw.tobytes(), name
    # Dense, in-order, aligned data: exactly what llama.cpp's loader insists on.
    expect = r.tensors[0].data_offset
    for t in r.tensors:
        assert t.data_offset == expect and t.data_offset % 32 == 0
        expect += -(-t.n_bytes // 32) * 32


def test_lowbit_quantize_bytes_match_gguf_py(tmp_path):
    """add_tensor with a float array encodes through lowbit.quantize; gguf-py must see its own quantizer's bytes."""
    rng = np.random.default_rng(2)
    xs = {qt: rng.standard_normal((3, 96)).astype(np.float32) for qt in QUANT_TYPES + [G.F32, G.F16, G.BF16]}
    path = tmp_path / "q.gguf"
    with lowbit.GGUFWriter(path) as w:
        for qt, x in xs.items():
            w.add_tensor(qt.name, x, qtype=lowbit.QType[qt.name])
    r = gguf.GGUFReader(path)
    for t in r.tensors:
        want = gq.quantize(xs[G[t.name]], G[t.name]) if t.name != "F16" else xs[G.F16].astype(np.float16)
        assert np.asarray(t.data).tobytes() == np.asarray(want).tobytes(), t.name


# ---- gguf-py writes, lowbit reads -----------------------------------------------------------------------


def write_gguf_py_file(path: Path, rng: np.random.Generator, alignment: int | None = None):
    w = gguf.GGUFWriter(path, arch="llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, t, v in SCALARS:
        w.add_key_value(key, v, PV(int(t)))
    for key, t, v in ARRAYS:
        w.add_key_value(key, v, PV.ARRAY, sub_type=PV(int(t)))
    w.add_key_value(NESTED[0], NESTED[1], PV.ARRAY)
    cases = tensor_cases(rng)
    for name, qt, x, raw in cases:
        if qt == G.F32:
            w.add_tensor(name, x)
        elif qt == G.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, raw.reshape(x.shape[:-1] + (-1,)), raw_dtype=qt)  # uint8: shape in bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cases


@pytest.mark.parametrize("alignment", [None, 64])
def test_lowbit_reads_gguf_py_file(tmp_path, alignment):
    path = tmp_path / "theirs.gguf"
    cases = write_gguf_py_file(path, np.random.default_rng(3), alignment)
    with lowbit.GGUFFile(path) as f:
        assert f.version == 3
        assert f.alignment == (alignment or 32)
        assert f.metadata["general.architecture"] == "llama"
        for key, t, v in SCALARS:
            assert f.metadata_types[key] == t, key
            assert f.metadata[key] == expected_value(t, v), key
            assert type(f.metadata[key]) is type(v), key
        for key, t, v in ARRAYS:
            fld = f.field(key)
            assert (fld.type, fld.item_type) == (VT.ARRAY, t), key
            assert fld.value == ([f32_of(x) for x in v] if t == VT.FLOAT32 else v), key
        assert f.metadata[NESTED[0]] == NESTED[1]
        assert f.field(NESTED[0]).item_type == VT.ARRAY
        r = gguf.GGUFReader(path)
        theirs = {t.name: t for t in r.tensors}
        assert [t.name for t in f.tensors] == [c[0] for c in cases]
        for name, qt, x, raw in cases:
            t = f.tensor(name)
            assert int(t.qtype) == int(qt) and t.shape == x.shape and t.n_elements == x.size, name
            assert t.offset == theirs[name].data_offset and t.nbytes == theirs[name].n_bytes, name
            assert t.data.tobytes() == raw.tobytes(), name
            got = t.to_numpy()
            assert got.dtype == np.float32 and got.shape == x.shape, name
            if qt == G.F32:
                want = x
            elif qt == G.F16:
                want = x.astype(np.float16).astype(np.float32)
            else:
                want = gq.dequantize(raw.reshape(x.shape[0], -1), qt).reshape(x.shape)
            np.testing.assert_array_equal(got, want, err_msg=name)


# ---- round trip and API ------------------------------------------------------------------------------


def test_round_trip_values_types_and_tensors(tmp_path):
    path = tmp_path / "rt.gguf"
    cases = write_lowbit_file(path, np.random.default_rng(4), alignment=64)
    with lowbit.GGUFFile(str(path)) as f:
        assert f.alignment == 64 and f.metadata["general.alignment"] == 64
        assert f.metadata_types["general.alignment"] == VT.UINT32
        for key, t, v in SCALARS:
            assert (f.metadata_types[key], f.metadata[key]) == (t, expected_value(t, v)), key
        for key, t, v in ARRAYS:
            assert f.field(key).item_type == t
            assert f.metadata[key] == ([f32_of(x) for x in v] if t == VT.FLOAT32 else v), key
        assert f.metadata[NESTED[0]] == NESTED[1]
        assert f.metadata[NESTED3[0]] == NESTED3[1]
        assert f.field(NESTED3[0]).tree[2][0][2][0] == (9, 8, ["x", "y"])
        for name, qt, x, raw in cases:
            t = f.tensor(name)
            assert t.data.tobytes() == raw.tobytes()
            assert t.offset % 64 == 0
            if qt == G.F32:
                want = x
            elif qt == G.F16:
                want = x.astype(np.float16).astype(np.float32)
            else:
                want = gq.dequantize(raw.reshape(x.shape[0], -1), qt).reshape(x.shape)
            np.testing.assert_array_equal(t.to_numpy(), want, err_msg=name)


def test_inferred_metadata_types(tmp_path):
    path = tmp_path / "infer.gguf"
    values = {"i": 5, "neg": -7, "big": 2**40, "huge": 2**63 + 1, "f": 0.25, "b": True, "s": "txt",
              "ints": [1, 2, 3], "wide": [1, 2**40], "mixed": [1, 2.5], "strs": ["a", "b"], "empty": [],
              "np_u16": np.array([1, 2], dtype=np.uint16), "np_scalar": np.uint8(9), "tuple": (1.0, 2.0)}
    with lowbit.GGUFWriter(path) as w:
        for k, v in values.items():
            w.add_metadata(k, v)
        w.add_metadata("explicit_u8s", [1, 2], VT.UINT8)
    f = lowbit.GGUFFile(path)
    ty = f.metadata_types
    assert (ty["i"], ty["neg"], ty["big"], ty["huge"]) == (VT.INT32, VT.INT32, VT.INT64, VT.UINT64)
    assert (ty["f"], ty["b"], ty["s"], ty["np_scalar"]) == (VT.FLOAT32, VT.BOOL, VT.STRING, VT.UINT8)
    items = {k: f.field(k).item_type for k in ("ints", "wide", "mixed", "strs", "empty", "np_u16", "tuple",
                                              "explicit_u8s")}
    assert items == {"ints": VT.INT32, "wide": VT.INT64, "mixed": VT.FLOAT32, "strs": VT.STRING, "empty": VT.INT32,
                     "np_u16": VT.UINT16, "tuple": VT.FLOAT32, "explicit_u8s": VT.UINT8}
    assert f.metadata["huge"] == 2**63 + 1 and f.metadata["empty"] == [] and f.metadata["np_u16"] == [1, 2]
    # gguf-py agrees on what we wrote
    r = gguf.GGUFReader(path)
    assert r.fields["huge"].contents() == 2**63 + 1
    assert r.fields["wide"].contents() == [1, 2**40]


def test_field_copy_is_exact(tmp_path):
    src = tmp_path / "src.gguf"
    write_lowbit_file(src, np.random.default_rng(5))
    dst = tmp_path / "dst.gguf"
    with lowbit.GGUFFile(src) as f, lowbit.GGUFWriter(dst) as w:
        for key in f.metadata:
            if key != "general.alignment":
                w.add_metadata(key, f.field(key))
    a, b = lowbit.GGUFFile(src), lowbit.GGUFFile(dst)
    assert [(k, a.field(k).tree) for k in a.metadata] == [(k, b.field(k).tree) for k in b.metadata]


def test_streaming_equals_in_memory(tmp_path):
    rng = np.random.default_rng(6)
    x0 = rng.standard_normal((4, 32)).astype(np.float32)
    q = gq.quantize(rng.standard_normal((8, 64)).astype(np.float32), G.Q8_0).view(np.uint8).reshape(-1)
    x2 = rng.standard_normal(5).astype(np.float32)
    mem = tmp_path / "mem.gguf"
    with lowbit.GGUFWriter(mem) as w:
        w.add_metadata("k", "v")
        w.add_tensor("a", x0)
        w.add_tensor("b", q, qtype=int(G.Q8_0), shape=(8, 64))
        w.add_tensor("c", x2)
    stream = tmp_path / "stream.gguf"
    w = lowbit.GGUFWriter(stream)
    w.add_metadata("k", "v")
    assert w.add_tensor_info("a", (4, 32), lowbit.QType.F32) == x0.nbytes
    w.add_tensor("b", q, qtype=int(G.Q8_0), shape=(8, 64))  # in-memory, written automatically after "a"
    w.add_tensor_info("c", x2.shape, 0)
    w.write_header()
    w.write_tensor_data(x0[:1])          # pieces of one tensor
    w.write_tensor_data(memoryview(x0[1:].tobytes()))
    w.write_tensor_data(x2)
    assert w.finish() == stream
    assert stream.read_bytes() == mem.read_bytes()


def test_writer_misuse_errors(tmp_path):
    p = tmp_path / "x.gguf"
    w = lowbit.GGUFWriter(p)
    w.add_metadata("k", 1)
    with pytest.raises(LowbitError, match="duplicate metadata key 'k'"):
        w.add_metadata("k", 2)
    with pytest.raises(LowbitError, match="does not fit in UINT8"):
        w.add_metadata("u", 300, VT.UINT8)
    with pytest.raises(LowbitError, match="does not fit in INT8"):
        w.add_metadata("u", [1, -200], VT.ARRAY, item_type=VT.INT8)
    with pytest.raises(LowbitError, match="general.alignment is set by the writer"):
        w.add_metadata("general.alignment", 64, VT.UINT32)
    with pytest.raises(LowbitError, match="nested more than 8"):
        deep: list = [1]
        for _ in range(9):
            deep = [deep]
        w.add_metadata("deep", deep)
    w.add_tensor_info("t", (2, 32), lowbit.QType.Q4_0)
    with pytest.raises(LowbitError, match="duplicate tensor name 't'"):
        w.add_tensor_info("t", (2, 32), lowbit.QType.Q4_0)
    with pytest.raises(LowbitError, match="not a multiple of .*block size 32"):
        w.add_tensor_info("u", (2, 33), lowbit.QType.Q4_0)
    with pytest.raises(LowbitError, match="unknown tensor type id 77"):
        w.add_tensor_info("u", (2, 32), 77)
    with pytest.raises(LowbitError, match="must be 1 to 63 bytes"):
        w.add_tensor_info("n" * 64, (32,), 0)
    with pytest.raises(LowbitError, match="5 dims"):
        w.add_tensor_info("u", (1, 1, 1, 1, 1), 0)
    with pytest.raises(LowbitError, match="dim 0 is 0"):
        w.add_tensor_info("u", (4, 0), 0)
    with pytest.raises(LowbitError, match="bytes given"):
        w.add_tensor("u", b"\0" * 7, qtype=0, shape=(2,))
    with pytest.raises(LowbitError, match="write_header"):
        w.write_tensor_data(b"\0" * 36)
    w.add_tensor_info("v", (3,), 0)
    w.write_header()
    with pytest.raises(LowbitError, match="header is already written"):
        w.add_metadata("late", 1)
    with pytest.raises(LowbitError, match="declare every tensor before"):
        w.add_tensor_info("late", (3,), 0)
    with pytest.raises(LowbitError, match="36 bytes and 0 are written; 37 more is too many"):
        w.write_tensor_data(b"\0" * 37)
    w.write_tensor_data(b"\0" * 36)
    w.write_tensor_data(b"\0" * 4)
    with pytest.raises(LowbitError, match="tensor 'v' has 4 of 12 bytes"):
        w.finish()
    w.abort()
    assert not p.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(LowbitError, match="must be a power of two"):
        lowbit.GGUFWriter(tmp_path / "y.gguf", alignment=3)


def test_writer_is_atomic(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="boom"):
        with lowbit.GGUFWriter(target) as w:
            w.add_metadata("k", 1)
            w.add_tensor_info("t", (64,), 0)
            w.write_header()
            w.write_tensor_data(np.zeros(32, np.float32))
            assert len(list(tmp_path.glob("model.gguf.tmp-*"))) == 1
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]

    # An unfinished writer that is dropped removes its temporary file too.
    w = lowbit.GGUFWriter(tmp_path / "dropped.gguf")
    w.add_metadata("k", 1)
    del w
    gc.collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]

    # An error inside finish() (missing data) aborts as well.
    with pytest.raises(LowbitError, match="has 0 of 256 bytes"):
        with lowbit.GGUFWriter(target) as w:
            w.add_tensor_info("t", (64,), 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    assert target.read_bytes() == b"old contents"

    with lowbit.GGUFWriter(target) as w:
        w.add_tensor("t", np.ones(8, np.float32))
    assert lowbit.GGUFFile(target).tensor("t").to_numpy().tolist() == [1.0] * 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_reader_api(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        lowbit.GGUFFile(tmp_path / "missing.gguf")
    assert "missing.gguf" in str(e.value)
    path = tmp_path / "api.gguf"
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    with lowbit.GGUFWriter(path) as w:
        w.add_tensor("x", x)
    f = lowbit.GGUFFile(path)
    t = f.tensor("x")
    a, b = t.data, t.data
    assert a.dtype == np.uint8 and a.nbytes == x.nbytes and not a.flags.writeable
    assert np.shares_memory(a, b)  # both views are the same mapped bytes: no copy
    with pytest.raises(ValueError):
        a[0] = 1
    with pytest.raises(KeyError, match="no tensor named 'y'"):
        f.tensor("y")
    with pytest.raises(KeyError, match="no metadata key"):
        f.field("nope")
    assert not f.file_changed_on_disk()
    f.close()
    assert a.view(np.float32).reshape(2, 32).tolist() == x.tolist()  # views outlive close()
    with pytest.raises(LowbitError, match="closed"):
        t.data
    del a, b
    g = lowbit.GGUFFile(path)
    with open(path, "ab") as fh:
        fh.write(b"\0" * 32)
    assert g.file_changed_on_disk()


def test_to_numpy_of_unsupported_ggml_type_is_a_clear_error(tmp_path):
    path = tmp_path / "iq2xxs.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tensor("t", np.zeros(66, np.uint8), raw_dtype=G.IQ2_XXS)  # one 256-element block
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = lowbit.GGUFFile(path)
    t = f.tensor("t")
    assert t.type_id == int(G.IQ2_XXS) and t.shape == (256,) and t.nbytes == 66
    with pytest.raises(LowbitError, match="cannot be dequantized"):
        t.to_numpy()


# ---- the real thing ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_file_from_llama_cpp():
    from lowbit.hub import fetch_smollm2

    path = fetch_smollm2()
    ours = lowbit.GGUFFile(path)
    theirs = gguf.GGUFReader(path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for k in keys:
        fld = theirs.fields[k]
        assert int(ours.metadata_types[k]) == int(fld.types[0]), k
        assert ours.metadata[k] == fld.contents(), k
    assert len(ours.tensors) == len(theirs.tensors) == 272
    for mine, ref in zip(ours.tensors, theirs.tensors):
        assert mine.name == ref.name and int(mine.qtype) == int(ref.tensor_type)
        assert mine.shape == tuple(int(d) for d in reversed(ref.shape))
        assert mine.offset == ref.data_offset and mine.nbytes == ref.n_bytes
        raw = np.asarray(ref.data)
        assert mine.data.tobytes() == raw.tobytes(), mine.name
        want = gq.dequantize(raw, ref.tensor_type).reshape(mine.shape).astype(np.float32)
        np.testing.assert_array_equal(mine.to_numpy(), want, err_msg=mine.name)
