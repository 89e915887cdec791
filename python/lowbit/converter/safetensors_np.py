"""Reads safetensors files with numpy alone (memory-mapped), so bf16 checkpoints convert without torch.

Format (https://huggingface.co/docs/safetensors, "Format"): uint64 little-endian header length N, N bytes
of UTF-8 JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the
raw little-endian tensor bytes; offsets are relative to the byte after the header.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .._core import LowbitError

# safetensors dtype -> numpy dtype of the stored bytes. BF16 has no numpy dtype: kept as uint16 bits.
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}

_MAX_HEADER = 100 * 1024 * 1024


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 is the top half of an f32: widen by shifting the 16 bits up."""
    wide = bits.astype(np.uint32)
    wide <<= 16  # in place: one float32-sized buffer, not two
    return wide.view(np.float32)


class SafetensorsFile:
    """One .safetensors file: names, dtypes, shapes, and tensors as float32 on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise LowbitError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise LowbitError(f"{self.path}: safetensors header length {n} is impossible for a "
                                  f"{size}-byte file; the file is truncated or not safetensors")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise LowbitError(f"{self.path}: safetensors header is not valid JSON ({e})") from None
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._size = size
        self._entries: dict[str, dict] = header
        self._map: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def dtype(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._entries[name]["shape"])

    def raw(self, name: str) -> np.ndarray:
        """The stored values, zero-copy (a view of the mapping); BF16 as uint16 bits."""
        e = self._entries[name]
        dt = _DTYPES.get(e["dtype"])
        if dt is None:
            raise LowbitError(f"{self.path}: tensor {name!r} has dtype {e['dtype']}, which the converter "
                              f"does not read (supported: {', '.join(_DTYPES)})")
        begin, end = (int(x) for x in e["data_offsets"])
        shape = self.shape(name)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if end - begin != count * dt.itemsize or self._data_start + end > self._size:
            raise LowbitError(f"{self.path}: tensor {name!r} byte range [{begin}, {end}) does not match its "
                              f"shape {list(shape)} and dtype {e['dtype']}, or runs past the end of the file")
        if count == 0:
            return np.zeros(shape, dtype=dt)
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[self._data_start + begin:self._data_start + end].view(dt).reshape(shape)

    def read(self, name: str) -> np.ndarray:
        """The stored values, read into a fresh array (BF16 as uint16 bits). Unlike raw(), nothing stays mapped,
        so converting tensor by tensor holds about one tensor in memory."""
        view = self.raw(name)  # validates the entry
        begin = int(self._entries[name]["data_offsets"][0])
        return np.fromfile(self.path, dtype=view.dtype, count=view.size,
                           offset=self._data_start + begin).reshape(view.shape)

    def get_f32(self, name: str) -> np.ndarray:
        raw = self.read(name)
        if self.dtype(name) == "BF16":
            return bf16_bits_to_f32(raw)
        return raw.astype(np.float32, copy=False)
