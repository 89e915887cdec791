"""Per-tensor output types: a llama.cpp file type's recipe (converter/ftype.py) or one of lowbit's own 4-bit
types, then --keep PATTERN=TYPE rules and block-size fallbacks."""
from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from .._core import LowbitError
from ..quants import QType, type_info
from . import ftype

log = logging.getLogger("lowbit.convert")

# lowbit's own types, which no llama.cpp file type describes: every matrix in the type, the rest as it came.
# general.file_type holds their private tensor id, which no llama.cpp build knows.
LOWBIT_OUTTYPES: dict[str, QType] = {"nf4": QType.NF4, "nf4_dq": QType.NF4_DQ, "fp4": QType.FP4}

KeepSpec = Union[None, Mapping[str, str], Sequence[str]]


@dataclass(frozen=True)
class OutType:
    """What `--outtype` and `lowbit quantize IN OUT TYPE` name."""

    name: str                         # "q4_k_m", "nf4"
    file_type_id: int                 # general.file_type
    base: QType                       # the type of the matrices no per-tensor rule changes
    recipe: Optional[ftype.FileType]  # llama.cpp's per-tensor rules; None for lowbit's own types


def outtype_names() -> list[str]:
    """Every name --outtype / TYPE accepts: llama.cpp's file types, then lowbit's own."""
    return list(ftype.FILE_TYPES) + list(LOWBIT_OUTTYPES)


def outtype_table() -> str:
    """The accepted types as --help text, one per line."""
    own = {"nf4": "4.5 bpw: bitsandbytes NF4, fp32 absmax per 64",
           "nf4_dq": "4.1 bpw: NF4 with bitsandbytes' double-quantized absmax",
           "fp4": "4.5 bpw: bitsandbytes FP4 (e2m1), fp32 absmax per 64"}
    rows = [(ft.name, ft.ftype_id, ft.description) for ft in ftype.FILE_TYPES.values()]
    rows += [(name, int(q), own[name]) for name, q in LOWBIT_OUTTYPES.items()]
    return "\n".join(f"  {name:<7} {type_id:>4}  {text}" for name, type_id, text in rows)


def _unknown_outtype(what: object) -> LowbitError:
    return LowbitError(f"unknown file type {what!r}; choose one of {', '.join(outtype_names())}")


def parse_outtype(outtype: Union[str, QType, OutType]) -> OutType:
    """The one parser of output file types: a name ("q4_k_m", any case), an OutType, or a QType named like a
    file type (QType.Q4_0 -> q4_0, QType.Q6_K -> q6_k, QType.NF4 -> nf4)."""
    if isinstance(outtype, OutType):
        return outtype
    if isinstance(outtype, QType):
        outtype = outtype.name.lower()
    if not isinstance(outtype, str):
        raise LowbitError(f"a file type is a name such as 'q4_k_m' or a lowbit.QType, not {outtype!r}")
    key = outtype.strip().lower()
    if key in LOWBIT_OUTTYPES:
        q = LOWBIT_OUTTYPES[key]
        return OutType(key, int(q), q, None)
    ft = ftype.FILE_TYPES.get(key)
    if ft is None:
        raise _unknown_outtype(outtype)
    return OutType(ft.name, ft.ftype_id, QType[ft.base_type], ft)


# ---- --keep rules ------------------------------------------------------------------------------------


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
    "blk.*.ffn_down*", r"blk\\.(0|1)\\.attn_v". TYPE is a tensor type (QType.parse): q8_0, q6_k, f16, nf4..."""
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
            qtype = QType.parse(tname)
        except LowbitError as e:
            raise LowbitError(f"--keep {pattern}={tname}: {e}") from None
        try:
            regex: Optional[re.Pattern] = re.compile(pattern)
        except re.error:
            regex = None
        rules.append(KeepRule(pattern, qtype, regex))
    return rules


# ---- the plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorIn:
    """One tensor of the input: numpy shape (the row is the last axis) and the type it has there (F32 for a
    checkpoint's tensors, which the converter reads as float32)."""

    name: str
    shape: tuple[int, ...]
    type_id: int = int(QType.F32)


def type_name(type_id: int) -> str:
    """ggml's name of a type id ("Q4_K"), or lowbit's ("NF4")."""
    return type_info(int(type_id)).name


def fit_row(qtype: QType, row_length: int) -> QType:
    """qtype when rows of row_length fill its blocks; otherwise llama.cpp's fallback for its types
    (Q4_K -> Q5_0, Q6_K -> Q8_0, ...; ftype.fallback_type), and F16 for lowbit's own."""
    if row_length % qtype.block_size == 0:
        return qtype
    if qtype.name in ftype.GGML_TYPES:
        return QType[ftype.fallback_type(qtype.name, row_length)]
    return QType.F16


def plan_types(tensors: Sequence[TensorIn], facts: ftype.ModelFacts, out: OutType, rules: Sequence[KeepRule] = (),
               pure: bool = False) -> dict[str, Union[QType, int]]:
    """The type every tensor is written in: {name: QType}, or the input's type id for a tensor that keeps a
    type lowbit only reads.

    - a matching --keep rule wins (then the block-size fallback, as llama.cpp applies to its overrides);
    - a llama.cpp file type: ftype.tensor_types, i.e. llama-quantize's choice (pure: its --pure);
    - lowbit's own types: every matrix llama.cpp would quantize is written in the type, F16 where a row does
      not fill its blocks; the other tensors (norms) keep their input type.
    """
    ggml_shape = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in tensors}
    if out.recipe is not None:
        specs = [ftype.TensorSpec(t.name, ggml_shape[t.name], type_name(t.type_id)) for t in tensors]
        try:
            names = ftype.tensor_types(specs, facts, out.recipe, pure=pure)
        except ValueError as e:
            raise LowbitError(str(e)) from None
    else:
        names = {t.name: out.base.name if ftype.is_quantizable(t.name, ggml_shape[t.name]) else type_name(t.type_id)
                 for t in tensors}
        # The output head (the token embedding when tied) is the matrix 4 bits hurt most (SmolLM2: wikitext
        # perplexity 25.3 with an NF4 head, 23.4 with an 8-bit one); llama.cpp's 4-bit file types give it
        # Q6_K, and so do lowbit's (Q8_0 where rows do not fill Q6_K's blocks of 256). --keep and --pure
        # override.
        head = "output.weight" if "output.weight" in names else "token_embd.weight"
        if not pure and head in names and ftype.is_quantizable(head, ggml_shape[head]):
            names[head] = fit_row(QType.Q6_K, ggml_shape[head][0]).name

    chosen: dict[str, Union[QType, int]] = {}
    for t in tensors:
        row = ggml_shape[t.name][0]
        rule = next((r for r in rules if r.matches(t.name)), None)
        if rule is not None:
            chosen[t.name] = fit_row(rule.qtype, row)
            continue
        name = names[t.name]
        if name == type_name(t.type_id):
            chosen[t.name] = _as_qtype(t.type_id)
            continue
        qtype = QType[name]
        if out.recipe is None:
            qtype = fit_row(qtype, row)
        if row % out.base.block_size != 0 and ftype.is_quantizable(t.name, ggml_shape[t.name]):
            log.info("%s: rows of %d do not fill %s's blocks of %d; written as %s", t.name, row, out.base.name,
                     out.base.block_size, qtype.name)
        chosen[t.name] = qtype
    return chosen


def _as_qtype(type_id: int) -> Union[QType, int]:
    try:
        return QType(int(type_id))
    except ValueError:
        return int(type_id)


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
