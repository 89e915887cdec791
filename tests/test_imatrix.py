"""Importance-matrix files (spec/imatrix.md): round trips in both formats, the GGUF form as gguf-py reads it and
byte for byte against llama-imatrix's layout, the legacy .dat layout against a hand-packed file, reading files
built by hand or by gguf-py, and the errors for damaged files and failed writes."""
from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from lowbit import LowbitError
from lowbit.gguf import GGUFWriter as LowbitGGUFWriter
from lowbit.imatrix import Imatrix, read_imatrix, write_imatrix
import lowbit.imatrix as imx

DENSE_A = "blk.2.attn_q.weight"
DENSE_B = "blk.10.ffn_down.weight"   # byte-wise sorting puts blk.10. before blk.2.
EXPERT = "blk.3.ffn_up_exps.weight"
CHUNK = 256


def sample() -> Imatrix:
    """Two dense entries after 3 chunks of 256 tokens, and an expert entry whose expert 1 was never routed."""
    rng = np.random.default_rng(1)
    n = 3 * CHUNK
    return Imatrix(
        sums={
            DENSE_A: (rng.random(16, dtype=np.float32) * n).astype(np.float32),
            DENSE_B: (rng.random(40, dtype=np.float32) * n * 7).astype(np.float32),
            EXPERT: np.vstack([rng.random(16, dtype=np.float32) * 300, np.zeros(16, np.float32),
                               rng.random(16, dtype=np.float32) * 900]).astype(np.float32),
        },
        counts={DENSE_A: np.array([n], np.float32), DENSE_B: np.array([n], np.float32),
                EXPERT: np.array([300, 0, 1000], np.float32)},
        datasets=["first.txt", "wiki.test.raw"],
        chunk_count=3,
        chunk_size=CHUNK,
    )


def expected_importance(im: Imatrix, name: str) -> np.ndarray:
    s = im.sums[name].reshape(im.counts[name].size, -1)
    c = im.counts[name]
    return np.stack([s[e] / c[e] if c[e] > 0 else np.ones_like(s[e]) for e in range(c.size)]).astype(np.float32)


# ---- round trips and the in-memory API ------------------------------------------------------------------------


def test_importance_and_names():
    im = sample()
    assert im.names() == [DENSE_B, DENSE_A, EXPERT]
    q = im.importance(EXPERT)
    assert q.dtype == np.float32 and q.shape == (3, 16)
    np.testing.assert_array_equal(q[0], im.sums[EXPERT][0] / np.float32(300))
    np.testing.assert_array_equal(q[1], np.ones(16, np.float32))   # never routed: importance 1
    assert im.importance(DENSE_A).shape == (16,)
    np.testing.assert_array_equal(im.importance(DENSE_A), im.sums[DENSE_A] / np.float32(3 * CHUNK))
    assert im.importance("blk.0.missing.weight") is None


def test_round_trip_gguf(tmp_path):
    im = sample()
    p = tmp_path / "im.gguf"
    assert write_imatrix(p, im) == p
    back = read_imatrix(p)
    assert back.names() == im.names()
    for name in im.names():
        np.testing.assert_array_equal(back.sums[name], im.sums[name])      # raw sums kept bit for bit
        np.testing.assert_array_equal(back.counts[name], im.counts[name])
        np.testing.assert_array_equal(back.importance(name), im.importance(name))
    assert back.sums[EXPERT].shape == (3, 16) and back.sums[DENSE_A].shape == (16,)
    assert (back.datasets, back.chunk_count, back.chunk_size) == (im.datasets, 3, CHUNK)


def test_round_trip_dat(tmp_path):
    im = sample()
    p = tmp_path / "im.dat"
    write_imatrix(p, im, fmt="dat")
    back = read_imatrix(p)
    assert back.names() == im.names()
    for name in im.names():
        np.testing.assert_allclose(back.importance(name).reshape(-1), expected_importance(im, name).reshape(-1),
                                   rtol=3e-7, atol=0)
    # The .dat form keeps means times ncall and one ncall per entry; the last dataset; no chunk size.
    assert back.counts[EXPERT].tolist() == [4.0]          # ceil(1000 / 256)
    assert back.counts[DENSE_A].tolist() == [3.0]
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["wiki.test.raw"], 3, 0)
    # A .dat read back and written again is the same file.
    p2 = tmp_path / "again.dat"
    write_imatrix(p2, back, fmt="dat")
    assert p2.read_bytes() == p.read_bytes()
    # And converting it to GGUF keeps the importances exactly.
    p3 = tmp_path / "conv.gguf"
    write_imatrix(p3, back)
    conv = read_imatrix(p3)
    for name in im.names():
        np.testing.assert_array_equal(conv.importance(name), back.importance(name))


# ---- the GGUF form -------------------------------------------------------------------------------------------


def test_gguf_read_by_gguf_py(tmp_path):
    im = sample()
    p = tmp_path / "im.gguf"
    write_imatrix(p, im)
    r = gguf.GGUFReader(p)
    f = r.fields
    assert f["general.type"].contents() == "imatrix"
    assert f["imatrix.datasets"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
    assert f["imatrix.datasets"].contents() == ["first.txt", "wiki.test.raw"]
    assert f["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert f["imatrix.chunk_count"].contents() == 3
    assert f["imatrix.chunk_size"].types == [gguf.GGUFValueType.UINT32]
    assert f["imatrix.chunk_size"].contents() == CHUNK
    keys = [k for k in f if not k.startswith("GGUF.")]
    assert keys[:4] == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    names = [t.name for t in r.tensors]
    assert names == [f"{n}{s}" for n in (DENSE_B, DENSE_A, EXPERT) for s in (".in_sum2", ".counts")]
    t = {x.name: x for x in r.tensors}
    assert all(x.tensor_type == gguf.GGMLQuantizationType.F32 for x in r.tensors)
    assert t[DENSE_A + ".in_sum2"].shape.tolist() == [16]          # ggml ne; trailing 1s dropped
    assert t[DENSE_A + ".counts"].shape.tolist() == [1]
    assert t[EXPERT + ".in_sum2"].shape.tolist() == [16, 3]
    assert t[EXPERT + ".counts"].shape.tolist() == [1, 3]
    np.testing.assert_array_equal(np.asarray(t[EXPERT + ".in_sum2"].data).reshape(-1), im.sums[EXPERT].reshape(-1))
    np.testing.assert_array_equal(np.asarray(t[EXPERT + ".counts"].data).reshape(-1), [300, 0, 1000])
    np.testing.assert_array_equal(np.asarray(t[DENSE_B + ".in_sum2"].data), im.sums[DENSE_B])
    np.testing.assert_array_equal(np.asarray(t[DENSE_B + ".counts"].data).reshape(-1), [3 * CHUNK])


def _gstr(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _pad(n: int, a: int = 32) -> int:
    return (a - n % a) % a


def llama_imatrix_gguf(im: Imatrix, alignment_key: bool) -> bytes:
    """The file ggml's gguf_write_to_file makes for llama-imatrix's save_imatrix (spec/imatrix.md section 3,
    spec/container.md), packed by hand; with alignment_key, plus the general.alignment key lowbit's writer
    always appends."""
    kvs = [_gstr("general.type") + struct.pack("<I", 8) + _gstr("imatrix"),
           _gstr("imatrix.datasets") + struct.pack("<IIQ", 9, 8, len(im.datasets))
           + b"".join(_gstr(d) for d in im.datasets),
           _gstr("imatrix.chunk_count") + struct.pack("<II", 4, im.chunk_count),
           _gstr("imatrix.chunk_size") + struct.pack("<II", 4, im.chunk_size)]
    if alignment_key:
        kvs.append(_gstr("general.alignment") + struct.pack("<II", 4, 32))
    infos, data = [], b""
    for name in sorted(im.sums):
        c = im.counts[name]
        s = im.sums[name].reshape(c.size, -1)
        for suffix, ne, arr in ((".in_sum2", [s.shape[1], c.size], s), (".counts", [1, c.size], c)):
            ne = ne[:1] if ne[1] == 1 else ne
            infos.append(_gstr(name + suffix) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
                         + struct.pack("<IQ", 0, len(data)))
            raw = arr.astype("<f4").tobytes()
            data += raw + b"\0" * _pad(len(raw))
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * _pad(len(head)) + data


def test_gguf_bytes_match_llama_imatrix_layout(tmp_path):
    im = sample()
    p = tmp_path / "im.gguf"
    write_imatrix(p, im)
    # Byte for byte llama-imatrix's file, apart from the general.alignment = 32 key lowbit's GGUF writer always
    # adds after the others (spec/container.md, "Alignment"); it does not move the data (32 is the default).
    assert p.read_bytes() == llama_imatrix_gguf(im, alignment_key=True)
    im.datasets = []
    write_imatrix(p, im)
    assert p.read_bytes() == llama_imatrix_gguf(im, alignment_key=True)


def test_read_gguf_from_gguf_py(tmp_path):
    """A file from an independent writer, with an extra non-imatrix tensor (ignored) and 2-D dense tensors
    (older llama.cpp) whose trailing 1 is kept."""
    p = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(p, arch="llama")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["d.txt"])
    w.add_uint32("imatrix.chunk_count", 7)
    w.add_uint32("imatrix.chunk_size", 512)
    sums = np.arange(1, 9, dtype=np.float32) * 10
    w.add_tensor("blk.0.attn_k.weight.in_sum2", sums.reshape(1, 8))
    w.add_tensor("blk.0.attn_k.weight.counts", np.array([[5]], np.float32))
    w.add_tensor("blk.0.ffn_gate_exps.weight.in_sum2", np.arange(12, dtype=np.float32).reshape(2, 6))
    w.add_tensor("blk.0.ffn_gate_exps.weight.counts", np.array([[4], [2]], np.float32))
    w.add_tensor("unrelated.weight", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = read_imatrix(p)
    assert im.names() == ["blk.0.attn_k.weight", "blk.0.ffn_gate_exps.weight"]
    assert (im.datasets, im.chunk_count, im.chunk_size) == (["d.txt"], 7, 512)
    np.testing.assert_array_equal(im.importance("blk.0.attn_k.weight"), sums / np.float32(5))
    np.testing.assert_array_equal(im.importance("blk.0.ffn_gate_exps.weight"),
                                  np.arange(12, dtype=np.float32).reshape(2, 6) / np.array([[4], [2]], np.float32))


# ---- the legacy .dat form ------------------------------------------------------------------------------------


def _dat_entry(name: str, ncall: int, values) -> bytes:
    v = np.asarray(values, dtype=np.float32)
    return struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, v.size) + v.astype("<f4").tobytes()


def test_dat_bytes_match_spec_layout(tmp_path):
    im = sample()
    p = tmp_path / "im.dat"
    write_imatrix(p, im, fmt="dat")
    n = np.float32(3 * CHUNK)
    f32 = np.float32
    e = im.sums[EXPERT]
    expert_vals = np.concatenate([(e[0] / f32(300)) * f32(4), np.full(16, f32(4)), (e[2] / f32(1000)) * f32(4)])
    expected = (struct.pack("<i", 3)
                + _dat_entry(DENSE_B, 3, (im.sums[DENSE_B] / n) * f32(3))    # ncall = ceil(768 / 256) = 3
                + _dat_entry(DENSE_A, 3, (im.sums[DENSE_A] / n) * f32(3))
                + _dat_entry(EXPERT, 4, expert_vals)                          # ceil(max 1000 / 256) = 4
                + struct.pack("<ii", 3, len(b"wiki.test.raw")) + b"wiki.test.raw")
    assert p.read_bytes() == expected


def test_dat_without_datasets_has_empty_trailer(tmp_path):
    im = sample()
    im.datasets = []
    p = tmp_path / "im.dat"
    write_imatrix(p, im, fmt="dat")
    assert p.read_bytes()[-8:] == struct.pack("<ii", 3, 0)
    assert read_imatrix(p).datasets == []


def test_read_hand_built_dat(tmp_path):
    vals = np.array([2.0, 4.0, 6.0, 8.0], np.float32)
    expert = np.arange(1, 7, dtype=np.float32)   # 2 experts x 3 columns, one ncall for both
    body = struct.pack("<i", 2) + _dat_entry("blk.0.attn_v.weight", 2, vals) + _dat_entry("blk.1.x_exps.weight", 3,
                                                                                         expert)
    cases = {
        "full": body + struct.pack("<ii", 12, 6) + b"a.text" + b"ignored tail",
        "no_trailer": body,
        "cut_trailer": body + struct.pack("<i", 9) + b"\x05",   # damaged trailer: ignored, as llama.cpp does
    }
    expect = {"full": (12, ["a.text"]), "no_trailer": (0, []), "cut_trailer": (9, [])}
    for what, raw in cases.items():
        p = tmp_path / f"{what}.dat"
        p.write_bytes(raw)
        im = read_imatrix(p)
        assert im.names() == ["blk.0.attn_v.weight", "blk.1.x_exps.weight"], what
        np.testing.assert_array_equal(im.importance("blk.0.attn_v.weight"), vals / np.float32(2))
        np.testing.assert_array_equal(im.importance("blk.1.x_exps.weight"), expert / np.float32(3))
        np.testing.assert_array_equal(im.counts["blk.0.attn_v.weight"], [2])
        assert (im.chunk_count, im.datasets, im.chunk_size) == (*expect[what], 0), what


# ---- damaged files -------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_imatrix(tmp_path / "nope.gguf")


def test_truncated_dat_raises(tmp_path):
    im = sample()
    p = tmp_path / "im.dat"
    write_imatrix(p, im, fmt="dat")
    raw = p.read_bytes()
    end_of_entries = len(raw) - 8 - len(b"wiki.test.raw")
    cut = tmp_path / "cut.dat"
    for n in range(end_of_entries):
        cut.write_bytes(raw[:n])
        with pytest.raises(LowbitError):
            read_imatrix(cut)
    cut.write_bytes(raw[:end_of_entries])       # entries complete, trailer absent: valid
    assert read_imatrix(cut).names() == im.names()


def test_truncated_gguf_raises(tmp_path):
    p = tmp_path / "im.gguf"
    write_imatrix(p, sample())
    raw = p.read_bytes()
    r = gguf.GGUFReader(p)
    end_of_data = max(int(t.data_offset) + int(t.n_bytes) for t in r.tensors)   # only padding after it
    del r
    cut = tmp_path / "cut.gguf"
    for n in range(4, end_of_data):
        cut.write_bytes(raw[:n])
        with pytest.raises(LowbitError):
            read_imatrix(cut)
    cut.write_bytes(raw[:end_of_data])
    assert read_imatrix(cut).names() == sample().names()


@pytest.mark.parametrize("raw", [
    b"", b"\x01\x00", b"not an imatrix file at all, just text\n", bytes(range(256)) * 4,
    struct.pack("<i", 0), struct.pack("<i", -3),
    struct.pack("<i", 1) + struct.pack("<i", 8) + b"a.weight" + struct.pack("<ii", 1, 0),   # nval 0
    struct.pack("<i", 1) + struct.pack("<i", -5) + b"abc",
    struct.pack("<i", 2) + _dat_entry("a.weight", 1, [1.0]) + _dat_entry("a.weight", 1, [2.0]),   # duplicate
    struct.pack("<i", 1) + struct.pack("<i", 2) + b"\xff\xfe" + struct.pack("<ii", 1, 1) + b"\0\0\x80\x3f",
], ids=["empty", "short", "text", "binary", "zero_entries", "negative_entries", "zero_values", "negative_name",
        "duplicate", "bad_utf8"])
def test_garbage_dat_raises(tmp_path, raw):
    p = tmp_path / "bad.dat"
    p.write_bytes(raw)
    with pytest.raises(LowbitError):
        read_imatrix(p)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1.0])
def test_non_finite_or_negative_values_raise(tmp_path, bad):
    p = tmp_path / "bad.dat"
    p.write_bytes(struct.pack("<i", 1) + _dat_entry("blk.0.attn_q.weight", 1, [1.0, bad, 2.0]))
    with pytest.raises(LowbitError, match="non-finite|negative"):
        read_imatrix(p)
    im = sample()
    im.sums[DENSE_A][3] = bad
    with pytest.raises(LowbitError, match="non-finite|negative"):
        write_imatrix(tmp_path / "never.gguf", im)
    assert not (tmp_path / "never.gguf").exists()
    # The same value inside a GGUF file written by another writer.
    g = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(g, arch="llama")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.array([1.0, bad], np.float32))
    w.add_tensor("blk.0.attn_q.weight.counts", np.array([4.0], np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(LowbitError, match="non-finite|negative"):
        read_imatrix(g)


def test_zero_counts_raise(tmp_path):
    p = tmp_path / "zero.dat"
    p.write_bytes(struct.pack("<i", 1) + _dat_entry("blk.0.attn_q.weight", 0, [1.0, 2.0]))
    with pytest.raises(LowbitError, match="zero"):
        read_imatrix(p)
    im = sample()
    im.counts[EXPERT][:] = 0
    with pytest.raises(LowbitError, match="zero"):
        write_imatrix(tmp_path / "zero.gguf", im)


def _gguf_py_file(path: Path, tensors: dict, kv: bool = True) -> Path:
    w = gguf.GGUFWriter(path, arch="llama")
    if kv:
        w.add_array("imatrix.datasets", ["x"])
        w.add_uint32("imatrix.chunk_count", 1)
        w.add_uint32("imatrix.chunk_size", 16)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_malformed_gguf_raises(tmp_path):
    ones = np.ones(4, np.float32)
    one = np.ones(1, np.float32)
    cases = {
        "no_tensors": {},
        "only_sums": {"a.weight.in_sum2": ones},
        "only_counts": {"a.weight.counts": one, "b.weight.in_sum2": ones, "b.weight.counts": one},
        "f16_sums": {"a.weight.in_sum2": ones.astype(np.float16), "a.weight.counts": one},
        "uneven": {"a.weight.in_sum2": np.ones(5, np.float32), "a.weight.counts": np.ones(2, np.float32)},
        "not_imatrix": {"token_embd.weight": ones},
    }
    for what, tensors in cases.items():
        with pytest.raises(LowbitError):
            read_imatrix(_gguf_py_file(tmp_path / f"{what}.gguf", tensors))
    # chunk_count must be UINT32 (llama.cpp asserts on any other type).
    p = tmp_path / "i32.gguf"
    w = gguf.GGUFWriter(p, arch="llama")
    w.add_int32("imatrix.chunk_count", 1)
    w.add_tensor("a.weight.in_sum2", ones), w.add_tensor("a.weight.counts", one)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(LowbitError, match="UINT32"):
        read_imatrix(p)
    # The metadata keys themselves are optional for reading.
    im = read_imatrix(_gguf_py_file(tmp_path / "nokv.gguf", {"a.weight.in_sum2": ones, "a.weight.counts": one}, False))
    assert (im.datasets, im.chunk_count, im.chunk_size) == ([], 0, 0)


# ---- failed writes -------------------------------------------------------------------------------------------


def _leftovers(d: Path) -> list[str]:
    return sorted(x.name for x in d.iterdir() if ".tmp-" in x.name)


def test_failed_dat_write_leaves_nothing(tmp_path, monkeypatch):
    p = tmp_path / "im.dat"
    p.write_bytes(b"previous")
    real, calls = imx._dat_entry, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(imx, "_dat_entry", failing)
    with pytest.raises(OSError, match="disk full"):
        write_imatrix(p, sample(), fmt="dat")
    assert len(calls) == 2
    assert p.read_bytes() == b"previous" and _leftovers(tmp_path) == []
    calls.clear()
    with pytest.raises(OSError):
        write_imatrix(tmp_path / "new.dat", sample(), fmt="dat")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["im.dat"]


def test_failed_gguf_write_leaves_nothing(tmp_path, monkeypatch):
    p = tmp_path / "im.gguf"
    p.write_bytes(b"previous")
    real, calls = LowbitGGUFWriter.write_tensor_data, []

    def failing(self, data):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(self, data)

    monkeypatch.setattr(LowbitGGUFWriter, "write_tensor_data", failing)
    with pytest.raises(OSError, match="disk full"):
        write_imatrix(p, sample())
    assert len(calls) == 3
    assert p.read_bytes() == b"previous" and _leftovers(tmp_path) == []


def test_invalid_imatrix_writes_nothing(tmp_path):
    im = sample()
    bad = [
        ("fmt", lambda m: None, {"fmt": "txt"}),
        ("empty", lambda m: (m.sums.clear(), m.counts.clear()), {}),
        ("no_counts", lambda m: m.counts.pop(DENSE_A), {}),
        ("uneven", lambda m: m.counts.__setitem__(EXPERT, np.ones(5, np.float32)), {}),
        ("long_name", lambda m: (m.sums.__setitem__("blk.0." + "x" * 60, np.ones(4, np.float32)),
                                 m.counts.__setitem__("blk.0." + "x" * 60, np.ones(1, np.float32))), {}),
        ("chunk_count", lambda m: setattr(m, "chunk_count", -1), {}),
    ]
    for what, mutate, kw in bad:
        m = sample()
        mutate(m)
        out = tmp_path / f"{what}.gguf"
        with pytest.raises(LowbitError):
            write_imatrix(out, m, **kw)
        assert not out.exists(), what
    assert list(tmp_path.iterdir()) == []
    write_imatrix(tmp_path / "ok.gguf", im)   # the sample itself is valid
