"""Per-tensor output types: --outtype, --keep PATTERN=TYPE rules, F32 norms, block-size fallbacks."""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from .._core import LowbitError
from ..quants import QType

# --outtype / --keep names -> tensor type.
TYPE_NAMES: dict[str, QType] = {
    "f32": QType.F32, "f16": QType.F16, "bf16": QType.BF16, "q8_0": QType.Q8_0, "q4_0": QType.Q4_0,
    "q4_1": QType.Q4_1, "nf4": QType.NF4, "nf4_dq": QType.NF4_DQ,
}

BLOCK_SIZE = {QType.F32: 1, QType.F16: 1, QType.BF16: 1, QType.Q8_0: 32, QType.Q4_0: 32, QType.Q4_1: 32,
              QType.NF4: 64, QType.NF4_DQ: 64}

# general.file_type (llama.cpp's LlamaFileType) for a file whose bulk is this type. NF4 has no llama.cpp
# file type: its private tensor id is used, which no llama.cpp build knows.
FILE_TYPE = {QType.F32: 0, QType.F16: 1, QType.Q4_0: 2, QType.Q4_1: 3, QType.Q8_0: 7, QType.BF16: 32,
             QType.NF4: int(QType.NF4), QType.NF4_DQ: int(QType.NF4_DQ)}

KeepSpec = Union[None, Mapping[str, str], Sequence[str]]


def parse_type(name: Union[str, int, QType]) -> QType:
    if isinstance(name, (int, QType)) and not isinstance(name, bool):
        q = QType(int(name))
        if q in BLOCK_SIZE:
            return q
    elif isinstance(name, str) and name.lower() in TYPE_NAMES:
        return TYPE_NAMES[name.lower()]
    raise LowbitError(f"unknown tensor type {name!r}; use one of {', '.join(TYPE_NAMES)}")


@dataclass
class KeepRule:
    pattern: str
    qtype: QType
    _regex: Optional[re.Pattern] = None

    def matches(self, name: str) -> bool:
        short = name[:-len(".weight")] if name.endswith(".weight") else name
        if fnmatch.fnmatchcase(name, self.pattern) or fnmatch.fnmatchcase(short, self.pattern):
            return True
        return self._regex is not None and bool(self._regex.fullmatch(name) or self._regex.fullmatch(short))


def parse_keep(keep: KeepSpec) -> list[KeepRule]:
    """--keep rules, in order (the first rule that matches a tensor wins). Accepts a dict {pattern: type} or
    a list of "PATTERN=TYPE". A pattern is a shell glob (fnmatch) or a regular expression, matched against
    the whole GGUF tensor name with or without its ".weight" suffix: "output", "token_embd",
    "blk.*.ffn_down*", r"blk\\.(0|1)\\.attn_v"."""
    if keep is None:
        return []
    items = list(keep.items()) if isinstance(keep, Mapping) else []
    if not isinstance(keep, Mapping):
        for spec in keep:
            if not isinstance(spec, str) or "=" not in spec:
                raise LowbitError(f"--keep {spec!r}: write PATTERN=TYPE, e.g. output=q8_0 or 'blk.*.ffn_down*=q8_0'")
            pattern, _, tname = spec.rpartition("=")
            items.append((pattern, tname))
    rules = []
    for pattern, tname in items:
        if not pattern:
            raise LowbitError(f"--keep rule {pattern}={tname}: the pattern is empty")
        try:
            regex: Optional[re.Pattern] = re.compile(pattern)
        except re.error:
            regex = None
        rules.append(KeepRule(pattern, parse_type(tname), regex))
    return rules


def choose_type(name: str, shape: tuple[int, ...], outtype: QType, rules: list[KeepRule],
                fallback: QType = QType.F16) -> QType:
    """The type a tensor is written in.

    - a matching --keep rule wins;
    - otherwise 1-D tensors (norms) stay F32, as llama.cpp writes them;
    - otherwise --outtype.
    A block type needs the row length (ne0, numpy's last axis) to be a multiple of its block size; when it is
    not, the tensor falls back to F16 (what llama.cpp's converter does for Q8_0 rows it cannot block).
    """
    qtype = next((r.qtype for r in rules if r.matches(name)), None)
    if qtype is None:
        qtype = QType.F32 if len(shape) == 1 else outtype
    if shape[-1] % BLOCK_SIZE[qtype] != 0:
        return fallback
    return qtype


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even, NaN forced quiet (as gguf-py's quants.BF16 does;
    reference §2 "FP16 conversion")."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    n = (n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.astype(np.uint16)


def encode(x: np.ndarray, qtype: QType) -> np.ndarray:
    """The bytes of tensor x (float32, numpy shape) in qtype, as a uint8 array."""
    from .. import quants

    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == QType.F32:
        return x.reshape(-1).view(np.uint8)
    if qtype == QType.F16:
        # numpy's float16 cast rounds to nearest even, as ggml's FP32_TO_FP16 does (reference §2).
        return x.astype(np.float16).reshape(-1).view(np.uint8)
    if qtype == QType.BF16:
        return bf16_bits(x).reshape(-1).view(np.uint8)
    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    return np.ascontiguousarray(quants.quantize(rows, qtype)).reshape(-1).view(np.uint8)
