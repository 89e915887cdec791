"""GGUF files from Python: `GGUFFile` (validating, zero-copy mmap reader) and `GGUFWriter` (streaming, atomic).

    with lowbit.GGUFFile("model.gguf") as f:
        print(f.metadata["general.architecture"], f.metadata_types["llama.block_count"])
        w = f.tensor("blk.0.attn_q.weight").to_numpy()    # float32, numpy shape (rows, cols)

    with lowbit.GGUFWriter("out.gguf") as w:              # renamed onto out.gguf only when the block succeeds
        w.add_metadata("general.architecture", "llama")
        w.add_metadata("llama.block_count", 2, GGUFValueType.UINT32)
        w.add_tensor("token_embd.weight", embeddings, qtype=QType.Q8_0)

Shapes are numpy order here (row-major, last dim contiguous); files store them reversed (ggml order).
What is accepted and written, byte by byte: spec/container.md.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from . import _core
from ._core import LowbitError

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
BufferLike = Union[bytes, bytearray, memoryview, np.ndarray]

DEFAULT_ALIGNMENT = 32


class GGUFValueType(IntEnum):
    """Metadata value types, with GGUF's ids."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_T = GGUFValueType
_INT_RANGES = {
    _T.UINT8: (0, 2**8 - 1), _T.INT8: (-(2**7), 2**7 - 1), _T.UINT16: (0, 2**16 - 1), _T.INT16: (-(2**15), 2**15 - 1),
    _T.UINT32: (0, 2**32 - 1), _T.INT32: (-(2**31), 2**31 - 1), _T.UINT64: (0, 2**64 - 1),
    _T.INT64: (-(2**63), 2**63 - 1),
}
_DTYPE_TO_VT = {
    np.dtype(np.uint8): _T.UINT8, np.dtype(np.int8): _T.INT8, np.dtype(np.uint16): _T.UINT16,
    np.dtype(np.int16): _T.INT16, np.dtype(np.uint32): _T.UINT32, np.dtype(np.int32): _T.INT32,
    np.dtype(np.uint64): _T.UINT64, np.dtype(np.int64): _T.INT64, np.dtype(np.float16): _T.FLOAT32,
    np.dtype(np.float32): _T.FLOAT32, np.dtype(np.float64): _T.FLOAT64, np.dtype(np.bool_): _T.BOOL,
}

# Type ids that lowbit reads without lowbit.quants (plain float layouts).
_F32, _F16, _BF16 = 0, 1, 30


def _qtype(type_id: int):
    """QType when lowbit knows the id, else the plain int (a ggml type lowbit only parses)."""
    from .quants import QType

    try:
        return QType(type_id)
    except ValueError:
        return type_id


# ---- metadata values <-> typed trees ------------------------------------------------------------------
#
# The core takes and gives each value as a typed tree: (type, value) for a scalar and
# (ARRAY, item_type, items) for an array, where items are typed trees again when item_type is ARRAY.


def _plain(tree: tuple) -> Any:
    if tree[0] != _T.ARRAY:
        return tree[1]
    if tree[1] == _T.ARRAY:
        return [_plain(t) for t in tree[2]]
    return tree[2]


def _scalar_type(v: Any, key: str) -> GGUFValueType:
    """gguf-py's choice for a Python value: bool, int -> INT32 (INT64/UINT64 when it does not fit), float ->
    FLOAT32, str -> STRING; numpy scalars keep their dtype."""
    if isinstance(v, (bool, np.bool_)):
        return _T.BOOL
    if isinstance(v, np.generic) and v.dtype in _DTYPE_TO_VT:
        return _DTYPE_TO_VT[v.dtype]
    if isinstance(v, (int, np.integer)):
        v = int(v)
        for t in (_T.INT32, _T.INT64, _T.UINT64):
            lo, hi = _INT_RANGES[t]
            if lo <= v <= hi:
                return t
        raise LowbitError(f"metadata {key!r}: integer {v} does not fit in 64 bits")
    if isinstance(v, (float, np.floating)):
        return _T.FLOAT32
    if isinstance(v, (str, bytes)):
        return _T.STRING
    if isinstance(v, (list, tuple, np.ndarray)):
        return _T.ARRAY
    raise LowbitError(f"metadata {key!r}: cannot store a {type(v).__name__} in GGUF "
                      "(use int, float, bool, str, or a list of them)")


def _item_type(items: Any, key: str) -> GGUFValueType:
    """One item type for a whole array, as gguf-py infers it; ints widen together, ints with floats -> FLOAT32."""
    if isinstance(items, np.ndarray):
        if items.dtype in _DTYPE_TO_VT:
            return _DTYPE_TO_VT[items.dtype]
        if items.dtype.kind in "US":
            return _T.STRING
        raise LowbitError(f"metadata {key!r}: numpy arrays of {items.dtype} cannot be stored in GGUF")
    if len(items) == 0:
        return _T.INT32  # an empty array still needs an item type; pass item_type= to choose another
    kinds = {_scalar_type(v, key) for v in items}
    if len(kinds) == 1:
        only = kinds.pop()
        if only in (_T.INT32, _T.INT64, _T.UINT64):
            return _widest_int(items, key)
        return only
    ints = {_T.INT32, _T.INT64, _T.UINT64, _T.UINT8, _T.INT8, _T.UINT16, _T.INT16, _T.UINT32}
    if kinds <= ints:
        return _widest_int(items, key)
    if kinds <= ints | {_T.FLOAT32, _T.FLOAT64}:
        return _T.FLOAT32
    names = ", ".join(sorted(k.name for k in kinds))
    raise LowbitError(f"metadata {key!r}: array items have mixed types ({names}); GGUF arrays hold one type")


def _widest_int(items: Iterable[Any], key: str) -> GGUFValueType:
    lo, hi = min(int(v) for v in items), max(int(v) for v in items)
    for t in (_T.INT32, _T.INT64, _T.UINT64):
        if _INT_RANGES[t][0] <= lo and hi <= _INT_RANGES[t][1]:
            return t
    raise LowbitError(f"metadata {key!r}: array integers from {lo} to {hi} do not fit one 64-bit type")


def _tree(key: str, value: Any, vtype: Optional[GGUFValueType], item_type: Optional[GGUFValueType]) -> tuple:
    if isinstance(value, GGUFField):
        return value.tree
    is_seq = isinstance(value, (list, tuple, np.ndarray))
    if vtype is None:
        vtype = _T.ARRAY if is_seq else _scalar_type(value, key)
    vtype = GGUFValueType(vtype)
    if vtype != _T.ARRAY and is_seq:
        # Shorthand: a list with a scalar type is an array of that type.
        item_type, vtype = vtype, _T.ARRAY
    if vtype != _T.ARRAY:
        if isinstance(value, np.generic):
            value = value.item()
        return (int(vtype), value)
    if not is_seq:
        raise LowbitError(f"metadata {key!r}: type ARRAY needs a list, got {type(value).__name__}")
    it = GGUFValueType(item_type) if item_type is not None else _item_type(value, key)
    if it == _T.ARRAY:
        return (int(_T.ARRAY), int(it), [_tree(key, v, _T.ARRAY, None) for v in value])
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return (int(_T.ARRAY), int(it), value)


@dataclass(frozen=True)
class GGUFField:
    """One metadata entry with its GGUF type. `item_type` is the array item type (None for scalars);
    `tree` is the exact typed form, accepted back by GGUFWriter.add_metadata to copy a value unchanged."""

    key: str
    type: GGUFValueType
    value: Any
    item_type: Optional[GGUFValueType]
    tree: tuple = field(repr=False)


# ---- reading ---------------------------------------------------------------------------------------------


@dataclass
class GGUFTensor:
    """A tensor of a GGUFFile. shape is numpy order; offset is the absolute byte offset in the file."""

    name: str
    qtype: Any  # lowbit.QType, or the int id of a ggml type lowbit only parses
    shape: tuple[int, ...]
    n_elements: int
    offset: int
    nbytes: int
    _file: "GGUFFile" = field(repr=False, compare=False)

    @property
    def type_id(self) -> int:
        return int(self.qtype)

    @property
    def data(self) -> np.ndarray:
        """The tensor's bytes: a read-only uint8 view of the mapped file (no copy). The view keeps the mapping
        alive, even after GGUFFile.close()."""
        core = self._file._require_open()
        return np.frombuffer(core, dtype=np.uint8, count=self.nbytes, offset=self.offset)

    def to_numpy(self) -> np.ndarray:
        """The tensor as a new float32 array of `shape` (dequantized with lowbit.dequantize for block types)."""
        raw = self.data
        tid = self.type_id
        if tid == _F32:
            return raw.view(np.float32).reshape(self.shape).copy()
        if tid == _F16:
            return raw.view(np.float16).astype(np.float32).reshape(self.shape)
        if tid == _BF16:
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(self.shape)
        from .quants import QType, dequantize

        if not isinstance(self.qtype, QType):
            info = _core._type_info(tid)
            what = f"ggml type {info[1]} (id {tid})" if info else f"type id {tid}"
            raise LowbitError(f"tensor {self.name!r}: {what} cannot be dequantized by lowbit "
                              f"(supported: {', '.join(q.name for q in QType)}); make the file from the model's "
                              "F16/F32 original with `lowbit quantize IN OUT TYPE` or `lowbit convert`")
        return dequantize(raw, self.qtype, self.shape)


class GGUFFile:
    """A GGUF v2/v3 file, mapped read-only and validated completely at open.

    Raises FileNotFoundError when the path does not exist, and lowbit.LowbitError (a ValueError) naming the
    field and byte offset when the file is malformed. Usable as a context manager; close() releases the
    mapping as soon as no `.data` view of a tensor is alive.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(errno.ENOENT, "no such GGUF file", str(self.path))
        self._core: Optional[_core.GGUFReader] = _core.GGUFReader(os.fspath(self.path))
        self.version: int = self._core.version
        self.alignment: int = self._core.alignment
        self.file_size: int = self._core.file_size
        self.data_offset: int = self._core.data_offset
        self._fields: dict[str, GGUFField] = {}
        for key, tree in self._core.metadata():
            t = GGUFValueType(tree[0])
            self._fields[key] = GGUFField(key, t, _plain(tree), GGUFValueType(tree[1]) if t == _T.ARRAY else None,
                                          tree)
        self.metadata: dict[str, Any] = {k: f.value for k, f in self._fields.items()}
        self.metadata_types: dict[str, GGUFValueType] = {k: f.type for k, f in self._fields.items()}
        self.tensors: list[GGUFTensor] = []
        for name, type_id, ne, offset, nbytes in self._core.tensors():
            shape = tuple(int(d) for d in reversed(ne))
            self.tensors.append(GGUFTensor(name, _qtype(type_id), shape, int(np.prod(shape, dtype=np.int64)),
                                           int(offset), int(nbytes), self))
        self._by_name = {t.name: t for t in self.tensors}

    def field(self, key: str) -> GGUFField:
        """The entry for key with its GGUF type; KeyError when absent."""
        try:
            return self._fields[key]
        except KeyError:
            raise KeyError(f"{self.path}: no metadata key {key!r}") from None

    def tensor(self, name: str) -> GGUFTensor:
        """The tensor called name; KeyError when absent."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def file_changed_on_disk(self) -> bool:
        """True when the file's size, mtime or inode differ from what they were at open (replaced or truncated)."""
        return self._require_open().file_changed_on_disk()

    def close(self) -> None:
        self._core = None

    def _require_open(self) -> "_core.GGUFReader":
        if self._core is None:
            raise LowbitError(f"{self.path}: the GGUF file is closed; open it again")
        return self._core

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


# ---- writing ---------------------------------------------------------------------------------------------


@dataclass
class _Declared:
    name: str
    nbytes: int
    data: Optional[BufferLike]  # in-memory tensors (add_tensor); None for streamed ones


def _nbytes(data: BufferLike) -> int:
    if isinstance(data, np.ndarray):
        return int(data.nbytes)
    return memoryview(data).nbytes


class GGUFWriter:
    """Writes a GGUF v3 file: metadata and tensor infos first, then each tensor's bytes in declaration order,
    padded to `alignment`. Nothing is held in memory but the metadata and tensors given to add_tensor.

    Streaming (a 10 GB model never sits in memory):
        w = GGUFWriter(path)
        w.add_metadata(...); w.add_tensor_info(name, shape, qtype) ...
        w.write_header()
        w.write_tensor_data(bytes_of_first_tensor) ...     # one or more pieces per tensor, in order
        w.finish()
    In memory: add_tensor(name, array, qtype=...) then finish(). Both may be mixed; in-memory tensors are
    written automatically when their turn comes. The file is written as "<path>.tmp-<pid>" and renamed onto
    path by finish(); abort(), an exception inside `with`, or garbage collection removes it instead.
    """

    def __init__(self, path: PathLike, alignment: int = DEFAULT_ALIGNMENT) -> None:
        self.path = Path(path)
        self.alignment = int(alignment)
        self._core: Optional[_core.GGUFWriter] = _core.GGUFWriter(os.fspath(self.path), self.alignment)
        self._tensors: list[_Declared] = []
        self._next = 0  # index of the tensor whose bytes come next
        self._written = 0  # bytes of that tensor written so far
        self._header_written = False

    def _w(self) -> "_core.GGUFWriter":
        if self._core is None:
            raise LowbitError(f"GGUFWriter({str(self.path)!r}) is already finished or aborted")
        return self._core

    def add_metadata(self, key: str, value: Any, type: Optional[GGUFValueType] = None,
                     item_type: Optional[GGUFValueType] = None) -> None:
        """Add one key. Without `type` it is inferred like gguf-py (int -> INT32, or INT64/UINT64 when out of range;
        float -> FLOAT32; bool; str; list/tuple/ndarray -> ARRAY with one inferred item type; nested lists ->
        nested arrays). `type=ARRAY` with `item_type` fixes the item type; a scalar `type` with a list value
        means an array of that type. A GGUFField (from GGUFFile.field) is copied with its exact types."""
        if not isinstance(key, str):
            raise LowbitError(f"metadata key {key!r} must be a str")
        self._w().add_kv(key, _tree(key, value, type, item_type))

    def add_tensor_info(self, name: str, shape: Sequence[int], qtype: Any) -> int:
        """Declare a tensor whose bytes come later through write_tensor_data. shape is numpy order; qtype a
        lowbit.QType or ggml type id. Returns the tensor's byte count."""
        return self._declare(name, shape, qtype, None)

    def add_tensor(self, name: str, data: Any, qtype: Any = None, shape: Optional[Sequence[int]] = None) -> None:
        """Add a tensor held in memory.

        Without `shape`, data is a float array that is encoded to qtype (default: F32 for float32/float64,
        F16 for float16): F32/F16 by numpy, other types by lowbit.quantize. With `shape` (numpy order), data is
        the already encoded bytes (bytes, memoryview or uint8 array) of a qtype tensor of that shape.
        """
        if shape is None:
            arr = np.asarray(data)
            if arr.dtype.kind != "f":
                raise LowbitError(f"tensor {name!r}: give a float array, or raw bytes with shape= and qtype=")
            if qtype is None:
                qtype = _F16 if arr.dtype == np.float16 else _F32
            shape = arr.shape
            raw = _encode(arr, int(qtype))
        else:
            if qtype is None:
                raise LowbitError(f"tensor {name!r}: raw bytes need qtype= as well as shape=")
            raw = data
        self._declare(name, shape, qtype, raw)

    def _declare(self, name: str, shape: Sequence[int], qtype: Any, data: Optional[BufferLike]) -> int:
        w = self._w()
        if self._header_written:
            raise LowbitError(f"tensor {name!r}: the header is already written; declare every tensor before "
                              "write_header()")
        ne = [int(d) for d in reversed(tuple(shape))]
        if data is not None:
            # Check the byte count before the core records the tensor, so a refused add leaves no trace.
            try:
                nbytes = int(_core.gguf_tensor_nbytes(int(qtype), ne))
            except LowbitError:
                w.add_tensor_info(name, int(qtype), ne)  # raises the same problem, with the tensor's name
                raise
            if _nbytes(data) != nbytes:
                raise LowbitError(f"tensor {name!r}: {_nbytes(data)} bytes given, but a {_type_name(qtype)} tensor "
                                  f"of shape {list(shape)} is {nbytes} bytes")
        w.add_tensor_info(name, int(qtype), ne)
        nbytes = int(_core.gguf_tensor_nbytes(int(qtype), ne))
        self._tensors.append(_Declared(name, nbytes, data))
        return nbytes

    def write_header(self) -> None:
        """Write header, metadata and tensor infos; afterwards only tensor data may follow."""
        self._w().write_header()
        self._header_written = True
        self._advance()

    def write_tensor_data(self, data: BufferLike) -> None:
        """The next streamed tensor's bytes (all of them, or the next piece), in add_tensor_info order."""
        w = self._w()
        if not self._header_written:
            raise LowbitError("write_tensor_data: call write_header() first")
        if isinstance(data, np.ndarray) and not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        w.write_tensor_data(data)
        self._written += _nbytes(data)
        self._advance()

    def finish(self) -> Path:
        """Write what is left (header, in-memory tensors), flush, fsync and rename onto path. Returns path."""
        w = self._w()
        if not self._header_written:
            self.write_header()
        w.finish()
        self._core = None
        return self.path

    def abort(self) -> None:
        """Drop the output: the temporary file is removed and nothing appears under path. Safe to call twice."""
        if self._core is not None:
            self._core.abort()
            self._core = None

    def _advance(self) -> None:
        """Move past completed tensors and write in-memory ones whose turn has come."""
        while self._next < len(self._tensors):
            cur = self._tensors[self._next]
            if self._written == cur.nbytes:
                cur.data = None
                self._next += 1
                self._written = 0
            elif cur.data is not None and self._written == 0:
                self._w().write_tensor_data(cur.data)
                self._written = cur.nbytes
            else:
                break

    def __enter__(self) -> "GGUFWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif self._core is not None:
            try:
                self.finish()
            except BaseException:
                self.abort()
                raise

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None:
            core.abort()


def _type_name(qtype: Any) -> str:
    return getattr(qtype, "name", f"type {int(qtype)}")


def _encode(arr: np.ndarray, type_id: int) -> np.ndarray:
    """Encode a float array as a tensor of type_id: bytes in file layout."""
    if type_id == _F32:
        return np.ascontiguousarray(arr, dtype=np.float32).view(np.uint8).reshape(-1)
    if type_id == _F16:
        return np.ascontiguousarray(arr, dtype=np.float16).view(np.uint8).reshape(-1)
    from .quants import QType, quantize

    return np.asarray(quantize(np.ascontiguousarray(arr, dtype=np.float32), QType(type_id))).view(np.uint8).reshape(-1)
