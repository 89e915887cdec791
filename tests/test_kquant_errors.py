"""Bad input with the K-quant, IQ4 and Q5 types: rows that are not whole super-blocks, files cut inside a
super-block, declared types whose byte size disagrees with the data, ggml types lowbit cannot run and unknown
type ids. Each is a lowbit.LowbitError naming the tensor and the type (from lowbit.load, GGUFFile.tensor().to_numpy()
and lowbit.dequantize), and nothing already open or passed in is lost."""
from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

import gguf.quants as gq
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G

import lowbit
from lowbit import LowbitError, QType
from model_helpers import write_synthetic_gguf
from test_gguf_malformed import build, gstr, load, refused, tinfo

K_MATRIX_TYPES = [QType.Q4_K, QType.Q6_K, QType.IQ4_XS]  # the K-quant types of real Q4_K_M / IQ4_XS files
SUPER_BLOCK_TYPES = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.Q8_K, QType.IQ4_XS]
UNSUPPORTED = [(16, "IQ2_XXS"), (34, "TQ1_0"), (39, "MXFP4"), (9, "Q8_1")]
# Ids no table knows: ggml's retired Q4_2/Q4_3 (4, 5) and Q4_0_4_4 / IQ4_NL_4_4 (31, 36), gaps, lowbit's
# private range past FP4, and the largest uint32.
UNKNOWN_IDS = [4, 5, 31, 36, 99, 1023, 1027, 2**31, 2**32 - 1]

UP, DOWN = "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"  # DOWN is the last tensor in the file
UP_RE, DOWN_RE = re.escape(UP), re.escape(DOWN)


def _id(v) -> str | None:
    return v.name if isinstance(v, QType) else None


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def info_at(blob: bytes, name: str) -> int:
    """Byte offset of the n_dims field of tensor `name`'s info (it follows the name)."""
    key = gstr(name)
    at = blob.find(key)
    assert at > 0 and blob.find(key, at + 1) == -1, name
    return at + len(key)


def patch_info(blob: bytes, name: str, dims: list[int] | None = None, type_id: int | None = None) -> bytes:
    """The file with tensor `name`'s dims (same count) and/or type id replaced; nothing else moves."""
    out = bytearray(blob)
    at = info_at(blob, name)
    (n_dims,) = struct.unpack_from("<I", out, at)
    if dims is not None:
        assert len(dims) == n_dims
        struct.pack_into(f"<{n_dims}Q", out, at + 4, *dims)
    if type_id is not None:
        struct.pack_into("<I", out, at + 4 + 8 * n_dims, type_id)
    return bytes(out)


def model_with(tmp_path: Path, name: str, types: dict[str, int]) -> Path:
    """The one-layer synthetic llama (n_embd = n_ff = 256) with the given tensors in the given types."""
    return write_synthetic_gguf(tmp_path / f"{name}.gguf", types=types)


def refused_everywhere(path: Path, *patterns: str) -> None:
    """Opening the file (GGUFFile) and loading it as a model both refuse it with every pattern in the message;
    the file is left as it was."""
    before = sha(path)
    for opener in (lambda: lowbit.GGUFFile(path), lambda: lowbit.load(path, n_threads=1)):
        with pytest.raises(LowbitError) as e:
            opener()
        for pat in patterns:
            assert re.search(pat, str(e.value)), f"{pat!r} not in {str(e.value)!r}"
        assert "[at byte " in str(e.value), str(e.value)
    assert sha(path) == before


@pytest.fixture(scope="module")
def open_model(tmp_path_factory):
    """A model that stays loaded through every refusal in this file, and its logits before them."""
    p = write_synthetic_gguf(tmp_path_factory.mktemp("open") / "f32.gguf")
    m = lowbit.load(p, n_threads=1)
    ids = [1, 5, 9, 2]
    yield m, ids, m.logits(ids).copy()
    m.close()


@pytest.fixture(scope="module")
def weights():
    return np.random.default_rng(3).standard_normal((2, 512)).astype(np.float32)


# ---- valid files first: the malformed cases below differ from these by one defect ------------------------


@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q6_K, QType.Q5_0, QType.IQ4_XS], ids=_id)
def test_valid_tensor_reads_like_gguf_py(tmp_path, weights, qtype):
    raw = lowbit.quantize(weights, qtype)
    with lowbit.GGUFWriter(tmp_path / "ok.gguf") as w:
        w.add_tensor("w", raw, qtype=qtype, shape=weights.shape)
    t = lowbit.GGUFFile(tmp_path / "ok.gguf").tensor("w")
    assert (t.qtype, t.shape, t.nbytes) == (qtype, (2, 512), raw.nbytes)
    want = gq.dequantize(raw, G(int(qtype)))
    np.testing.assert_array_equal(t.to_numpy(), want)
    np.testing.assert_array_equal(lowbit.dequantize(raw, qtype, weights.shape), want)


@pytest.mark.parametrize("qtype", K_MATRIX_TYPES + [QType.Q5_0], ids=_id)
def test_valid_model_loads(tmp_path, qtype):
    p = model_with(tmp_path, qtype.name, {UP: int(qtype), DOWN: int(qtype)})
    with lowbit.load(p, n_threads=1) as m:
        assert m.logits([1, 2]).shape == (2, 32)


# ---- rows that are not whole super-blocks ----------------------------------------------------------------


@pytest.mark.parametrize("qtype", K_MATRIX_TYPES, ids=_id)
def test_model_row_not_multiple_of_256(tmp_path, qtype, open_model):
    # Same element count and byte size as the valid [256, 256]: only the row rule can refuse it.
    p = model_with(tmp_path, qtype.name, {UP: int(qtype)})
    for dims in ([128, 512], [32, 2048]):
        bad = tmp_path / f"rows{dims[0]}.gguf"
        bad.write_bytes(patch_info(p.read_bytes(), UP, dims=dims))
        refused_everywhere(bad, rf"tensor '{UP_RE}'", rf"ne\[0\] = {dims[0]} is not a multiple of "
                                rf"{qtype.name}'s block size 256")
    _still_usable(open_model)


@pytest.mark.parametrize("qtype", SUPER_BLOCK_TYPES, ids=_id)
@pytest.mark.parametrize("ne0", [32, 200, 255, 257, 384])
def test_file_row_not_multiple_of_256(tmp_path, qtype, ne0):
    data = b"\0" * (4 * qtype.type_size)
    refused(tmp_path, build(infos=[tinfo("w", [ne0, 2], int(qtype), 0)], data=data),
            f"tensor 'w': row length ne[0] = {ne0} is not a multiple of {qtype.name}'s block size 256")


@pytest.mark.parametrize("qtype", SUPER_BLOCK_TYPES, ids=_id)
def test_dequantize_row_not_multiple_of_256(weights, qtype):
    raw = lowbit.quantize(weights, qtype)
    keep = raw.copy()
    for shape in [(2, 200), (1, 384), (3, 256 + 32)]:
        with pytest.raises(LowbitError, match=rf"last axis {shape[-1]} is not a multiple of {qtype.name}'s block "
                                              r"size 256"):
            lowbit.dequantize(raw, qtype, shape)
    # 1-D: the element count itself is the row.
    with pytest.raises(LowbitError, match=rf"{qtype.name}"):
        lowbit.dequantize(raw.reshape(-1)[: qtype.type_size], qtype, 200)
    np.testing.assert_array_equal(raw, keep)
    np.testing.assert_array_equal(lowbit.dequantize(raw, qtype, weights.shape),
                                  lowbit.dequantize(keep, qtype, weights.shape))


# ---- files cut inside a super-block ---------------------------------------------------------------------


@pytest.mark.parametrize("qtype", K_MATRIX_TYPES, ids=_id)
def test_model_truncated_inside_a_super_block(tmp_path, qtype, open_model):
    p = model_with(tmp_path, qtype.name, {UP: int(qtype), DOWN: int(qtype)})
    t = lowbit.GGUFFile(p).tensor(DOWN)
    end = t.offset + t.nbytes
    blob = p.read_bytes()
    # The middle of the last super-block, one byte short, and inside the tensor's first super-block.
    for cut in (end - qtype.type_size // 2, end - 1, t.offset + 7):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(blob[:cut])
        refused_everywhere(bad, rf"tensor '{DOWN_RE}'", "past the end of the file",
                           rf"{qtype.name} with dims \[256, 256\] it is {t.nbytes} bytes", "truncated")
    _still_usable(open_model)


@pytest.mark.parametrize("qtype", SUPER_BLOCK_TYPES + [QType.Q5_0, QType.Q5_1, QType.IQ4_NL], ids=_id)
def test_every_cut_inside_the_data_is_refused(tmp_path, qtype):
    nbytes = 2 * 512 // qtype.block_size * qtype.type_size
    blob = build(infos=[tinfo("w", [512, 2], int(qtype), 0)], data=bytes(nbytes))
    assert load(tmp_path, blob).tensor("w").nbytes == nbytes
    for cut in range(len(blob) - nbytes, len(blob)):
        refused(tmp_path, blob[:cut], "tensor 'w': offset 0 + size", f"as {qtype.name} with dims [512, 2]")


@pytest.mark.parametrize("qtype", SUPER_BLOCK_TYPES, ids=_id)
def test_dequantize_partial_super_block(weights, qtype):
    raw = lowbit.quantize(weights, qtype).reshape(-1)
    for n in (len(raw) - 1, len(raw) - qtype.type_size // 2, qtype.type_size + 1, len(raw) + 1):
        buf = np.resize(raw, n)
        with pytest.raises(LowbitError, match=rf"1024 elements of {qtype.name} take {len(raw)} bytes, got {n}"):
            lowbit.dequantize(buf, qtype, weights.shape)


# ---- declared type and byte size disagree ---------------------------------------------------------------


@pytest.mark.parametrize("stored,declared", [(QType.Q4_K, QType.Q6_K), (QType.IQ4_XS, QType.Q4_K),
                                             (QType.Q5_0, QType.Q6_K), (QType.Q4_K, QType.Q8_0)], ids=_id)
def test_model_declared_type_larger_than_its_bytes(tmp_path, stored, declared, open_model):
    assert declared.type_size / declared.block_size > stored.type_size / stored.block_size
    p = model_with(tmp_path, stored.name, {UP: int(stored), DOWN: int(stored)})
    blob = p.read_bytes()
    # A tensor followed by another: its declared bytes run into the next one.
    mid = tmp_path / "mid.gguf"
    mid.write_bytes(patch_info(blob, UP, type_id=int(declared)))
    refused_everywhere(mid, "overlaps", rf"'{UP_RE}' is {declared.name} with dims \[256, 256\]")
    # The last tensor: its declared bytes run past the end of the file.
    last = tmp_path / "last.gguf"
    last.write_bytes(patch_info(blob, DOWN, type_id=int(declared)))
    refused_everywhere(last, rf"tensor '{DOWN_RE}'", "past the end of the file",
                       rf"as {declared.name} with dims \[256, 256\]")
    _still_usable(open_model)


def test_declared_type_smaller_than_its_bytes_is_a_gap(tmp_path):
    """GGUF stores no byte size, so Q6_K bytes declared as Q4_K only leave unused bytes before the next tensor:
    the container accepts that (spec/container.md). The tensor reads as the declared type's byte count."""
    p = model_with(tmp_path, "q6k", {UP: int(QType.Q6_K)})
    bad = tmp_path / "gap.gguf"
    bad.write_bytes(patch_info(p.read_bytes(), UP, type_id=int(QType.Q4_K)))
    t = lowbit.GGUFFile(bad).tensor(UP)
    assert (t.qtype, t.nbytes) == (QType.Q4_K, 256 * 144)


@pytest.mark.parametrize("stored,declared", [(QType.Q4_K, QType.Q6_K), (QType.Q6_K, QType.Q4_K),
                                             (QType.IQ4_XS, QType.Q4_K), (QType.Q5_0, QType.Q5_1),
                                             (QType.Q4_K, QType.Q5_K)], ids=_id)
def test_dequantize_with_the_wrong_type(weights, stored, declared):
    raw = lowbit.quantize(weights, stored)
    with pytest.raises(LowbitError, match=rf"elements of {declared.name} take \d+ bytes, got {raw.nbytes}; check "
                                          "the shape and the type"):
        lowbit.dequantize(raw, declared, weights.shape)


# ---- ggml types lowbit cannot run -----------------------------------------------------------------------


@pytest.mark.parametrize("type_id,name", UNSUPPORTED)
def test_unsupported_type_in_a_model_file(tmp_path, type_id, name, open_model):
    p = model_with(tmp_path, name, {UP: type_id})
    before = sha(p)
    with pytest.raises(LowbitError, match=rf"tensor '{UP_RE}' has type {name}, which lowbit cannot run"):
        lowbit.load(p, n_threads=1)
    # The container walks past the type: the file opens, every other tensor reads, this one is refused by name.
    f = lowbit.GGUFFile(p)
    t = f.tensor(UP)
    assert t.type_id == type_id and t.shape == (256, 256)
    with pytest.raises(LowbitError, match=rf"tensor '{UP_RE}': ggml type {name} \(id {type_id}\) cannot be "
                                          r"dequantized by lowbit"):
        t.to_numpy()
    assert f.tensor(DOWN).to_numpy().shape == (256, 256)
    assert f.metadata["general.architecture"] == "llama"
    with pytest.raises(LowbitError, match=rf"ggml type {name} \(id {type_id}\) is not one lowbit computes with"):
        lowbit.dequantize(np.array(t.data), type_id, t.shape)
    with pytest.raises(LowbitError, match=rf"ggml type {name} \(id {type_id}\)"):
        lowbit.quantize(np.zeros((1, 256), np.float32), type_id)
    assert sha(p) == before
    _still_usable(open_model)


# ---- unknown type ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize("type_id", UNKNOWN_IDS)
def test_unknown_type_id(tmp_path, type_id, open_model):
    at = 24 + 9 + 4 + 16  # the type field of the only info (name "w", two dims)
    refused(tmp_path, build(infos=[tinfo("w", [256, 2], type_id, 0)], data=b"\0" * 1024),
            f"tensor 'w': unknown tensor type id {type_id}", f"[at byte {at}]")
    p = model_with(tmp_path, "q4k", {UP: int(QType.Q4_K)})
    bad = tmp_path / "unknown.gguf"
    bad.write_bytes(patch_info(p.read_bytes(), UP, type_id=type_id))
    refused_everywhere(bad, rf"tensor '{UP_RE}': unknown tensor type id {type_id}")
    with pytest.raises(LowbitError, match=rf"type id {type_id} is not one lowbit computes with"):
        lowbit.dequantize(np.zeros(144, np.uint8), type_id, 256)
    _still_usable(open_model)


# ---- nothing already open is lost ---------------------------------------------------------------------


def _still_usable(open_model) -> None:
    m, ids, want = open_model
    np.testing.assert_array_equal(m.logits(ids), want)
