"""Record the tensor types llama.cpp's own quantizer picks for each file type (tests/data/ftype/*.json).

Needs llama-cpp-python (its llama_model_quantize runs llama.cpp's quantizer in-process) plus numpy and gguf:

    python3 -m venv /tmp/lcpp && /tmp/lcpp/bin/pip install numpy gguf llama-cpp-python
    /tmp/lcpp/bin/python tests/data/ftype/make_ftype_maps.py

For every model shape below it writes a small F16 GGUF file (llama architecture, random weights, a tiny
gpt2-style tokenizer), quantizes it to every file type of lowbit.converter.ftype, and stores what came out:

    <shape>_<ftype>.json        {tensor name: ggml type name}
    <shape>_<ftype>_pure.json   the same with llama-quantize --pure (only for shapes with fallbacks)
    shapes.json                 per shape: the model facts and every tensor's ggml-order shape and input type
    file_types.json             {ftype: general.file_type written by llama.cpp}

tests/test_ftype.py checks lowbit.converter.ftype against these files; it does not need llama.cpp.
"""
from __future__ import annotations

import ctypes
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

HERE = Path(__file__).resolve().parent

# name -> LLAMA_FTYPE id (include/llama.h); the same list as lowbit.converter.ftype.FILE_TYPES
FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q8_0": 7, "q2_k": 10,
              "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17,
              "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30}


@dataclass
class Shape:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int = 1024
    tied: bool = False
    fused_qkv: bool = False    # one attn_qkv per layer instead of attn_q/k/v
    extra_norms: bool = False  # qwen3/gemma-style attn_q_norm, attn_k_norm, post_attention_norm, post_ffw_norm
    record_pure: bool = False
    notes: str = field(default="")


SHAPES = [
    Shape("tied576", 8, 576, 9, 3, 1536, tied=True, record_pure=True,
          notes="SmolLM2-like: rows of 576 (not a multiple of 256), tied embedding, GQA 3"),
    Shape("untied512", 8, 512, 8, 4, 1536, extra_norms=True,
          notes="rows of 512 and 1536 (multiples of 256), untied output, GQA 2, extra 1-D norms"),
    Shape("gqa4", 16, 256, 8, 2, 704, record_pure=True,
          notes="GQA 4, 16 layers, ffn_down rows of 704 (a multiple of 32, not of 256)"),
    Shape("fusedqkv", 8, 512, 8, 8, 1536, fused_qkv=True,
          notes="fused attn_qkv, no GQA, untied output"),
    Shape("odd200", 2, 200, 5, 5, 544, record_pure=True,
          notes="rows of 200 (not a multiple of 32): F16 fallbacks; ffn_down rows of 544"),
]


def tensor_shapes(s: Shape) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model, ggml order (row length first)."""
    head_dim = s.n_embd // s.n_head
    kv = head_dim * s.n_head_kv
    t: dict[str, tuple[int, ...]] = {"token_embd.weight": (s.n_embd, s.n_vocab), "output_norm.weight": (s.n_embd,)}
    if not s.tied:
        t["output.weight"] = (s.n_embd, s.n_vocab)
    for i in range(s.n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (s.n_embd,)
        if s.fused_qkv:
            t[p + "attn_qkv.weight"] = (s.n_embd, s.n_embd + 2 * kv)
        else:
            t[p + "attn_q.weight"] = (s.n_embd, s.n_embd)
            t[p + "attn_k.weight"] = (s.n_embd, kv)
            t[p + "attn_v.weight"] = (s.n_embd, kv)
        t[p + "attn_output.weight"] = (s.n_embd, s.n_embd)
        t[p + "ffn_norm.weight"] = (s.n_embd,)
        t[p + "ffn_gate.weight"] = (s.n_embd, s.n_ff)
        t[p + "ffn_up.weight"] = (s.n_embd, s.n_ff)
        t[p + "ffn_down.weight"] = (s.n_ff, s.n_embd)
        if s.extra_norms:
            t[p + "attn_q_norm.weight"] = (head_dim,)
            t[p + "attn_k_norm.weight"] = (head_dim,)
            t[p + "post_attention_norm.weight"] = (s.n_embd,)
            t[p + "post_ffw_norm.weight"] = (s.n_embd,)
    return t


def gpt2_vocab(n_vocab: int) -> tuple[list[str], list[str]]:
    """256 byte tokens (GPT-2's byte-to-unicode map) plus merges of pairs until n_vocab tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    tokens, merges, seen = list(chars), [], set(chars)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    for a in letters:
        for b in letters:
            if len(tokens) == n_vocab:
                return tokens, merges
            if a + b not in seen:
                tokens.append(a + b)
                merges.append(f"{a} {b}")
                seen.add(a + b)
    for a in letters:
        for b in letters:
            for c in letters:
                if len(tokens) == n_vocab:
                    return tokens, merges
                tokens.append(a + b + c)
                merges.append(f"{a}{b} {c}")
    raise ValueError("vocab too large for this generator")


def write_f16_gguf(path: Path, s: Shape, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"ftype-{s.name}")
    w.add_context_length(256)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_dimension_count(s.n_embd // s.n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)
    tokens, merges = gpt2_vocab(s.n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for name, shape in shapes.items():
        numpy_shape = tuple(reversed(shape))
        if len(shape) == 1:
            w.add_tensor(name, np.ones(numpy_shape, dtype=np.float32))
        else:
            w.add_tensor(name, (rng.standard_normal(numpy_shape) * 0.02).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src: Path, dst: Path, ftype_id: int, pure: bool) -> tuple[dict[str, str], int]:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_id
    params.pure = pure
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {src.name} ftype {ftype_id} pure={pure}")
    reader = gguf.GGUFReader(str(dst))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    file_type = int(reader.fields["general.file_type"].parts[-1][0])
    return types, file_type


def main() -> int:
    shapes_out, file_types_out = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, s in enumerate(SHAPES):
            shapes = tensor_shapes(s)
            src = Path(tmp) / f"{s.name}-input.gguf"
            write_f16_gguf(src, s, shapes, seed=k)
            shapes_out[s.name] = {
                "facts": {"n_layer": s.n_layer, "n_head": s.n_head, "n_head_kv": s.n_head_kv, "n_expert": 0},
                "notes": s.notes,
                "tensors": {n: {"shape": list(sh), "type": "F32" if len(sh) == 1 else "F16"}
                            for n, sh in shapes.items()},
            }
            for ftype, ftype_id in FILE_TYPES.items():
                for pure in (False, True) if s.record_pure else (False,):
                    dst = Path(tmp) / f"{s.name}-{ftype}{'-pure' if pure else ''}.gguf"
                    types, written = quantize(src, dst, ftype_id, pure)
                    dst.unlink()
                    if set(types) != set(shapes):
                        raise RuntimeError(f"{dst.name}: tensor list changed")
                    file_types_out[ftype] = written
                    out = HERE / f"{s.name}_{ftype}{'_pure' if pure else ''}.json"
                    out.write_text(json.dumps({n: types[n] for n in shapes}, indent=1) + "\n")
                    print(out.name, dict(sorted(_count(types).items())))
    (HERE / "shapes.json").write_text(json.dumps(shapes_out, indent=1) + "\n")
    (HERE / "file_types.json").write_text(json.dumps(file_types_out, indent=1) + "\n")
    return 0


def _count(types: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main())
