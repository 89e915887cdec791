"""Checkpoints quantized by GPTQ or AWQ (config.json "quantization_config"): their packed 4-bit linears read
back as GGUF Q4_0 / Q4_1 blocks holding the same integer codes, or dequantized for a float file type.

Formats, as this module reads them (every tensor is [in, out], the transpose of torch's Linear.weight; an
int32 word holds 8 4-bit codes, nibble k in bits 4k..4k+3):

- GPTQ (quant_method "gptq", AutoGPTQ / GPTQModel): qweight int32 [in/8, out] packed along the input dim
  (input row i is word i // 8, nibble i % 8); qzeros int32 [groups, out/8] packed along the output dim the
  same way (output column j is word j // 8, nibble j % 8); scales fp16 [groups, out]; g_idx int32 [in], the
  group of each input row (absent: i // group_size). Input row i, output column j dequantizes as
  w = scales[g, j] * (q - z) with g = g_idx[i], where z is the stored zero code plus 1 for checkpoint_format
  "gptq" (v1, which stores z - 1) and the stored code itself for "gptq_v2". sym=true means z = 8 everywhere.
- AWQ (quant_method "awq", version "gemm", AutoAWQ): qweight int32 [in, out/8] and qzeros int32
  [in/group, out/8], both packed along the output dim with an interleave: nibble k of a word holds output
  column AWQ_ORDER[k] of the word's 8 columns (nibble 0 -> column 0, 1 -> 2, 2 -> 4, 3 -> 6, 4 -> 1, 5 -> 3,
  6 -> 5, 7 -> 7); scales fp16 [in/group, out]; w = s * (q - z), groups of group_size consecutive input rows.

Mapping to GGUF. A GGUF row is one output; its blocks are 32 consecutive input columns. Where every block of
32 input columns lies in one group -- group_size a multiple of 32, per-channel (group_size -1: one group
spans the whole input), or an act-order g_idx that happens to be constant on each such block -- a block
takes its group's s and z and keeps the codes q unchanged:

- every zero of the tensor is 8 (symmetric): Q4_0, d = s, w = d * (q - 8). Exact: s is already fp16.
- otherwise Q4_1, d = s and m = -s * z rounded once to fp16 (w = d * q + m). d * q is exact; m is not in
  general: s * z has up to 16 significant bits and fp16 keeps 11, so |m + s z| <= 2^-11 |s z| <= 15/2048 s
  (0.73 % of one quantization step s; under 2^-25 in absolute terms where s z is an fp16 subnormal). It is
  exact for z in {0, 1, 2, 4, 8, 16} and, over fp16 scales drawn log-uniformly from [1e-4, 0.1] with z
  uniform in 0..15, for 45 % of the (s, z) pairs; the error measured there is at most 0.0073 s and 0.0012 s
  on average.

Llama's q/k row permutation (converter/hf.py permute_qk) reorders whole output rows, so it moves blocks
without touching them: exact.

Not mapped (LowbitError, unless the file type is a float type, which takes the exact dequantized values
w = s * (q - z) instead): a block of 32 input columns spanning two groups (group_size not a multiple of 32,
act-order where the groups are not runs of 32 consecutive inputs), inputs not a multiple of 32, scales that
are not fp16 values. Never read: bits other than 4, AWQ versions other than "gemm", GPTQ checkpoint formats
other than "gptq"/"gptq_v2", other quant_methods.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Optional, Protocol, Sequence, Union

import numpy as np

from .._core import LowbitError
from ..quants import QType
from .plan import KeepRule, OutType, type_name

log = logging.getLogger("lowbit.convert")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of an AWQ word -> output column AWQ_ORDER[k] of its 8
GGUF_BLOCK = 32                        # elements per Q4_0 / Q4_1 block
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")
_DEQUANT_HINT = ("convert with --outtype f16 (or f32) to dequantize it, then `lowbit quantize` that file to "
                 "the type you want")

_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])


class TensorStore(Protocol):
    """What the packed linears are read from (converter/hf.py Checkpoint)."""

    dir: Path

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def load(self, name: str) -> np.ndarray: ...       # float32

    def load_raw(self, name: str) -> np.ndarray: ...   # the stored dtype (int32 for the packed words)


@dataclass(frozen=True)
class PrequantConfig:
    """A checkpoint's quantization_config, as far as reading its packed linears goes."""

    method: str        # "gptq" or "awq"
    bits: int
    group_size: int    # input rows per group; -1: one group per output channel
    zero_offset: int   # added to a stored zero code: 1 for GPTQ v1, 0 otherwise
    fmt: str           # "gptq", "gptq_v2" or "gemm"
    source: str        # where the settings came from, for messages

    @property
    def label(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"group {self.group_size}"
        return f"{self.method.upper()} {self.bits}-bit {group} ({self.fmt})"

    @classmethod
    def from_hf_dir(cls, hf_dir: Path, config: Mapping[str, Any]) -> Optional["PrequantConfig"]:
        """config.json's quantization_config, else a quantize_config.json (AutoGPTQ) or quant_config.json
        (AutoAWQ) beside it; None for an unquantized checkpoint."""
        qcfg = config.get("quantization_config")
        source = str(hf_dir / "config.json") + ": quantization_config"
        if not qcfg:
            for fname, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
                path = hf_dir / fname
                if path.is_file():
                    qcfg = {"quant_method": method, **json.loads(path.read_text(encoding="utf-8"))}
                    source = str(path)
                    break
        if not qcfg:
            return None
        if not isinstance(qcfg, Mapping):
            raise LowbitError(f"{source} is not an object")
        return cls.parse(qcfg, source)

    @classmethod
    def parse(cls, qcfg: Mapping[str, Any], source: str) -> "PrequantConfig":
        method = str(qcfg.get("quant_method", "")).lower()
        if method not in ("gptq", "awq"):
            raise LowbitError(f"{source}: quant_method {qcfg.get('quant_method')!r} is not supported; lowbit "
                              f"converts unquantized checkpoints and 4-bit GPTQ or AWQ (gemm) ones. Dequantize "
                              f"the model (e.g. with transformers) and save it in f16/bf16 first")
        bits = qcfg.get("bits", qcfg.get("w_bit"))
        group = qcfg.get("group_size", qcfg.get("q_group_size", -1))
        if bits is None or int(bits) != 4:
            raise LowbitError(f"{source}: {method.upper()} with bits={bits!r}; lowbit reads 4-bit checkpoints only "
                              f"(GGUF's Q4_0/Q4_1 hold 4-bit codes). Use a 4-bit checkpoint, or dequantize this one "
                              f"to f16 with its own library and convert that")
        group = int(group if group is not None else -1)
        if group != -1 and group <= 0:
            raise LowbitError(f"{source}: group_size {group} is invalid (a positive number, or -1 for per-channel)")
        if method == "gptq":
            fmt = str(qcfg.get("checkpoint_format", qcfg.get("format")) or "gptq").lower()
            if fmt not in ("gptq", "gptq_v2"):
                raise LowbitError(f"{source}: GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq' and "
                                  f"'gptq_v2'); save the model in the gptq format (GPTQModel can convert it)")
            return cls("gptq", 4, group, 1 if fmt == "gptq" else 0, fmt, source)
        fmt = str(qcfg.get("version") or "gemm").lower()
        if fmt != "gemm":
            raise LowbitError(f"{source}: AWQ version {fmt!r} is not supported (only 'gemm', whose packing lowbit "
                              f"reads); re-export the model with the GEMM version, or dequantize it to f16")
        if qcfg.get("zero_point") is False:
            raise LowbitError(f"{source}: AWQ without zero points (zero_point false) is not supported")
        return cls("awq", 4, group, 0, fmt, source)


def _nibbles(words: np.ndarray) -> np.ndarray:
    """int32 words [...] -> their 8 nibbles [..., 8] (nibble k = bits 4k..4k+3), as uint8."""
    u = np.ascontiguousarray(words).view(np.uint32)
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    return ((u[..., None] >> shifts) & np.uint32(0xF)).astype(np.uint8)


class PackedLinear:
    """One packed GPTQ/AWQ linear in GGUF orientation [out, in]. Calling it gives the dequantized weights
    (float32, exact: fp16 s times an integer in -16..15); native() and blocks() give the Q4_0/Q4_1 form."""

    def __init__(self, store: TensorStore, cfg: PrequantConfig, base: str, present: Collection[str],
                 row_order: Optional[np.ndarray] = None):
        self.store, self.cfg, self.base = store, cfg, base
        self.row_order = row_order
        self.tensor_names = [base + p for p in _PARTS if base + p in present]
        qw = store.shape(base + ".qweight")
        need = [base + p for p in (".qzeros", ".scales")]
        missing = [n for n in need if n not in self.tensor_names]
        if missing:
            raise LowbitError(f"{store.dir}: {base}.qweight has no {' / '.join(missing)}; the checkpoint is "
                              f"incomplete")
        if len(qw) != 2:
            raise LowbitError(f"{base}.qweight: shape {list(qw)} is not 2-D")
        if cfg.method == "gptq":
            self.n_in, self.n_out = qw[0] * 8, qw[1]
        else:
            self.n_in, self.n_out = qw[0], qw[1] * 8
        self.n_groups = self._check_shapes()
        self._cache: dict[str, Any] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_out, self.n_in)

    def with_row_order(self, rows: np.ndarray) -> "PackedLinear":
        """The same linear with its output rows taken in this order (GGUF row r = checkpoint row rows[r])."""
        rows = np.asarray(rows, dtype=np.int64)
        if sorted(rows.tolist()) != list(range(self.n_out)):
            raise LowbitError(f"{self.base}: a row order must be a permutation of its {self.n_out} rows")
        return PackedLinear(self.store, self.cfg, self.base, self.tensor_names, rows)

    def _check_shapes(self) -> int:
        s = self.store.shape(self.base + ".scales")
        z = self.store.shape(self.base + ".qzeros")
        if len(s) != 2 or s[1] != self.n_out or s[0] < 1:
            raise LowbitError(f"{self.base}.scales: shape {list(s)}, expected [groups, {self.n_out}]")
        if tuple(z) != (s[0], -(-self.n_out // 8)):
            raise LowbitError(f"{self.base}.qzeros: shape {list(z)}, expected [{s[0]}, {-(-self.n_out // 8)}]")
        g = self.cfg.group_size
        want = 1 if g == -1 else -(-self.n_in // g)
        if self.base + ".g_idx" in self.tensor_names:
            gi = self.store.shape(self.base + ".g_idx")
            if tuple(gi) != (self.n_in,):
                raise LowbitError(f"{self.base}.g_idx: shape {list(gi)}, expected [{self.n_in}]")
        elif s[0] != want:
            raise LowbitError(f"{self.base}.scales: {s[0]} groups, but {self.n_in} inputs in groups of "
                              f"{g} make {want}")
        return int(s[0])

    # ---- the stored parts, unpacked to [in, out] / [groups, out] ----

    def _codes(self) -> np.ndarray:
        """The 4-bit codes, [out, in] uint8 (checkpoint row order)."""
        nib = _nibbles(self.store.load_raw(self.base + ".qweight"))
        if self.cfg.method == "gptq":   # [in/8, out, 8]: input row 8w + k is nibble k
            codes = nib.transpose(0, 2, 1).reshape(self.n_in, self.n_out)
        else:                           # [in, out/8, 8]: output column 8w + AWQ_ORDER[k] is nibble k
            codes = np.empty_like(nib)
            codes[..., list(AWQ_ORDER)] = nib
            codes = codes.reshape(self.n_in, self.n_out)
        return np.ascontiguousarray(codes.T)

    def _zeros(self) -> np.ndarray:
        """Zero points z per group and output column, [groups, out] float32."""
        nib = _nibbles(self.store.load_raw(self.base + ".qzeros"))
        if self.cfg.method == "awq":
            z = np.empty_like(nib)
            z[..., list(AWQ_ORDER)] = nib
            nib = z
        z = nib.reshape(self.n_groups, -1)[:, :self.n_out].astype(np.float32)
        return z + np.float32(self.cfg.zero_offset)

    def _scales(self) -> np.ndarray:
        return self.store.load(self.base + ".scales").reshape(self.n_groups, self.n_out)

    def _group_of_input(self) -> np.ndarray:
        """g_idx: the group of each input row."""
        name = self.base + ".g_idx"
        if name in self.tensor_names:
            g = self.store.load_raw(name).astype(np.int64).reshape(-1)
        elif self.cfg.group_size == -1:
            g = np.zeros(self.n_in, dtype=np.int64)
        else:
            g = np.arange(self.n_in, dtype=np.int64) // self.cfg.group_size
        if g.size and (g.min() < 0 or g.max() >= self.n_groups):
            raise LowbitError(f"{name}: group indices must lie in 0..{self.n_groups - 1}")
        return g

    def _rows(self, x: np.ndarray) -> np.ndarray:
        return x if self.row_order is None else x[self.row_order]

    def __call__(self) -> np.ndarray:
        """w[o, i] = s[g(i), o] * (q[o, i] - z[g(i), o]), float32 [out, in] in GGUF row order."""
        g = self._group_of_input()
        s, z = self._scales()[g].T, self._zeros()[g].T   # [out, in]
        w = s * (self._codes().astype(np.float32) - z)
        return np.ascontiguousarray(self._rows(w), dtype=np.float32)

    # ---- Q4_0 / Q4_1 ----

    def mapping_problem(self) -> Optional[str]:
        """Why the codes cannot go into Q4 blocks unchanged, None where they can."""
        if "problem" not in self._cache:
            self._cache["problem"] = self._find_problem()
        return self._cache["problem"]

    def _find_problem(self) -> Optional[str]:
        if self.n_in % GGUF_BLOCK:
            return f"its {self.n_in} inputs are not a multiple of GGUF's blocks of {GGUF_BLOCK}"
        g = self._group_of_input().reshape(-1, GGUF_BLOCK)
        if np.any(g != g[:, :1]):
            if self.cfg.group_size != -1 and self.cfg.group_size % GGUF_BLOCK:
                return (f"group_size {self.cfg.group_size} is not a multiple of {GGUF_BLOCK}, so a GGUF block of "
                        f"{GGUF_BLOCK} inputs would need two scales")
            return (f"its g_idx puts inputs of one GGUF block of {GGUF_BLOCK} in different groups (act-order / "
                    f"desc_act); re-quantize with desc_act=false (or static groups)")
        s = self._scales()
        if not np.all(np.isfinite(s)) or np.any(s.astype(np.float16).astype(np.float32) != s):
            return "its scales are not all fp16 values"
        return None

    def native(self) -> QType:
        """Q4_0 where every zero point is 8, else Q4_1 (mapping_problem() must be None)."""
        if "native" not in self._cache:
            self._cache["native"] = QType.Q4_0 if bool(np.all(self._zeros() == 8)) else QType.Q4_1
        return self._cache["native"]

    def blocks(self) -> np.ndarray:
        """The tensor's bytes in native(): per GGUF row (output), per 32 inputs, d = s (and m = -s z as fp16)
        and the codes unchanged, element j of a block in the low nibble of byte j, element j + 16 in its
        high nibble."""
        problem = self.mapping_problem()
        if problem is not None:
            raise LowbitError(f"{self.base}: {problem}")
        nb = self.n_in // GGUF_BLOCK
        bg = self._group_of_input()[::GGUF_BLOCK]                        # group of each block
        s = self._rows(self._scales()[bg].T)                            # [out, nb]
        codes = self._rows(self._codes()).reshape(self.n_out, nb, GGUF_BLOCK)
        qs = codes[..., :16] | (codes[..., 16:] << 4)
        if self.native() == QType.Q4_0:
            out = np.empty((self.n_out, nb), dtype=_Q4_0)
        else:
            out = np.empty((self.n_out, nb), dtype=_Q4_1)
            m = -(s * self._rows(self._zeros()[bg].T))                  # exact in float32
            m16 = m.astype(np.float16)
            if not np.all(np.isfinite(m16)):
                raise LowbitError(f"{self.base}: a block minimum -s*z overflows fp16")
            out["m"] = m16
        out["d"] = s.astype(np.float16)
        out["qs"] = qs
        return out.reshape(-1).view(np.uint8)


def packed_linears(store: TensorStore, cfg: PrequantConfig) -> dict[str, PackedLinear]:
    """Every packed linear of the checkpoint, by its HF name without the suffix ("model.layers.0.mlp.up_proj")."""
    present = set(store.names())
    return {n[:-len(".qweight")]: PackedLinear(store, cfg, n[:-len(".qweight")], present)
            for n in store.names() if n.endswith(".qweight")}


def is_float(qtype: Union[QType, int]) -> bool:
    return int(qtype) in {int(t) for t in FLOAT_TYPES}


def place(name: str, planned: Union[QType, int], load: Callable[[], np.ndarray], out: OutType,
          rules: Sequence[KeepRule] = ()) -> tuple[Union[QType, int], Callable[[], np.ndarray], bool]:
    """How the converter writes one tensor: (type, loader, copy), as core.Planned takes them. Tensors other
    than packed linears keep the plan's type and are encoded from float32. A packed linear:

    - with a float file type (f32/f16/bf16) is dequantized and written in the planned type;
    - with a --keep rule naming it is written in the rule's type: its own blocks where that is native(),
      otherwise dequantized and encoded again (re-rounded, with a warning);
    - otherwise is written as its own Q4_0/Q4_1 blocks (whatever the file type would pick: re-rounding the
      codes only loses), or, where they cannot hold it exactly, is a LowbitError.
    """
    if not isinstance(load, PackedLinear):
        return planned, load, False
    what = f"{name} ({load.cfg.label} {load.base})"
    if any(r.matches(name) for r in rules):
        if load.mapping_problem() is None and int(planned) == int(load.native()):
            return load.native(), load.blocks, True
        if not is_float(planned):
            log.warning("%s: --keep gives it %s, so its codes are dequantized and quantized again", what,
                        type_name(int(planned)))
        return planned, load, False
    if out.base in FLOAT_TYPES:
        return planned, load, False
    problem = load.mapping_problem()
    if problem is not None:
        raise LowbitError(f"{what}: {problem}; GGUF's Q4_0/Q4_1 blocks cannot hold it exactly. To convert "
                          f"it anyway, {_DEQUANT_HINT}")
    native = load.native()
    if int(native) != int(planned):
        log.debug("%s: written as %s from its own codes (the file type %s gives %s)", what, native.name, out.name,
                  type_name(int(planned)))
    return native, load.blocks, True
