"""Importance matrices ("imatrix"): llama.cpp's calibration statistics, read and written in both of its file formats.

    im = read_imatrix("imatrix.gguf")            # GGUF or legacy .dat, told apart by the magic
    q = im.importance("blk.0.attn_q.weight")     # mean x^2 of each input column, float32
    write_imatrix("imatrix.dat", im, fmt="dat")  # llama-quantize --imatrix reads either format

An entry per weight tensor holds the sum of x^2 over every activation row x that reached the matmul, per input
column, and the number of rows summed; expert tensors hold one sum vector and one count per expert. The byte
layouts and the reader's rules are in spec/imatrix.md (section 2: legacy .dat, section 3: GGUF).
"""
from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np

from ._core import LowbitError
from .gguf import GGUFFile, GGUFValueType, GGUFWriter

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# Metadata keys and tensor-name suffixes of the GGUF form (spec/imatrix.md section 3).
KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"

_MAX_TENSOR_NAME = 63  # bytes; ggml's name field is 64 bytes with the terminator
_I32_MAX = 2**31 - 1
_U32_MAX = 2**32 - 1
_F32 = 0


@dataclass
class Imatrix:
    """Per-tensor activation statistics.

    sums[name]:   float32 [n_in] (dense) or [n_expert, n_in] (expert tensor): sum of x^2 per input column.
    counts[name]: float32 [1] (dense) or [n_expert]: number of activation rows summed (per expert).
    After reading a legacy .dat file the raw sums are gone: sums holds the stored values (means times the
    normaliser `ncall`) and counts holds [ncall], so sums / counts is still the mean; chunk_size is then 0.
    """

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str) -> Optional[np.ndarray]:
        """Mean x^2 per input column (sums / counts) as float32, shaped like sums[name]; None when the tensor has
        no entry. An expert with a zero count gets importance 1, as llama-quantize uses it."""
        if name not in self.sums:
            return None
        s = np.asarray(self.sums[name], dtype=np.float32)
        c = np.asarray(self.counts[name], dtype=np.float32).reshape(-1)
        per = s.reshape(c.size, -1)
        safe = np.where(c == 0, np.float32(1), c)[:, None]
        out = np.where(c[:, None] == 0, np.float32(1), per / safe)
        return out.astype(np.float32).reshape(s.shape)

    def names(self) -> list[str]:
        """Entry names in byte-wise order (the order both file formats store them in)."""
        return sorted(self.sums)


# ---- reading -------------------------------------------------------------------------------------------------


def read_imatrix(path: PathLike) -> Imatrix:
    """Read an imatrix file written by llama-imatrix (either format) or by write_imatrix.

    A file starting with the bytes "GGUF" is read as GGUF, anything else as the legacy format. Raises
    FileNotFoundError for a missing path and LowbitError for a malformed or truncated file, non-finite or
    negative values, or an entry whose counts are all zero (no data).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(2, "no such imatrix file", str(p))
    with open(p, "rb") as f:
        magic = f.read(4)
    im = _read_gguf(p) if magic == b"GGUF" else _read_dat(p)
    for name in im.sums:
        _check_entry(name, im.sums[name], im.counts[name], f"{p}: ")
    return im


def _read_gguf(p: Path) -> Imatrix:
    """GGUF form (spec/imatrix.md section 3, "Reading")."""
    with GGUFFile(p) as g:
        if not g.tensors:
            raise LowbitError(f"{p}: imatrix GGUF file has no tensors (no data)")
        im = Imatrix()
        if KEY_DATASETS in g.metadata:
            fd = g.field(KEY_DATASETS)
            if fd.type == GGUFValueType.ARRAY and fd.item_type == GGUFValueType.STRING:
                im.datasets = [str(s) for s in fd.value]
        for key in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
            if key in g.metadata:
                fd = g.field(key)
                if fd.type != GGUFValueType.UINT32:
                    raise LowbitError(f"{p}: {key} must be UINT32, the file has {fd.type.name}")
                setattr(im, key.split(".", 1)[1], int(fd.value))
        missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in g.metadata]
        if missing:
            log.warning("%s: no %s; llama-quantize refuses an imatrix without them", p, ", ".join(missing))

        pairs: dict[str, list] = {}
        for t in g.tensors:
            for i, suffix in enumerate((SUFFIX_SUMS, SUFFIX_COUNTS)):
                if t.name.endswith(suffix) and len(t.name) > len(suffix):
                    pairs.setdefault(t.name[: -len(suffix)], [None, None])[i] = t
        if not pairs:
            raise LowbitError(f"{p}: no '<name>{SUFFIX_SUMS}' / '<name>{SUFFIX_COUNTS}' tensors (not an imatrix)")
        for name, (ts, tc) in pairs.items():
            if ts is None or tc is None:
                raise LowbitError(f"{p}: mismatched sums and counts for {name!r} (both {SUFFIX_SUMS} and "
                                  f"{SUFFIX_COUNTS} are needed)")
            if ts.type_id != _F32 or tc.type_id != _F32:
                raise LowbitError(f"{p}: sums and counts for {name!r} must be F32")
            sums = ts.data.view(np.float32).copy()
            counts = tc.data.view(np.float32).copy()
            if counts.size == 0 or sums.size == 0 or sums.size % counts.size:
                raise LowbitError(f"{p}: {name!r} has {sums.size} sums for {counts.size} counts; the sums must be a "
                                  "whole number of rows per count")
            im.sums[name] = sums if counts.size == 1 else sums.reshape(counts.size, -1)
            im.counts[name] = counts
        return im


def _read_dat(p: Path) -> Imatrix:
    """Legacy form (spec/imatrix.md section 2, "Reading")."""
    buf = p.read_bytes()
    pos = 0

    def i32(what: str) -> int:
        nonlocal pos
        if pos + 4 > len(buf):
            raise LowbitError(f"{p}: truncated legacy imatrix file: {what} at byte {pos} is cut off "
                              f"(file is {len(buf)} bytes)")
        (v,) = struct.unpack_from("<i", buf, pos)
        pos += 4
        return v

    if len(buf) < 4:
        raise LowbitError(f"{p}: not an imatrix file ({len(buf)} bytes; neither GGUF nor legacy .dat)")
    n_entries = i32("the entry count")
    if n_entries < 1:
        raise LowbitError(f"{p}: legacy imatrix file has no data (entry count {n_entries})")
    im = Imatrix()
    for i in range(n_entries):
        at = pos
        n = i32(f"entry {i}'s name length")
        if n < 0 or pos + n > len(buf):
            raise LowbitError(f"{p}: entry {i} at byte {at}: name length {n} does not fit the file "
                              f"({len(buf)} bytes; truncated, or not an imatrix file)")
        raw = buf[pos:pos + n]
        pos += n
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise LowbitError(f"{p}: entry {i} at byte {at}: name is not UTF-8 (not an imatrix file?)") from None
        if not name or "\0" in name:
            raise LowbitError(f"{p}: entry {i} at byte {at}: empty name or name with a NUL byte")
        if name in im.sums:
            raise LowbitError(f"{p}: entry {name!r} appears twice")
        ncall = i32(f"entry {name!r}'s ncall")
        nval = i32(f"entry {name!r}'s value count")
        if nval < 1:
            raise LowbitError(f"{p}: entry {name!r}: value count {nval} (must be >= 1)")
        if pos + 4 * nval > len(buf):
            raise LowbitError(f"{p}: truncated legacy imatrix file: entry {name!r} needs {4 * nval} bytes of values "
                              f"at byte {pos}, the file has {len(buf) - pos} left")
        im.sums[name] = np.frombuffer(buf, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        im.counts[name] = np.array([ncall], dtype=np.float32)
        pos += 4 * nval

    # Optional trailer: chunk count, then the dataset name; a damaged trailer is ignored, as llama.cpp does.
    if pos + 4 <= len(buf):
        im.chunk_count = max(0, struct.unpack_from("<i", buf, pos)[0])
        pos += 4
        if pos + 4 <= len(buf):
            (n,) = struct.unpack_from("<i", buf, pos)
            pos += 4
            if 0 < n <= len(buf) - pos:
                im.datasets = [buf[pos:pos + n].split(b"\0", 1)[0].decode("utf-8", errors="replace")]
    return im


# ---- writing -------------------------------------------------------------------------------------------------


def write_imatrix(path: PathLike, im: Imatrix, fmt: str = "gguf") -> Path:
    """Write `im` as llama-imatrix would: fmt "gguf" (the default form) or "dat" (legacy, `--output-format dat`).

    The data are checked first (LowbitError for non-finite or negative values, an entry without counts data, sums
    that do not split into one row per count, names too long for GGUF). The file is written under a temporary
    name and renamed onto path at the end, so a failure leaves no partial output. The .dat form needs
    chunk_size to compute its normaliser; with chunk_size 0 (as after reading a .dat file) the counts are taken
    as the normaliser itself. Returns path.
    """
    p = Path(path)
    if fmt not in ("gguf", "dat"):
        raise LowbitError(f"imatrix format {fmt!r}: use 'gguf' or 'dat'")
    entries = _validated(im, fmt)
    if fmt == "gguf":
        _write_gguf(p, im, entries)
    else:
        _write_dat(p, im, entries)
    return p


def _check_entry(name: str, sums: np.ndarray, counts: np.ndarray, where: str = "") -> None:
    if counts.size == 0 or sums.size == 0 or sums.size % counts.size:
        raise LowbitError(f"{where}imatrix entry {name!r}: {sums.size} sums for {counts.size} counts; the sums must "
                          "be a whole, non-zero number of values per count")
    for what, a in (("sums", sums), ("counts", counts)):
        if not np.all(np.isfinite(a)):
            raise LowbitError(f"{where}imatrix entry {name!r}: non-finite {what} (NaN or inf)")
        if np.any(a < 0):
            raise LowbitError(f"{where}imatrix entry {name!r}: negative {what}")
    if not np.any(counts > 0):
        raise LowbitError(f"{where}imatrix entry {name!r}: all counts are zero (no data)")


def _validated(im: Imatrix, fmt: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, sums [n_mat, n_in], counts [n_mat]) per entry in file order, after checking everything."""
    if not im.sums:
        raise LowbitError("imatrix has no entries; llama.cpp refuses an empty imatrix file")
    if set(im.sums) != set(im.counts):
        odd = sorted(set(im.sums) ^ set(im.counts))
        raise LowbitError(f"imatrix entries {odd[:5]} have sums without counts or counts without sums")
    limit = _U32_MAX if fmt == "gguf" else _I32_MAX
    for key in ("chunk_count", "chunk_size"):
        v = getattr(im, key)
        if not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= limit:
            raise LowbitError(f"imatrix {key} = {v!r}: must be an integer in 0..{limit}")
    if not all(isinstance(d, str) for d in im.datasets):
        raise LowbitError("imatrix datasets must be a list of str")
    out = []
    for name in im.names():
        if not isinstance(name, str) or not name:
            raise LowbitError(f"imatrix entry name {name!r} must be a non-empty str")
        nb = len(name.encode("utf-8"))
        if fmt == "gguf" and nb + len(SUFFIX_SUMS) > _MAX_TENSOR_NAME:
            raise LowbitError(f"imatrix entry {name!r}: GGUF tensor names are at most {_MAX_TENSOR_NAME} bytes, so "
                              f"entry names at most {_MAX_TENSOR_NAME - len(SUFFIX_SUMS)}")
        sums = np.asarray(im.sums[name], dtype=np.float32)
        counts = np.asarray(im.counts[name], dtype=np.float32).reshape(-1)
        _check_entry(name, sums, counts)
        if sums.size > _I32_MAX or counts.size > _I32_MAX:
            raise LowbitError(f"imatrix entry {name!r}: too many values")
        out.append((name, np.ascontiguousarray(sums.reshape(counts.size, -1)), counts))
    return out


def _write_gguf(p: Path, im: Imatrix, entries: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Keys and tensors in llama-imatrix's order (spec/imatrix.md section 3): 2-D tensors with trailing 1s
    dropped, i.e. sums ne [n_in] / counts ne [1] for a dense entry, [n_in, n_expert] / [1, n_expert] otherwise."""
    w = GGUFWriter(p)
    try:
        w.add_metadata(KEY_TYPE, "imatrix", GGUFValueType.STRING)
        w.add_metadata(KEY_DATASETS, list(im.datasets), GGUFValueType.ARRAY, GGUFValueType.STRING)
        w.add_metadata(KEY_CHUNK_COUNT, int(im.chunk_count), GGUFValueType.UINT32)
        w.add_metadata(KEY_CHUNK_SIZE, int(im.chunk_size), GGUFValueType.UINT32)
        for name, sums, counts in entries:
            n_mat, n_in = sums.shape
            w.add_tensor_info(name + SUFFIX_SUMS, (n_in,) if n_mat == 1 else (n_mat, n_in), _F32)
            w.add_tensor_info(name + SUFFIX_COUNTS, (1,) if n_mat == 1 else (n_mat, 1), _F32)
        w.write_header()
        for _, sums, counts in entries:
            w.write_tensor_data(sums.astype("<f4", copy=False))
            w.write_tensor_data(counts.astype("<f4", copy=False))
        w.finish()
    except BaseException:
        w.abort()
        raise


def _dat_entry(name: str, sums: np.ndarray, counts: np.ndarray, chunk_size: int) -> bytes:
    """One legacy entry (spec/imatrix.md section 2): ncall = ceil(max count / chunk_size); each value is
    (sum / count) * ncall in float32, with a zero count stored as a mean of 1."""
    n_mat, n_in = sums.shape
    max_count = int(math.floor(float(counts.max()) + 0.5))
    if chunk_size > 0:
        ncall = (max_count + chunk_size - 1) // chunk_size
    else:
        ncall = int(math.ceil(float(counts.max())))  # counts already are the normaliser
    if not 1 <= ncall <= _I32_MAX:
        raise LowbitError(f"imatrix entry {name!r}: normaliser {ncall} out of int32 range")
    c = counts[:, None]
    zero = c == 0
    s = np.where(zero, np.float32(1), sums)
    c = np.where(zero, np.float32(1), c)
    if chunk_size > 0:
        values = (s / c) * np.float32(ncall)
    else:
        # Keep stored values bit-exact when the count equals the normaliser (a .dat file read back).
        values = np.where(c == np.float32(ncall), s, (s / c) * np.float32(ncall))
    raw = name.encode("utf-8")
    head = struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, n_mat * n_in)
    return head + values.astype("<f4").tobytes()


def _write_dat(p: Path, im: Imatrix, entries: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    dataset = im.datasets[-1].encode("utf-8") if im.datasets else b""
    _atomic_write(p, lambda f: _dat_body(f, entries, int(im.chunk_size), int(im.chunk_count), dataset))


def _dat_body(f: BinaryIO, entries: list[tuple[str, np.ndarray, np.ndarray]], chunk_size: int, chunk_count: int,
              dataset: bytes) -> None:
    f.write(struct.pack("<i", len(entries)))
    for name, sums, counts in entries:
        f.write(_dat_entry(name, sums, counts, chunk_size))
    f.write(struct.pack("<ii", chunk_count, len(dataset)) + dataset)


def _atomic_write(p: Path, body) -> None:
    """Run body(file) on "<path>.tmp-<pid>", then fsync and rename it onto path; remove it on any failure."""
    tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            body(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
