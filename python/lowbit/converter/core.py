"""The conversion pipeline: HF checkpoint -> GGUF (streamed tensor by tensor, atomic), and GGUF (re)quantization."""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import numpy as np

from .._core import LowbitError
from ..quants import QType, type_info
from .ftype import ModelFacts
from .hf import QUANTIZATION_VERSION, Checkpoint, LlamaParams, iter_tensors, model_metadata, tensor_shape
from .metadata import KV, VT
from .prequant import place
from .plan import KeepSpec, OutType, TensorIn, encode, parse_keep, parse_outtype, plan_types, type_name
from .vocab import tokenizer_metadata

log = logging.getLogger("lowbit.convert")

PathLike = Union[str, Path]


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


class Planned(NamedTuple):
    """One output tensor: numpy shape, output type, and its loader: float32 values to encode, or (copy=True)
    the input's bytes, written unchanged; values: for a copied tensor lowbit can decode, its float32 values
    (for a step that must change it, such as AWQ's folding into the norms)."""

    name: str
    shape: tuple[int, ...]
    qtype: Union[QType, int]
    load: Callable[[], np.ndarray]
    copy: bool = False
    values: Optional[Callable[[], np.ndarray]] = None


def _write(out_path: Path, kvs: list[KV], tensors: list[Planned], progress: bool, desc: str) -> None:
    """Declare everything, then stream each tensor's bytes; the writer renames its temp file onto out_path
    only in finish(), so a failure (or Ctrl-C) anywhere leaves nothing under out_path."""
    from tqdm.auto import tqdm

    writer = _open_writer(out_path)
    try:
        for kv in kvs:
            _add_kv(writer, kv)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, t.qtype)
        writer.write_header()
        total = sum(int(np.prod(t.shape)) for t in tensors)
        with tqdm(total=total, unit="w", unit_scale=True, desc=desc, disable=not progress, leave=False) as bar:
            for t in tensors:
                x = t.load()
                if t.copy:
                    writer.write_tensor_data(x)
                else:
                    if tuple(x.shape) != tuple(t.shape):
                        raise LowbitError(f"tensor {t.name}: has shape {list(x.shape)}, expected {list(t.shape)}")
                    writer.write_tensor_data(encode(x, t.qtype))
                del x
                bar.update(int(np.prod(t.shape)))
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def _type_mix(tensors: Iterable[Planned]) -> str:
    """Tensors per output type, most first: "Q4_K 49, Q6_K 9, F32 17"."""
    counts: dict[str, int] = {}
    for t in tensors:
        name = type_name(int(t.qtype))
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def _check_shapes(p: LlamaParams, name: str, shape: tuple[int, ...]) -> None:
    expected = tensor_shape(p, name)
    if expected is not None and tuple(shape) != expected:
        raise LowbitError(f"tensor {name}: shape {list(shape)} does not match config.json (expected "
                          f"{list(expected)}); the config and the weights disagree")


def convert(hf_dir: PathLike, out_path: PathLike, outtype: Union[str, QType, OutType] = "f16", keep: KeepSpec = None,
            force: bool = False, progress: bool = True, pure: bool = False) -> Path:
    """Convert a Hugging Face LLaMA checkpoint directory to one GGUF file; returns the output path.

    outtype: a llama.cpp file type (f32, f16, bf16, q8_0, q4_0, q4_k_m, q6_k, iq4_xs, ...: plan.outtype_names())
    whose tensors get the types llama-quantize gives them (converter/ftype.py; pure=True: its --pure), or one
    of lowbit's own nf4 / nf4_dq / fp4, written on every matrix. Norms stay F32. keep: per-tensor overrides,
    {"output": "q8_0"} or ["blk.*.ffn_down*=q8_0"]. The file is written to a temporary name and renamed at
    the end; an existing out_path is an error unless force=True.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if not hf_dir.is_dir():
        raise LowbitError(f"{hf_dir}: not a directory; give a Hugging Face checkpoint directory")
    out = parse_outtype(outtype)
    rules = parse_keep(keep)
    _check_output(out_path, force)
    params = LlamaParams.from_dir(hf_dir)
    ckpt = Checkpoint(hf_dir)

    found = []
    for name, shape, load in iter_tensors(ckpt, params):
        _check_shapes(params, name, shape)
        found.append((name, tuple(shape), load))
    facts = ModelFacts(n_layer=params.n_layer, n_head=params.n_head, n_head_kv=params.n_head_kv,
                       arch=getattr(params, "gguf_arch", "llama"))
    types = plan_types([TensorIn(name, shape) for name, shape, _ in found], facts, out, rules, pure)
    tensors = [Planned(name, shape, *place(name, types[name], load, out, rules)) for name, shape, load in found]
    kvs = model_metadata(params, out.file_type_id) + tokenizer_metadata(hf_dir, params.n_vocab)
    t0 = time.perf_counter()
    _write(out_path, kvs, tensors, progress, f"convert -> {out.name}")
    log.info("wrote %s (%s; %d tensors: %s, %.1f MiB) in %.1f s", out_path, out.name, len(tensors),
             _type_mix(tensors), out_path.stat().st_size / 2**20, time.perf_counter() - t0)
    return out_path


# ---- quantize a GGUF ---------------------------------------------------------------------------------

_LAYER = re.compile(r"blk\.(\d+)\.")


def gguf_model_facts(metadata: dict[str, Any], tensor_names: Iterable[str]) -> ModelFacts:
    """What llama.cpp's per-tensor rules read from a GGUF's hyperparameters. A missing block count is taken
    from the blk.N tensor names; a per-layer head count array from its first layer, as llama.cpp's n_gqa()."""
    arch = str(metadata.get("general.architecture", "llama"))

    def number(key: str, default: int) -> int:
        v = metadata.get(f"{arch}.{key}", default)
        if isinstance(v, list):
            v = v[0] if v else default
        return int(v)

    layers = [int(m.group(1)) for m in map(_LAYER.match, tensor_names) if m]
    n_layer = number("block_count", 0) or (max(layers) + 1 if layers else 0)
    n_head = number("attention.head_count", 0)
    return ModelFacts(n_layer=n_layer, n_head=n_head, n_head_kv=number("attention.head_count_kv", n_head),
                      n_expert=number("expert_count", 0), arch=arch)


def _count_types(type_ids: Iterable[int]) -> str:
    counts: dict[str, int] = {}
    for tid in type_ids:
        counts[type_name(tid)] = counts.get(type_name(tid), 0) + 1
    return ", ".join(f"{k}: {v} tensors" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def quantize_file(in_gguf: PathLike, out_gguf: PathLike, qtype: Union[str, QType, OutType], keep: KeepSpec = None,
                  force: bool = False, progress: bool = True, pure: bool = False,
                  allow_requantize: bool = False, calibrate: Optional[PathLike] = None,
                  imatrix: Optional[PathLike] = None, calib_tokens: int = 32768, calib_ctx: int = 512,
                  method: str = "auto", save_imatrix: Optional[PathLike] = None,
                  memory_budget: Optional[int] = None, n_threads: Optional[int] = None,
                  stats=None) -> Path:
    """Quantize a GGUF (lowbit's or llama.cpp's) to a file type, as llama-quantize does: every tensor gets the
    type plan.plan_types chooses (llama.cpp's per-tensor rules for its file types, pure=True for --pure;
    lowbit's nf4 / nf4_dq / fp4 on every matrix), --keep rules as for convert(). Metadata and tokenizer keys are
    copied with their types; general.file_type is updated. A tensor whose type does not change is copied byte
    for byte. Returns the output path.

    Tensors that are already quantized and would change type are dequantized and quantized again, which loses
    more than quantizing the F16/F32 original; that needs allow_requantize=True (llama-quantize's
    --allow-requantize), otherwise it is an error.

    Calibration (converter/calibrated.py): calibrate names a text file that lowbit's forward pass runs the
    (unquantized) input model over, calib_tokens tokens in windows of calib_ctx, to collect the statistics of
    each matrix's inputs; imatrix names an importance-matrix file instead (llama.cpp's GGUF or .dat, or
    lowbit's). method: "auto" (the best measured per type), "imatrix", "gptq", "awq+imatrix", "awq+gptq".
    save_imatrix writes the collected importance matrix in llama.cpp's GGUF format (".dat": the legacy one).
    stats: a lowbit.calibrate.CalibrationStats from calibrate.collect() on this model, instead of calibrate or
    imatrix (collect once, quantize to several types). The output holds only standard block types.
    """
    from ..gguf import GGUFFile

    in_gguf, out_gguf = Path(in_gguf), Path(out_gguf)
    out = parse_outtype(qtype)
    rules = parse_keep(keep)
    if not in_gguf.is_file():
        raise FileNotFoundError(f"{in_gguf}: no such GGUF file")
    _check_output(out_gguf, force, [in_gguf])
    src = GGUFFile(in_gguf)
    facts = gguf_model_facts(src.metadata, (t.name for t in src.tensors))
    types = plan_types([TensorIn(t.name, tuple(int(d) for d in t.shape), t.type_id) for t in src.tensors], facts,
                       out, rules, pure)

    tensors, requantized = [], []
    for t in src.tensors:
        shape = tuple(int(d) for d in t.shape)
        new = types[t.name]
        if int(new) == t.type_id:
            tensors.append(Planned(t.name, shape, new, lambda t=t: t.data, copy=True,
                                   values=t.to_numpy if isinstance(t.qtype, QType) else None))
            continue
        if not isinstance(t.qtype, QType):
            raise LowbitError(f"tensor {t.name}: lowbit reads {type_name(t.type_id)} tensors but cannot convert "
                              f"them to {type_name(int(new))}; quantize the F16/F32 original of this model instead")
        if type_info(t.type_id).is_quantized:
            requantized.append(t.type_id)
        tensors.append(Planned(t.name, shape, new, t.to_numpy))
    calibrated = calibrate is not None or imatrix is not None or stats is not None
    if calibrated:
        from ..calibrate import model_is_unquantized

        quantized = model_is_unquantized(in_gguf)
        if quantized:
            raise LowbitError(f"{in_gguf}: calibrated quantization needs the unquantized (F16/BF16/F32) model, whose "
                              f"activations the statistics describe; this file's block matrices are quantized "
                              f"({', '.join(quantized[:3])}{', ...' if len(quantized) > 3 else ''}). Calibrate "
                              "and quantize the F16/BF16 original")
    if requantized and not allow_requantize:
        raise LowbitError(f"{in_gguf} holds quantized tensors ({_count_types(requantized)}); quantizing them again "
                          "loses more quality than quantizing the F16/F32 original. Quantize the original "
                          "(lowbit quantize MODEL-f16.gguf OUT TYPE, or lowbit convert HF_DIR --outtype TYPE), or "
                          "pass --allow-requantize (allow_requantize=True) to requantize anyway")
    if requantized:
        log.warning("requantizing %d tensors that are already quantized (%s): the result is worse than "
                    "quantizing the F16/F32 original", len(requantized), _count_types(requantized))

    calibration_kvs: list[KV] = []
    if calibrated:
        tensors, calibration_kvs = _calibrate_tensors(in_gguf, out, tensors, facts, calibrate, imatrix, calib_tokens,
                                                      calib_ctx, method, save_imatrix, memory_budget, n_threads,
                                                      progress, stats)
    elif save_imatrix is not None:
        raise LowbitError("save_imatrix needs calibration text (--calibrate TEXT)")

    kvs: list[KV] = []
    for key in src.metadata:
        if key == "general.alignment" or (calibration_kvs and key.startswith("quantize.imatrix.")):
            continue  # the writer sets the alignment; a calibrated file says what it was calibrated on
        if key == "general.file_type":
            kvs.append(KV.u32(key, out.file_type_id))
        elif key == "general.quantization_version":
            kvs.append(KV.u32(key, QUANTIZATION_VERSION))
        else:
            kvs.append(KV(key, src.field(key), None))  # copied with its exact GGUF types
    if "general.file_type" not in src.metadata:
        kvs.append(KV.u32("general.file_type", out.file_type_id))
    if "general.quantization_version" not in src.metadata:
        kvs.append(KV.u32("general.quantization_version", QUANTIZATION_VERSION))
    kvs += calibration_kvs
    t0 = time.perf_counter()
    _write(out_gguf, kvs, tensors, progress, f"quantize -> {out.name}")
    log.info("wrote %s (%s; %d tensors: %s, %.1f MiB) in %.1f s", out_gguf, out.name, len(tensors),
             _type_mix(tensors), out_gguf.stat().st_size / 2**20, time.perf_counter() - t0)
    return out_gguf


def _calibrate_tensors(in_gguf: Path, out: OutType, tensors: list[Planned], facts: ModelFacts, calibrate, imatrix,
                       calib_tokens: int, calib_ctx: int, method: str, save_imatrix, memory_budget, n_threads,
                       progress: bool, stats=None) -> tuple[list[Planned], list[KV]]:
    """Statistics from text (or an imatrix file), then the planned tensors rewritten by converter/calibrated.py,
    and the keys llama-quantize writes into a file made with an importance matrix (quantize.imatrix.*)."""
    from .. import calibrate as cal
    from .calibrated import NEEDS_HESSIAN, calibrated_loaders, default_method, parse_method

    if (calibrate is not None) + (imatrix is not None) + (stats is not None) > 1:
        raise LowbitError("give calibration text (--calibrate) or an importance matrix (--imatrix), not both")
    m = parse_method(method)
    if m == "auto":
        has_xtx = calibrate is not None or (stats is not None and any(s.xtx is not None for s in stats.sites.values()))
        m = default_method(out.name) if has_xtx else "imatrix"
        log.info("calibration method: %s", m)
    if stats is not None:
        if save_imatrix is not None:
            raise LowbitError("save_imatrix writes the statistics of --calibrate; with stats, call "
                              "lowbit.imatrix.write_imatrix(path, stats.imatrix())")
    elif calibrate is not None:
        if calib_tokens < calib_ctx:
            raise LowbitError(f"--calib-tokens {calib_tokens} is less than one window of {calib_ctx} tokens")
        text = cal.read_text(calibrate)
        t0 = time.perf_counter()
        stats = cal.collect(in_gguf, text, n_tokens=calib_tokens, n_ctx=calib_ctx,
                            hessians=m in NEEDS_HESSIAN, memory_budget=memory_budget,
                            n_threads=n_threads, progress=progress, dataset=Path(calibrate).name)
        log.info("calibrated on %d tokens of %s in %.1f s", stats.n_tokens, calibrate, time.perf_counter() - t0)
        if save_imatrix is not None:
            from ..imatrix import write_imatrix

            path = Path(save_imatrix)
            write_imatrix(path, stats.imatrix(), fmt="dat" if path.suffix == ".dat" else "gguf")
            log.info("wrote the importance matrix to %s", path)
    else:
        if save_imatrix is not None:
            raise LowbitError("save_imatrix needs calibration text (--calibrate TEXT), not --imatrix")
        stats = cal.stats_from_imatrix(imatrix)
    source = calibrate if calibrate is not None else imatrix
    kvs = [KV.str("quantize.imatrix.file", Path(source).name if source is not None else "(statistics)"),
           KV.str("quantize.imatrix.dataset", stats.dataset),
           KV.u32("quantize.imatrix.entries_count", sum(len(cal.SITE_TENSORS[k[1]]) for k in stats.sites)),
           KV.u32("quantize.imatrix.chunks_count", stats.n_chunks)]
    return calibrated_loaders(tensors, stats, m, facts.n_head, facts.n_head_kv, progress), kvs
