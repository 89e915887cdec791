"""GGUF metadata entries as the converter builds them: key, value and the exact GGUF value type."""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Optional


class VT(IntEnum):
    """GGUF metadata value types (gguf spec, gguf_metadata_value_type)."""

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


@dataclass
class KV:
    key: str
    value: Any
    type: Optional[VT]  # None: value is a GGUFField, copied with its own types
    elem_type: Optional[VT] = None  # for ARRAY

    @staticmethod
    def u32(key: str, v: int) -> "KV":
        return KV(key, int(v), VT.UINT32)

    @staticmethod
    def i32(key: str, v: int) -> "KV":
        return KV(key, int(v), VT.INT32)

    @staticmethod
    def f32(key: str, v: float) -> "KV":
        return KV(key, float(v), VT.FLOAT32)

    @staticmethod
    def str(key: str, v: str) -> "KV":
        return KV(key, v, VT.STRING)

    @staticmethod
    def bool(key: str, v: bool) -> "KV":
        return KV(key, bool(v), VT.BOOL)

    @staticmethod
    def arr(key: str, v: list, elem: VT) -> "KV":
        return KV(key, list(v), VT.ARRAY, elem)
