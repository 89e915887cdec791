"""The conversion pipeline: HF checkpoint -> GGUF (streamed tensor by tensor, atomic), and GGUF requantization."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Union

import numpy as np

from .._core import LowbitError
from ..quants import QType
from .hf import Checkpoint, LlamaParams, iter_tensors
from .metadata import KV, VT
from .plan import FILE_TYPE, KeepSpec, choose_type, encode, parse_keep, parse_type
from .vocab import tokenizer_metadata

log = logging.getLogger("lowbit.convert")

PathLike = Union[str, Path]
QUANTIZATION_VERSION = 2  # GGML_QUANT_VERSION (reference §1.3)


def model_metadata(p: LlamaParams, file_type: int) -> list[KV]:
    """general.* and llama.* keys, typed as llama.cpp's gguf-py writes them (reference §1.2, §1.5)."""
    kvs = [
        KV.str("general.architecture", "llama"),
        KV.str("general.name", p.name),
        KV.u32("llama.context_length", p.n_ctx),
        KV.u32("llama.embedding_length", p.n_embd),
        KV.u32("llama.block_count", p.n_layer),
        KV.u32("llama.feed_forward_length", p.n_ff),
        KV.u32("llama.rope.dimension_count", p.head_dim),
        KV.u32("llama.attention.head_count", p.n_head),
        KV.u32("llama.attention.head_count_kv", p.n_head_kv),
        KV.f32("llama.attention.layer_norm_rms_epsilon", p.rms_eps),
        KV.f32("llama.rope.freq_base", p.rope_theta),
        KV.u32("llama.vocab_size", p.n_vocab),
    ]
    if p.head_dim != p.n_embd // p.n_head:
        kvs += [KV.u32("llama.attention.key_length", p.head_dim), KV.u32("llama.attention.value_length", p.head_dim)]
    if p.rope_scaling_type == "linear":
        kvs += [KV.str("llama.rope.scaling.type", "linear"), KV.f32("llama.rope.scaling.factor", p.rope_scaling_factor)]
    kvs += [KV.u32("general.file_type", file_type), KV.u32("general.quantization_version", QUANTIZATION_VERSION)]
    return kvs


def _open_writer(out_path: Path):
    from ..gguf import GGUFWriter

    return GGUFWriter(out_path)


def _add_kv(writer, kv: KV) -> None:
    from ..gguf import GGUFValueType

    if kv.type == VT.ARRAY:
        writer.add_metadata(kv.key, kv.value, GGUFValueType.ARRAY, GGUFValueType(int(kv.elem_type)))
    elif kv.type is None:
        writer.add_metadata(kv.key, kv.value)  # a GGUFField copied with its exact types
    else:
        writer.add_metadata(kv.key, kv.value, GGUFValueType(int(kv.type)))


def _check_output(out_path: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    if out_path.exists() and not force:
        raise LowbitError(f"{out_path} already exists; pass force=True (--force) to overwrite it")
    for src in inputs:
        if src.exists() and out_path.exists() and out_path.resolve() == src.resolve():
            raise LowbitError(f"{out_path}: the output would overwrite the input; choose another output path")
    if not out_path.parent.is_dir():
        raise LowbitError(f"{out_path.parent}: the output directory does not exist")


def _write(out_path: Path, kvs: list[KV], tensors: list[tuple[str, tuple[int, ...], QType, Callable[[], np.ndarray]]],
           progress: bool, desc: str) -> None:
    """Declare everything, then stream each tensor's bytes; the writer renames its temp file onto out_path
    only in finish(), so a failure (or Ctrl-C) anywhere leaves nothing under out_path."""
    from tqdm.auto import tqdm

    writer = _open_writer(out_path)
    try:
        for kv in kvs:
            _add_kv(writer, kv)
        for name, shape, qtype, _ in tensors:
            writer.add_tensor_info(name, shape, qtype)
        writer.write_header()
        total = sum(int(np.prod(s)) for _, s, _, _ in tensors)
        with tqdm(total=total, unit="w", unit_scale=True, desc=desc, disable=not progress, leave=False) as bar:
            for name, shape, qtype, load in tensors:
                x = load()
                if tuple(x.shape) != tuple(shape):
                    raise LowbitError(f"tensor {name}: has shape {list(x.shape)}, expected {list(shape)}")
                writer.write_tensor_data(encode(x, qtype))
                del x
                bar.update(int(np.prod(shape)))
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def _check_shapes(p: LlamaParams, name: str, shape: tuple[int, ...]) -> None:
    q_rows, kv_rows = p.n_head * p.head_dim, p.n_head_kv * p.head_dim
    want = {"attn_q": (q_rows, p.n_embd), "attn_k": (kv_rows, p.n_embd), "attn_v": (kv_rows, p.n_embd),
            "attn_output": (p.n_embd, q_rows), "ffn_gate": (p.n_ff, p.n_embd), "ffn_up": (p.n_ff, p.n_embd),
            "ffn_down": (p.n_embd, p.n_ff), "attn_norm": (p.n_embd,), "ffn_norm": (p.n_embd,)}
    key = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]
    expected = {"token_embd": (p.n_vocab, p.n_embd), "output": (p.n_vocab, p.n_embd),
                "output_norm": (p.n_embd,)}.get(key, want.get(key))
    if expected is not None and tuple(shape) != expected:
        raise LowbitError(f"tensor {name}: shape {list(shape)} does not match config.json (expected "
                          f"{list(expected)}); the config and the weights disagree")


def convert(hf_dir: PathLike, out_path: PathLike, outtype: Union[str, QType] = "f16", keep: KeepSpec = None,
            force: bool = False, progress: bool = True) -> Path:
    """Convert a Hugging Face LLaMA checkpoint directory to one GGUF file; returns the output path.

    outtype: f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 | nf4 | nf4_dq, for every 2-D tensor (token_embd and output
    included); norms stay F32. keep: per-tensor overrides, {"output": "q8_0"} or ["blk.*.ffn_down*=q8_0"].
    Rows whose length is not a multiple of the type's block size are written F16. The file is written to
    a temporary name and renamed at the end; an existing out_path is an error unless force=True.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if not hf_dir.is_dir():
        raise LowbitError(f"{hf_dir}: not a directory; give a Hugging Face checkpoint directory")
    qout = parse_type(outtype)
    rules = parse_keep(keep)
    _check_output(out_path, force)
    params = LlamaParams.from_dir(hf_dir)
    ckpt = Checkpoint(hf_dir)

    tensors = []
    for name, shape, load in iter_tensors(ckpt, params):
        _check_shapes(params, name, shape)
        qtype = choose_type(name, shape, qout, rules)
        if len(shape) > 1 and qtype != qout and not any(r.matches(name) for r in rules):
            log.info("%s: row length %d is not a multiple of %s's block; written as %s", name, shape[-1],
                     qout.name, qtype.name)
        tensors.append((name, shape, qtype, load))
    kvs = model_metadata(params, FILE_TYPE[qout]) + tokenizer_metadata(hf_dir, params.n_vocab)
    t0 = time.perf_counter()
    _write(out_path, kvs, tensors, progress, f"convert -> {qout.name}")
    log.info("wrote %s (%d tensors, %.1f MiB) in %.1f s", out_path, len(tensors),
             out_path.stat().st_size / 2**20, time.perf_counter() - t0)
    return out_path


# ---- requantize --------------------------------------------------------------------------------------


def quantize_file(in_gguf: PathLike, out_gguf: PathLike, qtype: Union[str, QType], keep: KeepSpec = None,
                  force: bool = False, progress: bool = True) -> Path:
    """Requantize a GGUF (lowbit's or llama.cpp's): every tensor is dequantized and written in qtype, norms
    (1-D tensors) as F32, --keep rules as for convert(). Metadata and tokenizer keys are copied with their
    types; general.file_type is updated. Returns the output path."""
    from ..gguf import GGUFFile

    in_gguf, out_gguf = Path(in_gguf), Path(out_gguf)
    qout = parse_type(qtype)
    rules = parse_keep(keep)
    if not in_gguf.is_file():
        raise FileNotFoundError(f"{in_gguf}: no such GGUF file")
    _check_output(out_gguf, force, [in_gguf])
    src = GGUFFile(in_gguf)
    kvs: list[KV] = []
    for key in src.metadata:
        if key == "general.alignment":
            continue  # the writer sets it
        if key == "general.file_type":
            kvs.append(KV.u32(key, FILE_TYPE[qout]))
        elif key == "general.quantization_version":
            kvs.append(KV.u32(key, QUANTIZATION_VERSION))
        else:
            kvs.append(KV(key, src.field(key), None))  # copied with its exact GGUF types
    if "general.file_type" not in src.metadata:
        kvs.append(KV.u32("general.file_type", FILE_TYPE[qout]))
    if "general.quantization_version" not in src.metadata:
        kvs.append(KV.u32("general.quantization_version", QUANTIZATION_VERSION))
    tensors = []
    for t in src.tensors:
        shape = tuple(int(d) for d in t.shape)
        tensors.append((t.name, shape, choose_type(t.name, shape, qout, rules), t.to_numpy))
    _write(out_gguf, kvs, tensors, progress, f"quantize -> {qout.name}")
    return out_gguf

