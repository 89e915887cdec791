"""Calibration statistics: lowbit's forward pass runs an unquantized model over text and records, per linear
layer, what its inputs look like: the mean x^2 of each input column (an importance matrix, as llama-imatrix's;
spec/imatrix.md), the mean |x|, and, when asked, the second moment X^T X / n that GPTQ and AWQ's search need.

Matrices that read the same activations share one record (a *site*): wq/wk/wv read the normed block input, wo
the attention output, w_gate/w_up the normed feed-forward input, w_down act(gate) * up. The second moments are
large (n_in^2 floats per site), so they are collected a group of blocks at a time within a memory budget: a
7B model's fit a laptop's memory at the price of more passes over the text.

    stats = collect("model-f16.gguf", text, n_tokens=32768, hessians=True)
    stats.imatrix()            # lowbit.imatrix.Imatrix, writable in llama.cpp's formats
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from ._core import LowbitError

log = logging.getLogger("lowbit.calibrate")

# site -> the GGUF tensors (blk.N.<name>.weight) that read its activations (cpp/include/lowbit/model.h TapSite)
SITE_TENSORS = {
    0: ("attn_q", "attn_k", "attn_v"),
    1: ("attn_output",),
    2: ("ffn_gate", "ffn_up"),
    3: ("ffn_down",),
}
TENSOR_SITE = {name: site for site, names in SITE_TENSORS.items() for name in names}
FLOAT_TYPES = {"F32", "F16", "BF16"}
MIN_WARN_TOKENS = 8192
# Optional extra weight of the rows at position 0 of the windows in the second moment (SiteStats.hessian): the
# first token is an attention sink (later queries put much of their attention on its keys and values), so an
# error in its rows costs more than 1/n_ctx of X^T X says. Plain GPTQ trades the sink's outputs for everyone
# else's and on SmolLM2-135M makes Q4_0 worse than rounding; weighting the sink rows fixes that, but the
# blended second moment calibrated quantization uses (converter/calibrated.py GPTQ_DIAG_MIX) does better
# still without it (BENCHMARKS.md, calibrated quantization), so the default is 0.
SINK_WEIGHT = 0.0


def tensor_site(name: str) -> Optional[tuple[int, int]]:
    """(layer, site) of a GGUF weight name such as blk.3.ffn_up.weight; None for anything else."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in TENSOR_SITE:
        return int(parts[1]), TENSOR_SITE[parts[2]]
    return None


@dataclass
class SiteStats:
    """What one site's input rows looked like: sums over n rows of x^2 and |x| per column, X^T X if kept, and
    the rows at position 0 of each window (the attention sink's; see SINK_WEIGHT)."""

    dim: int
    n: int = 0
    sum_sq: np.ndarray = None       # (dim,) float64
    sum_abs: np.ndarray = None      # (dim,) float64
    xtx: Optional[np.ndarray] = None  # (dim, dim) float32, X^T X (not divided)
    first_rows: list = field(default_factory=list)  # (dim,) float32 per window

    @property
    def mean_sq(self) -> np.ndarray:
        return (self.sum_sq / max(self.n, 1)).astype(np.float32)

    @property
    def mean_abs(self) -> np.ndarray:
        return (self.sum_abs / max(self.n, 1)).astype(np.float32)

    def hessian(self, sink_weight: Optional[float] = None) -> Optional[np.ndarray]:
        """X^T X / n (float64) plus sink_weight (default SINK_WEIGHT) times the mean outer product of the
        windows' first rows, or None where X^T X was not collected."""
        if self.xtx is None:
            return None
        if sink_weight is None:
            sink_weight = SINK_WEIGHT
        H = self.xtx.astype(np.float64) / max(self.n, 1)
        if sink_weight and self.first_rows:
            F = np.asarray(self.first_rows, dtype=np.float64)
            H += (sink_weight / len(F)) * (F.T @ F)
        return H


@dataclass
class CalibrationStats:
    """Per (layer, site) statistics of one calibration run, and where they came from."""

    sites: dict[tuple[int, int], SiteStats] = field(default_factory=dict)
    n_tokens: int = 0
    n_chunks: int = 0
    chunk_size: int = 0
    dataset: str = ""

    def site_of(self, name: str) -> Optional[SiteStats]:
        key = tensor_site(name)
        return self.sites.get(key) if key else None

    def importance(self, name: str) -> Optional[np.ndarray]:
        s = self.site_of(name)
        return None if s is None else s.mean_sq

    def imatrix(self):
        """The importance matrix in llama.cpp's terms (one entry per tensor; lowbit.imatrix.write_imatrix)."""
        from .imatrix import Imatrix

        sums, counts = {}, {}
        for (layer, site), s in sorted(self.sites.items()):
            for t in SITE_TENSORS[site]:
                sums[f"blk.{layer}.{t}.weight"] = s.sum_sq.astype(np.float32)
                counts[f"blk.{layer}.{t}.weight"] = np.array([s.n], dtype=np.float32)
        return Imatrix(sums=sums, counts=counts, datasets=[self.dataset] if self.dataset else [],
                       chunk_count=self.n_chunks, chunk_size=self.chunk_size)


def model_is_unquantized(path: Union[str, os.PathLike]) -> list[str]:
    """The quantized block matrices of a GGUF (empty when every blk.N matrix is F32/F16/BF16)."""
    from .gguf import GGUFFile

    from .converter.plan import type_name

    f = GGUFFile(path)
    out = []
    for t in f.tensors:
        if tensor_site(t.name) and type_name(t.type_id).upper() not in FLOAT_TYPES:
            out.append(f"{t.name} ({type_name(t.type_id)})")
    return out


def read_text(path: Union[str, os.PathLike]) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such calibration text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{p}: the calibration text is not UTF-8 ({e}); give a plain text file") from None
    if not text.strip():
        raise LowbitError(f"{p}: the calibration text is empty")
    return text


def _windows(tokens: list[int], n_ctx: int, bos: Optional[int], n_tokens: int) -> list[np.ndarray]:
    """Consecutive windows of n_ctx tokens (the first made BOS where the model has one, as llama-imatrix
    does), as many as n_tokens allows."""
    n_win = min(len(tokens) // n_ctx, max(n_tokens // n_ctx, 1))
    out = []
    for k in range(n_win):
        w = np.array(tokens[k * n_ctx:(k + 1) * n_ctx], dtype=np.int32)
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


def _layer_groups(dims: dict[tuple[int, int], int], budget_bytes: int) -> list[list[int]]:
    """Blocks split into consecutive groups whose X^T X (float32) fit the budget (at least one block each)."""
    per_layer: dict[int, int] = {}
    for (layer, _), d in dims.items():
        per_layer[layer] = per_layer.get(layer, 0) + 4 * d * d
    groups, cur, used = [], [], 0
    for layer in sorted(per_layer):
        if cur and used + per_layer[layer] > budget_bytes:
            groups.append(cur)
            cur, used = [], 0
        cur.append(layer)
        used += per_layer[layer]
    if cur:
        groups.append(cur)
    return groups


def collect(model_path: Union[str, os.PathLike], text: str, n_tokens: int = 32768, n_ctx: int = 512,
            hessians: bool = True, memory_budget: Optional[int] = None, n_threads: Optional[int] = None,
            progress: bool = True, dataset: str = "") -> CalibrationStats:
    """Run the unquantized model over text in windows of n_ctx tokens (up to n_tokens in all) and return the
    per-site statistics. hessians: also X^T X, a group of blocks per pass so that they take at most
    memory_budget bytes (default: a quarter of the machine's memory, at least 256 MiB).

    Errors (lowbit.LowbitError): a quantized model (statistics of a quantized model describe the wrong
    network), text shorter than one window, activations that are NaN or infinite."""
    from tqdm.auto import tqdm

    from . import load

    quantized = model_is_unquantized(model_path)
    if quantized:
        raise LowbitError(f"{model_path}: calibration runs the unquantized model, but its block matrices are "
                          f"quantized ({', '.join(quantized[:3])}{', ...' if len(quantized) > 3 else ''}); give "
                          "the F16/BF16/F32 file the quantized one was made from")
    if n_ctx < 8:
        raise LowbitError(f"calibration windows of {n_ctx} tokens are too short; use at least 8 (512 is usual)")
    model = load(model_path, n_ctx=n_ctx, n_threads=n_threads)
    core = model._model()
    tokens = model.tokenize(text, add_bos=False, special=False)
    if len(tokens) < n_ctx:
        raise LowbitError(f"the calibration text is too short: {len(tokens)} tokens, and one window needs "
                          f"{n_ctx}; give more text (tens of thousands of tokens are usual)")
    tok = model.tokenizer
    wins = _windows(tokens, n_ctx, tok.bos_id if tok.add_bos else None, n_tokens)
    used = len(wins) * n_ctx
    if used < MIN_WARN_TOKENS:
        log.warning("calibrating on only %d tokens; %d or more give steadier statistics", used, MIN_WARN_TOKENS)

    cfg = model.config
    n_embd, n_ff, n_layer = cfg.n_embd, cfg.n_ff, cfg.n_layer
    q_dim = cfg.n_head * cfg.head_dim
    dims = {}
    for layer in range(n_layer):
        dims.update({(layer, 0): n_embd, (layer, 1): q_dim, (layer, 2): n_embd, (layer, 3): n_ff})
    stats = CalibrationStats(n_tokens=used, n_chunks=len(wins), chunk_size=n_ctx, dataset=dataset)
    for key, d in dims.items():
        stats.sites[key] = SiteStats(d, 0, np.zeros(d), np.zeros(d))

    if memory_budget is None:
        memory_budget = max(_machine_memory() // 4, 256 << 20)
    groups = _layer_groups(dims, memory_budget) if hessians else [[]]
    total = len(groups) * len(wins)
    bar = tqdm(total=total * n_ctx, unit="tok", unit_scale=True, desc="calibrate", disable=not progress,
               leave=False)
    state = {"first_pass": True, "window": 0}
    keep: set[int] = set()
    seen: set[tuple[int, int]] = set()  # sites that have had this window's first row

    def tap(layer: int, site: int, rows: np.ndarray) -> None:
        s = stats.sites[(layer, site)]
        if state["first_pass"]:
            if not np.isfinite(rows).all():
                names = "/".join(SITE_TENSORS[site])
                raise LowbitError(f"the activations read by blk.{layer}.{names} are NaN or infinite on calibration "
                                  f"window {state['window']}: the model overflows on this text (an F16 file whose "
                                  "values exceed F16's range, or broken weights); no file was written")
            r64 = rows.astype(np.float64)
            s.sum_sq += (r64 * r64).sum(axis=0)
            s.sum_abs += np.abs(r64).sum(axis=0)
            s.n += rows.shape[0]
            if (layer, site) not in seen:
                seen.add((layer, site))
                s.first_rows.append(np.array(rows[0], dtype=np.float32))
        if layer in keep:
            if s.xtx is None:
                s.xtx = np.zeros((s.dim, s.dim), dtype=np.float32)
            s.xtx += rows.T @ rows

    try:
        core.set_activation_tap(tap)
        for gi, group in enumerate(groups):
            keep.clear()
            keep.update(group)
            state["first_pass"] = gi == 0
            for wi, w in enumerate(wins):
                state["window"] = wi
                seen.clear()
                model.reset()
                core.eval_hidden(w)
                bar.update(n_ctx)
            if len(groups) > 1:
                log.info("calibration pass %d/%d (blocks %d-%d) done", gi + 1, len(groups), group[0], group[-1])
    finally:
        core.set_activation_tap(None)
        model.reset()
        bar.close()
    return stats


def _machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def stats_from_imatrix(path: Union[str, os.PathLike]) -> CalibrationStats:
    """Per-site statistics from an importance-matrix file (llama.cpp's GGUF or legacy .dat): the mean x^2 of
    each site's input columns only (no X^T X, so only the importance-weighted method can use them)."""
    from .imatrix import read_imatrix

    im = read_imatrix(path)
    stats = CalibrationStats(n_chunks=im.chunk_count, chunk_size=im.chunk_size,
                             dataset=", ".join(im.datasets))
    for name in im.names():
        key = tensor_site(name)
        if key is None or key in stats.sites:
            continue
        sums = np.asarray(im.sums[name], dtype=np.float64)
        count = float(np.asarray(im.counts[name]).reshape(-1)[0])
        if sums.ndim != 1:
            continue  # expert tensors: lowbit's architectures have none
        n = max(int(round(count)), 1)
        # keep the exact mean: sum_sq / n == sums / count
        stats.sites[key] = SiteStats(sums.shape[0], n, sums * (n / count), np.zeros(sums.shape[0]))
    if not stats.sites:
        raise LowbitError(f"{path}: the importance matrix has no entry for any block matrix (blk.N.attn_q.weight, "
                          "...); was it made for another model?")
    return stats
