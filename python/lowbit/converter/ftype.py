"""llama-quantize's file types (Q4_K_M, Q5_0, IQ4_XS, ...) and the ggml type each tensor gets under one of them.

A llama.cpp "file type" (LLAMA_FTYPE_*, written to general.file_type) is not one tensor type but a recipe:
a base type plus per-tensor promotions (output and tied embeddings to Q6_K, more bits for attn_v/ffn_down
on some layers in the _M/_L mixes) and per-tensor fallbacks when a row length does not fit the block size.
`tensor_types` reproduces that recipe for LLaMA-family tensor names; tests/data/ftype/ holds the types that
llama.cpp's own quantizer chose on small models (recorded by tests/data/ftype/make_ftype_maps.py) and
tests/test_ftype.py checks this module against every one of them.

Shapes are in ggml order throughout: shape[0] is the row length (ne[0], the contiguous dimension), so a
numpy array `w` of shape (n_out, n_in) is described by `tuple(reversed(w.shape))` == (n_in, n_out).

    from lowbit.converter.ftype import ModelFacts, tensor_types
    types = tensor_types({"token_embd.weight": (576, 49152), "blk.0.attn_v.weight": (576, 192), ...},
                         ModelFacts(n_layer=30, n_head=9, n_head_kv=3), "q4_k_m")
    types["token_embd.weight"]   # "Q8_0": tied embedding -> Q6_K, but 576 is not a multiple of 256
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

__all__ = ["FileType", "FILE_TYPES", "GGMLType", "GGML_TYPES", "ModelFacts", "TensorSpec", "tensor_types",
           "is_quantizable", "file_type_id", "file_type_table", "fallback_type", "block_size", "uses_more_bits"]

QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    name: str        # ggml_type_name(), e.g. "Q4_K"
    type_id: int     # enum ggml_type value, the id stored per tensor in a GGUF file
    block_size: int  # weights per block (1 for the float types)


# Only the types a file type below can produce (directly, by promotion or by fallback).
GGML_TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("F32", 0, 1), GGMLType("F16", 1, 1), GGMLType("BF16", 30, 1),
    GGMLType("Q4_0", 2, 32), GGMLType("Q4_1", 3, 32), GGMLType("Q5_0", 6, 32), GGMLType("Q5_1", 7, 32),
    GGMLType("Q8_0", 8, 32), GGMLType("IQ4_NL", 20, 32),
    GGMLType("Q2_K", 10, QK_K), GGMLType("Q3_K", 11, QK_K), GGMLType("Q4_K", 12, QK_K),
    GGMLType("Q5_K", 13, QK_K), GGMLType("Q6_K", 14, QK_K), GGMLType("IQ4_XS", 23, QK_K),
)}

_FLOAT_TYPES = ("F32", "F16", "BF16")


def block_size(type_name: str) -> int:
    try:
        return GGML_TYPES[type_name].block_size
    except KeyError:
        raise ValueError(f"unknown ggml type {type_name!r}; use one of {', '.join(GGML_TYPES)}") from None


@dataclass(frozen=True)
class FileType:
    name: str         # user-facing name, lower case as lowbit's CLI takes it: "q4_k_m"
    ftype_id: int     # LLAMA_FTYPE_* (include/llama.h), the value of general.file_type
    base_type: str    # ggml type of the tensors no rule promotes: "Q4_K"
    description: str  # one line for --help


FILE_TYPES: dict[str, FileType] = {ft.name: ft for ft in (
    FileType("f32", 0, "F32", "32-bit float, no quantization"),
    FileType("f16", 1, "F16", "16-bit float (norms stay F32)"),
    FileType("bf16", 32, "BF16", "bfloat16 (norms stay F32)"),
    FileType("q4_0", 2, "Q4_0", "4.5 bpw: 4-bit, one scale per 32; output Q6_K"),
    FileType("q4_1", 3, "Q4_1", "5.0 bpw: 4-bit, scale and min per 32; output Q6_K"),
    FileType("q5_0", 8, "Q5_0", "5.5 bpw: 5-bit, one scale per 32; output Q6_K"),
    FileType("q5_1", 9, "Q5_1", "6.0 bpw: 5-bit, scale and min per 32; output Q6_K"),
    FileType("q8_0", 7, "Q8_0", "8.5 bpw: 8-bit, one scale per 32; nearly lossless"),
    FileType("q2_k", 10, "Q2_K", "~3.0 bpw mix: Q2_K (2.625 bpw), attn_v/ffn_down/attn_output Q3_K"),
    FileType("q3_k_s", 11, "Q3_K", "~3.4 bpw: Q3_K (3.4375 bpw) everywhere but the output"),
    FileType("q3_k_m", 12, "Q3_K", "~3.9 bpw mix: Q3_K, attn_v/ffn_down/attn_output Q4_K-Q5_K"),
    FileType("q3_k_l", 13, "Q3_K", "~4.2 bpw mix: Q3_K, attn_v/ffn_down/attn_output Q5_K"),
    FileType("q4_k_s", 14, "Q4_K", "~4.6 bpw: Q4_K (4.5 bpw), first layers' attn_v/ffn_down Q5_K"),
    FileType("q4_k_m", 15, "Q4_K", "~4.8 bpw mix: Q4_K, half of attn_v/ffn_down Q6_K (recommended)"),
    FileType("q5_k_s", 16, "Q5_K", "~5.5 bpw: Q5_K (5.5 bpw) everywhere but the output"),
    FileType("q5_k_m", 17, "Q5_K", "~5.7 bpw mix: Q5_K, half of attn_v/ffn_down Q6_K"),
    FileType("q6_k", 18, "Q6_K", "6.5625 bpw: Q6_K everywhere"),
    FileType("iq4_nl", 25, "IQ4_NL", "4.5 bpw: 4-bit non-linear grid, one scale per 32"),
    FileType("iq4_xs", 30, "IQ4_XS", "4.25 bpw: 4-bit non-linear grid, 6-bit scales per 32 in blocks of 256"),
)}

# A file that is all one ggml type: the file type id llama-quantize uses for that type's name (its "Q4_K"
# is an alias of Q4_K_M, "Q3_K" of Q3_K_M, "Q5_K" of Q5_K_M; tools/quantize/quantize.cpp).
_FILE_TYPE_OF_GGML_TYPE = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q4_0": "q4_0", "Q4_1": "q4_1",
                           "Q5_0": "q5_0", "Q5_1": "q5_1", "Q8_0": "q8_0", "Q2_K": "q2_k", "Q3_K": "q3_k_m",
                           "Q4_K": "q4_k_m", "Q5_K": "q5_k_m", "Q6_K": "q6_k", "IQ4_NL": "iq4_nl",
                           "IQ4_XS": "iq4_xs"}


def _file_type(name: Union[str, FileType]) -> FileType:
    if isinstance(name, FileType):
        return name
    ft = FILE_TYPES.get(str(name).lower())
    if ft is None:
        raise ValueError(f"unknown file type {name!r}; use one of {', '.join(FILE_TYPES)}")
    return ft


def file_type_id(name: str) -> int:
    """general.file_type for a file type name ("q4_k_m" -> 15) or for a file that is all of one ggml type
    ("Q4_K" -> 15, "Q6_K" -> 18, "F16" -> 1). Case-insensitive."""
    key = str(name).lower()
    if key in FILE_TYPES:
        return FILE_TYPES[key].ftype_id
    by_type = _FILE_TYPE_OF_GGML_TYPE.get(str(name).upper())
    if by_type is None:
        raise ValueError(f"no llama.cpp file type for {name!r}; use one of {', '.join(FILE_TYPES)} "
                         f"or a ggml type name ({', '.join(_FILE_TYPE_OF_GGML_TYPE)})")
    return FILE_TYPES[by_type].ftype_id


def file_type_table() -> str:
    """The file types as --help text, one per line: name, id, description."""
    return "\n".join(f"  {ft.name:<7} ({ft.ftype_id:2d})  {ft.description}" for ft in FILE_TYPES.values())


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's per-tensor rules read from the model besides tensor names and shapes.
    `tied`: the output projection is the token embedding (the file has no output.weight); None means
    "decide from the tensor list", which is what llama.cpp does."""
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    arch: str = "llama"
    tied: Optional[bool] = None

    @property
    def n_gqa(self) -> int:
        # integer ratio, as llama_hparams::n_gqa(); 0 when the kv head count is unknown
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        # llama.cpp's LLM_TYPE_70B (set per architecture in src/models/*.cpp); it alone gets an attn_v bump
        if self.arch == "llama":
            return self.n_expert != 8 and self.n_layer == 80 and self.n_head != self.n_head_kv
        if self.arch in ("qwen2", "olmo", "deci"):
            return self.n_layer == 80
        return False


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the input file. `shape` in ggml order (shape[0] = row length). `source_type` is the
    type it has in the input; a tensor that is not quantized (norms, 1-D) keeps it."""
    name: str
    shape: tuple[int, ...]
    source_type: str = "F32"


TensorList = Union[Sequence[TensorSpec], Mapping[str, Sequence[int]]]

_LAYER = re.compile(r"blk\.(\d+)\.")

# Substrings of 2-D weight names that llama.cpp never quantizes (small or index-like tensors of other
# families; listed so that a stray one in a LLaMA-style file is not quantized either).
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
                    "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd", ".rel_pos", ".patch_embd",
                    ".patch_merger", "time_mix_")


def _n_dims(shape: Sequence[int]) -> int:
    # ggml_n_dims: trailing dimensions of size 1 do not count
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return max(n, 1)


def is_quantizable(name: str, shape: Sequence[int]) -> bool:
    """Whether llama-quantize converts this tensor at all (the rest keep their input type)."""
    if _n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(s in name for s in _NEVER_QUANTIZED)


def _category(name: str) -> str:
    # the order matters: "attn_qkv" before "attn_v", the ffn_* substrings also match expert tensors
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


# attn_qkv and attn_kv_b hold V and are treated (and counted) like attn_v
_ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")


def uses_more_bits(i_layer: int, n_layer: int) -> bool:
    """The layers the _M mixes give more bits: the first and last eighth, and every third one between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


# Row length not a multiple of the chosen type's block: the type to use instead (then F16 if the row
# does not fit that either). A 32-block type has nothing smaller to fall back to and goes straight to F16.
_FALLBACK = {"IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
             "Q6_K": "Q8_0"}


def fallback_type(type_name: str, row_length: int) -> str:
    """The type a tensor with rows of `row_length` gets when `type_name` was chosen for it."""
    if row_length % block_size(type_name) == 0:
        return type_name
    fallback = _FALLBACK.get(type_name, type_name)
    return fallback if row_length % block_size(fallback) == 0 else "F16"


def _layer_of(name: str) -> int:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


class _Counters:
    """The running tensor counters of llama.cpp's quantizer: the attn_v rules use how many attn_v-like
    tensors came before, the ffn_* rules the index of the tensor among its kind (the layer, one per layer)."""

    def __init__(self, n_attention_wv: int, n_layer: int) -> None:
        self.n_attention_wv = n_attention_wv
        self.n_layer = n_layer
        self.i_attention_wv = 0
        self.i_ffn = {"ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}


def _promoted_type(base: str, name: str, row_length: int, cat: str, ft: FileType, facts: ModelFacts,
                   tied: bool, imatrix: bool, counters: _Counters) -> str:
    """The file type's mix rules for one quantized tensor (before the block-size fallback)."""
    f = ft.name
    gqa = facts.n_gqa

    if cat == "output" or (tied and cat == "token_embd"):
        if row_length % block_size(base) != 0:
            return "Q8_0"
        return base if base == "Q8_0" else "Q6_K"

    if cat == "token_embd":
        return base

    if cat in _ATTN_V_LIKE:
        i, n = counters.i_attention_wv, counters.n_attention_wv
        new = base
        if f == "q2_k":
            new = "Q4_K" if gqa >= 4 else "Q3_K"
        elif f == "q3_k_m":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif f == "q3_k_l":
            new = "Q5_K"
        elif f in ("iq4_nl", "iq4_xs") and gqa >= 4:
            new = "Q5_K"
        elif f in ("q4_k_m", "q5_k_m") and uses_more_bits(i, n):
            new = "Q6_K"
        elif f == "q4_k_s" and i < 4:
            new = "Q5_K"
        if facts.is_70b and new in ("Q3_K", "Q4_K"):
            # 70B shares one attn_v among 8 heads: a small tensor, so more bits cost little
            new = "Q5_K"
        if facts.n_expert == 8:
            new = "Q8_0"
        counters.i_attention_wv += 1
        return new

    if cat == "attn_k":
        return "Q8_0" if facts.n_expert == 8 else base

    if cat in ("ffn_down", "ffn_gate", "ffn_up"):
        i_layer, n_layer = counters.i_ffn[cat], counters.n_layer
        if facts.n_expert > 1:
            # expert tensors are not stored in layer order: take the layer from the name
            i_layer = _layer_of(name)
            if not 0 <= i_layer < n_layer:
                raise ValueError(f"cannot tell the layer of {name!r} (n_layer {n_layer}); "
                                 "expert tensors must be named blk.N.*")
        counters.i_ffn[cat] += 1
        if cat != "ffn_down":
            return base
        if f == "q2_k":
            return "Q3_K"
        if f == "q3_k_m":
            return "Q5_K" if i_layer < n_layer // 16 else "Q4_K"
        if f == "q3_k_l":
            return "Q5_K"
        if f == "q4_k_m":
            return "Q6_K" if uses_more_bits(i_layer, n_layer) else base
        if i_layer < n_layer // 8 and f in ("iq4_nl", "iq4_xs") and not imatrix:
            return "Q5_K"
        if f == "q5_k_m":
            return "Q6_K" if uses_more_bits(i_layer, n_layer) else base
        if f == "q4_k_s" and i_layer < n_layer // 8:
            return "Q5_K"
        if f in ("q4_0", "q5_0") and imatrix and i_layer < n_layer // 8:
            # with an importance matrix the first ffn_down layers get the variant with a min
            return "Q4_1" if f == "q4_0" else "Q5_1"
        return base

    if cat == "attn_output":
        if facts.n_expert == 8:
            bumped = ("q2_k", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq4_xs")
            return "Q5_K" if f in bumped else base
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(f, base)

    return base


def _as_specs(tensors: TensorList) -> list[TensorSpec]:
    if isinstance(tensors, Mapping):
        return [TensorSpec(name, tuple(int(d) for d in shape)) for name, shape in tensors.items()]
    return list(tensors)


def tensor_types(tensors: TensorList, facts: ModelFacts, file_type: Union[str, FileType], *,
                 pure: bool = False, imatrix: bool = False) -> dict[str, str]:
    """The ggml type name llama-quantize gives every tensor under `file_type` ("q4_k_m", ...).

    `tensors`: TensorSpec items, or {name: shape} (shapes in ggml order; such tensors are taken to be F32
    where they stay unquantized). `pure`: the base type on every quantized tensor (llama-quantize --pure),
    still with the block-size fallback. `imatrix`: whether an importance matrix is used (it changes the
    first ffn_down layers of IQ4_NL/IQ4_XS/Q4_0/Q5_0 files). Returns {name: type name} in input order.
    """
    ft = _file_type(file_type)
    if facts.arch == "falcon":
        raise ValueError("Falcon's own quantization rules are not modelled here; use a LLaMA-family model")
    specs = _as_specs(tensors)
    names = [t.name for t in specs]
    if len(set(names)) != len(names):
        raise ValueError("tensor names must be unique")

    tied = facts.tied if facts.tied is not None else "output.weight" not in names
    n_attention_wv = sum(1 for t in specs if _category(t.name) in _ATTN_V_LIKE)
    counters = _Counters(n_attention_wv, facts.n_layer)
    base = ft.base_type
    quantized_file = base not in _FLOAT_TYPES

    # llama.cpp walks the tensors sorted by layer (non-layer tensors first), then by name; the counters
    # above depend on that order
    order = sorted(specs, key=lambda t: (_layer_of(t.name), t.name))
    result: dict[str, str] = {}
    for t in order:
        if not t.shape or any(d <= 0 for d in t.shape):
            raise ValueError(f"tensor {t.name!r} has shape {t.shape}; give positive sizes in ggml order")
        if not is_quantizable(t.name, t.shape):
            result[t.name] = t.source_type
            continue
        if not quantized_file:
            result[t.name] = base
            continue
        row_length = t.shape[0]
        new = base if pure else _promoted_type(base, t.name, row_length, _category(t.name), ft, facts, tied,
                                               imatrix, counters)
        result[t.name] = fallback_type(new, row_length)
    return {name: result[name] for name in names}
