"""Tensor types and block quantization: QType, type_info, quantize/dequantize (spec/quant-types.md)."""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import _core
from ._core import LowbitError

log = logging.getLogger(__name__)

__all__ = [
    "QType",
    "TypeInfo",
    "type_info",
    "all_type_infos",
    "quantize",
    "dequantize",
    "row_size",
    "tensor_nbytes",
    "set_quantize_isa",
    "quantize_isa",
    "quantize_isa_available",
    "nf4_codes",
]


class _QTypeBase(enum.IntEnum):
    """Tensor types lowbit computes with. Ids are ggml's; NF4/NF4_DQ/FP4 are private (>= 1024).

    The members come from the core's registry (cpp/include/lowbit/qtypes.def), so a type added there
    appears here, in the CLI's choices and in the tests' type lists without another edit.
    """

    @property
    def block_size(self) -> int:
        """Elements per block (1 for float types)."""
        return type_info(self).block_size

    @property
    def type_size(self) -> int:
        """Bytes per block (NF4_DQ: the per-block part; see tensor_nbytes for whole tensors)."""
        return type_info(self).type_size

    @property
    def is_quantized(self) -> bool:
        return type_info(self).is_quantized

    @classmethod
    def from_name(cls, name: str) -> "QType":
        """QType.from_name("q4_k") -> QType.Q4_K (case-insensitive)."""
        key = name.strip().upper()
        try:
            return cls[key]
        except KeyError:
            choices = ", ".join(m.name.lower() for m in cls)
            raise LowbitError(f"unknown quant type {name!r}; choose one of {choices}") from None

    @classmethod
    def parse(cls, qtype: "QType | int | str") -> "QType":
        """The one parser of tensor types: a QType, its id, or its name (any case)."""
        if isinstance(qtype, cls):
            return qtype
        if isinstance(qtype, str):
            return cls.from_name(qtype)
        if isinstance(qtype, bool) or not isinstance(qtype, (int, np.integer)):
            raise LowbitError(f"a tensor type is a lowbit.QType, a type id or a name, not {qtype!r}")
        try:
            return cls(int(qtype))
        except ValueError:
            info = _core._type_info(int(qtype))
            what = f"ggml type {info[1]} (id {int(qtype)})" if info else f"type id {int(qtype)}"
            raise LowbitError(
                f"{what} is not one lowbit computes with; use one of " + ", ".join(m.name for m in cls)
            ) from None


QType = _QTypeBase("QType", [(name, int(tid)) for name, tid in _core.qtypes()], module=__name__)
QType.__qualname__ = "QType"


@dataclass(frozen=True)
class TypeInfo:
    """One row of the type table (any ggml id, or a lowbit private id)."""

    id: int
    name: str
    block_size: int
    type_size: int
    is_quantized: bool
    supported: bool
    tensor_level: bool


def type_info(type_id: int) -> TypeInfo:
    """Name, block size, bytes per block and support for any known ggml/lowbit type id."""
    row = _core._type_info(int(type_id))
    if row is None:
        raise LowbitError(f"unknown tensor type id {int(type_id)}: not a ggml type id nor a lowbit one")
    return TypeInfo(*row)


def all_type_infos() -> list[TypeInfo]:
    """The whole type table, ordered by id."""
    return [type_info(i) for i in _core._all_type_ids()]


def _qtype(qtype: QType | int | str) -> QType:
    return QType.parse(qtype)


def row_size(qtype: QType | int | str, n: int) -> int:
    """Bytes of one row of n elements (n a multiple of the block size)."""
    return int(_core.row_size(int(_qtype(qtype)), int(n)))


def tensor_nbytes(qtype: QType | int, n: int) -> int:
    """Bytes of a whole tensor of n elements; works for every known type id, NF4_DQ included."""
    qid = int(QType.parse(qtype)) if isinstance(qtype, str) else int(qtype)
    return int(_core.tensor_nbytes(qid, int(n)))


def quantize(x: np.ndarray, qtype: QType | int | str, n_threads: int = 0) -> np.ndarray:
    """Quantize x (float array; last axis a multiple of the block size) to packed bytes.

    Rows are all axes but the last; the result is uint8 of shape (*x.shape[:-1], bytes_per_row), or
    1-D for NF4_DQ, whose layout is tensor-level. Bit-exact with gguf.quants.quantize (Q4_0, Q4_1,
    Q8_0, F16, BF16) and bitsandbytes (NF4, NF4_DQ).
    """
    t = _qtype(qtype)
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise LowbitError(f"quantize needs a floating-point array, got dtype {arr.dtype}; convert it to float32")
    if arr.ndim == 0:
        raise LowbitError("quantize needs at least one axis (got a scalar)")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    flat = _core._quantize(arr, int(t), int(n_threads))
    if t == QType.NF4_DQ or arr.ndim == 1:
        return flat
    rows = arr.shape[:-1]
    return flat.reshape(*rows, -1)


def dequantize(data: np.ndarray | bytes, qtype: QType | int | str, shape: Sequence[int] | int,
               n_threads: int = 0) -> np.ndarray:
    """Dequantize packed bytes of `qtype` to a float32 array of `shape`."""
    t = _qtype(qtype)
    shp = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shp):
        raise LowbitError(f"dequantize: negative dimension in shape {shp}")
    if isinstance(data, (bytes, bytearray, memoryview)):
        buf = np.frombuffer(data, dtype=np.uint8)
    else:
        buf = np.asarray(data)
        if buf.dtype != np.uint8:
            raise LowbitError(f"dequantize needs uint8 bytes, got dtype {buf.dtype}; pass data.view(np.uint8)")
        buf = np.ascontiguousarray(buf).reshape(-1)
    n = int(np.prod(shp, dtype=np.int64)) if shp else 1
    if shp and shp[-1] % t.block_size != 0:
        raise LowbitError(f"dequantize: last axis {shp[-1]} is not a multiple of {t.name}'s block size {t.block_size}")
    out = _core._dequantize(buf, int(t), n, int(n_threads))
    return out.reshape(shp)


def set_quantize_isa(isa: str) -> None:
    """Force the CPU kernel table ("auto", "generic", "avx2", "avx512", "neon"), quantizers included.

    Quantizers and kernels share one dispatcher (LOWBIT_ISA); every ISA's quantizer is bit-identical to
    the reference. Same as lowbit.set_isa; "auto" goes back to the default.
    """
    if isa == "auto":
        _core.reset_isa()
    else:
        _core.set_isa(isa)


def quantize_isa() -> str:
    """The kernel table in use (its quantizers; per-type fallbacks: lowbit.type_kernels())."""
    return str(_core.active_isa())


def quantize_isa_available(isa: str) -> bool:
    return isa == "auto" or isa in _core.kernels_available()


def nf4_codes() -> np.ndarray:
    """The 16 NF4 code values, float32."""
    return np.asarray(_core.nf4_codes(), dtype=np.float32)
