"""Calibrated quantization of a GGUF's block matrices (`lowbit quantize ... --calibrate TEXT`, `--imatrix FILE`).

Given per-site activation statistics (lowbit/calibrate.py) the planned tensors of quantize_file are rewritten:

- ``imatrix``: each block's scale (and min) chosen by least squares weighted by the mean x^2 of its input
  columns (lowbit/wquant.py quantize_weighted); needs only an importance matrix, so it also runs from
  llama.cpp's imatrix files.
- ``gptq``: GPTQ error feedback (wquant.quantize_gptq) through the inverse of X^T X blended with its diagonal
  (GPTQ_DIAG_MIX).
- ``awq``: per-input-channel scales s = mean|x|^alpha, alpha searched per site to minimise the layer outputs'
  error, multiplied into the matrices' columns and divided out of what produces their input: the RMSNorm
  weights before wq/wk/wv and w_gate/w_up, the rows of wv before wo (one scale per kv-head channel, shared
  by the query heads that read it), the rows of w_up before w_down. The product is unchanged in exact
  arithmetic, so the file stays a standard model of its architecture. Combined with ``imatrix`` or ``gptq``
  for the rounding itself ("awq+imatrix", "awq+gptq").

The tensors of other types (token_embd, output, norms, types the grids of wquant.py do not cover) are
quantized as without calibration.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .._core import LowbitError
from ..calibrate import SITE_TENSORS, CalibrationStats, SiteStats, tensor_site
from ..quants import QType
from ..wquant import block_type, output_error, quantize_gptq, quantize_weighted

log = logging.getLogger("lowbit.convert")

METHODS = ("imatrix", "gptq", "awq+imatrix", "awq+gptq", "awq")
NEEDS_HESSIAN = {"gptq", "awq+imatrix", "awq+gptq", "awq"}
ALPHAS = np.linspace(0.0, 1.0, 11)
# GPTQ runs on (1 - m) X^T X/n + m diag(X^T X/n). With m = 0 (textbook GPTQ) the layers' output error on the
# calibration text falls to a third of rounding's, yet perplexity gains little: the compensation leans on
# correlations (a few channels that carry most of the activations' energy, the attention sink) that matter
# more to the next layers than their share of the squared error. m = 1 is no error feedback (each weight
# rounded to nearest on grids fitted by diag(H)). On SmolLM2-135M validation text m = 0.7..0.9 was best, and
# much better than either end (BENCHMARKS.md, calibrated quantization).
GPTQ_DIAG_MIX = 0.8


def default_method(file_type: str) -> str:
    """The method `--method auto` uses for a file type ("q4_0", "q4_k_m", "nf4"), from the measurements in
    BENCHMARKS.md (calibrated quantization): GPTQ (on the blended second moment) won for the types with one
    scale per block of 32 or 64 (Q4_0, NF4); for the K-quant mixes the importance-weighted search was as good
    or better, and needs no X^T X."""
    return "imatrix" if "_k" in file_type.lower() else "gptq"


def parse_method(method: str) -> str:
    m = method.lower().replace(" ", "")
    if m == "awq":
        m = "awq+imatrix"
    if m not in METHODS and m != "auto":
        raise LowbitError(f"unknown calibration method {method!r}; choose auto, imatrix, gptq, awq+imatrix or "
                          "awq+gptq")
    return m


@dataclass
class _Site:
    """One site's statistics and, after the AWQ search, its scales (None: 1). The second moment is made (in
    float64) only when a matrix of the site is quantized, so that a large model's are not all in memory at
    once beside the float32 sums they come from."""

    importance: np.ndarray
    stats: SiteStats
    mean_abs: Optional[np.ndarray]
    scale: Optional[np.ndarray] = None

    @property
    def has_hessian(self) -> bool:
        return self.stats.xtx is not None

    def hessian(self) -> Optional[np.ndarray]:
        return self.stats.hessian()

    def imp(self) -> np.ndarray:
        return self.importance if self.scale is None else self.importance / (self.scale * self.scale)

    def H(self) -> Optional[np.ndarray]:
        H = self.hessian()
        if H is None or self.scale is None:
            return H
        return H / np.outer(self.scale, self.scale)


@dataclass
class Plan:
    """What to do to each tensor: column scales, row divisors, the method; norms to divide."""

    sites: dict[tuple[int, int], _Site] = field(default_factory=dict)
    row_div: dict[str, np.ndarray] = field(default_factory=dict)   # tensor -> divide its rows (v, up, v bias)
    norm_div: dict[str, np.ndarray] = field(default_factory=dict)  # norm tensor -> divide it


def build_sites(stats: CalibrationStats) -> dict[tuple[int, int], _Site]:
    out = {}
    for key, s in stats.sites.items():
        if s.n == 0:
            continue
        out[key] = _Site(importance=s.mean_sq.astype(np.float64), stats=s,
                         mean_abs=s.mean_abs.astype(np.float64))
    return out


def _awq_loss(mats: list[tuple[np.ndarray, QType]], s: np.ndarray, site: _Site, H: np.ndarray) -> float:
    imp = site.importance / (s * s)
    loss = 0.0
    for W, qt in mats:
        _, vals = quantize_weighted(W * s[None, :], qt, imp, return_values=True)
        loss += output_error(W, vals / s[None, :], H)
    return loss


def _normalise(s: np.ndarray) -> np.ndarray:
    s = np.maximum(s, 1e-8)
    return s / np.sqrt(s.max() * s.min())


def awq_search(site: _Site, mats: list[tuple[np.ndarray, QType]], kv_groups: Optional[tuple[int, int, int]] = None
               ) -> tuple[np.ndarray, float, float]:
    """The scale of a site's input channels, mean|x|^alpha for the alpha (0, 0.1, ..., 1) whose quantized
    matrices give the smallest output error on the calibration rows; alpha 0 (no scaling) is a candidate, so
    the result is never worse than without it. kv_groups (n_kv, group, head_dim): channels that must share a
    scale (wo's input channels of the query heads reading one kv head) are given their mean statistic.
    Returns (scale, alpha, loss reduction factor)."""
    base = site.mean_abs
    if kv_groups is not None:
        n_kv, g, hd = kv_groups
        base = base.reshape(n_kv, g, hd).mean(axis=1)
        base = np.repeat(base[:, None, :], g, axis=1).reshape(-1)
    best = (np.ones_like(base), 0.0, None)
    loss0 = None
    H = site.hessian()
    for a in ALPHAS:
        s = _normalise(base ** a) if a > 0 else np.ones_like(base)
        loss = _awq_loss(mats, s, site, H)
        if loss0 is None:
            loss0 = loss
        if best[2] is None or loss < best[2]:
            best = (s, float(a), loss)
    return best[0], best[1], (loss0 / best[2]) if best[2] else 1.0


def calibrated_loaders(tensors: list, stats: CalibrationStats, method: str, n_head: int, n_head_kv: int,
                       progress: bool = True) -> list:
    """tensors: converter.core.Planned entries (name, shape, qtype, load, copy). Returns the list with the
    calibrated ones replaced (their load returns block bytes, copy=True) and AWQ's changes to other tensors
    (norms, wv / w_up rows) folded into their loaders."""
    from tqdm.auto import tqdm

    from .core import Planned

    by_name = {t.name: t for t in tensors}
    sites = build_sites(stats)
    chosen: dict[str, str] = {}
    for t in tensors:
        key = tensor_site(t.name)
        bt = block_type(t.qtype) if (key and not t.copy) else None
        if key is None or bt is None or key not in sites:
            if key is not None and key in sites and bt is None and not t.copy:
                log.warning("%s: calibrated quantization does not cover %s; quantized without calibration",
                            t.name, QType(int(t.qtype)).name if int(t.qtype) in QType._value2member_map_ else t.qtype)
            continue
        if len(sites[key].importance) != t.shape[-1]:
            raise LowbitError(f"{t.name}: the calibration statistics have {len(sites[key].importance)} input "
                              f"columns but the tensor has {t.shape[-1]}; the importance matrix was made for "
                              "another model")
        if t.shape[-1] % bt.group:
            continue
        if method in NEEDS_HESSIAN and not sites[key].has_hessian:
            raise LowbitError(f"method {method} needs the activations' second moments, which an importance-matrix "
                              "file does not hold; calibrate on text (--calibrate) or use --method imatrix")
        chosen[t.name] = method

    plan = Plan(sites=sites)
    awq_layers = sorted({tensor_site(n)[0] for n, m in chosen.items() if m.startswith("awq")})
    if awq_layers:
        _plan_awq(plan, by_name, chosen, awq_layers, n_head, n_head_kv, progress)

    out = []
    for t in tensors:
        if t.name in chosen:
            out.append(Planned(t.name, t.shape, t.qtype, _calibrated_load(t, plan, chosen[t.name]), copy=True))
        elif t.name in plan.row_div or t.name in plan.norm_div:
            div = plan.row_div.get(t.name, plan.norm_div.get(t.name))
            if t.copy:
                if t.values is None:
                    raise LowbitError(f"{t.name}: AWQ would change this tensor, but lowbit cannot decode its "
                                      "type; quantize from the F16/F32 original")
                out.append(Planned(t.name, t.shape, t.qtype, _divided(t.values, div)))
            else:
                out.append(t._replace(load=_divided(t.load, div)))
        else:
            out.append(t)
    return out


def _divided(load: Callable[[], np.ndarray], div: np.ndarray) -> Callable[[], np.ndarray]:
    def f() -> np.ndarray:
        x = np.asarray(load(), dtype=np.float32)
        return (x / div.reshape((-1,) + (1,) * (x.ndim - 1))).astype(np.float32) if x.ndim > 1 \
            else (x / div).astype(np.float32)
    return f


def _calibrated_load(t, plan: Plan, method: str) -> Callable[[], np.ndarray]:
    def f() -> np.ndarray:
        site = plan.sites[tensor_site(t.name)]
        W = np.asarray(t.load(), dtype=np.float32)
        rd = plan.row_div.get(t.name)
        if rd is not None:
            W = W / rd[:, None]
        if site.scale is not None:
            W = W * site.scale[None, :].astype(np.float32)
        if method.endswith("gptq"):
            H = site.H()
            data = quantize_gptq(W, t.qtype, (1 - GPTQ_DIAG_MIX) * H + GPTQ_DIAG_MIX * np.diag(np.diag(H)))
        else:
            data = quantize_weighted(W, t.qtype, site.imp())
        return data.reshape(-1)
    return f


def _plan_awq(plan: Plan, by_name: dict, chosen: dict[str, str], layers: list[int], n_head: int, n_head_kv: int,
              progress: bool) -> None:
    from tqdm.auto import tqdm

    for layer in tqdm(layers, desc="awq search", disable=not progress, leave=False):
        # wv before wo's site and w_up before w_down's: a producer's rows are divided before its own search
        for site_id in (1, 0, 3, 2):
            names = SITE_TENSORS[site_id]
            key = (layer, site_id)
            site = plan.sites.get(key)
            tnames = [f"blk.{layer}.{n}.weight" for n in names]
            if site is None or not all(n in chosen and chosen[n].startswith("awq") for n in tnames):
                continue
            if site_id in (0, 2):
                norm = f"blk.{layer}.{'attn_norm' if site_id == 0 else 'ffn_norm'}.weight"
                if norm not in by_name:
                    continue
                producers = [norm]
            elif site_id == 1:
                producers = [f"blk.{layer}.attn_v.weight"]
                if f"blk.{layer}.attn_v.bias" in by_name:
                    producers.append(f"blk.{layer}.attn_v.bias")
            else:
                producers = [f"blk.{layer}.ffn_up.weight"]
            if not all(p in by_name for p in producers):
                continue
            mats = []
            for n in tnames:
                W = np.asarray(by_name[n].load(), dtype=np.float32)
                rd = plan.row_div.get(n)
                if rd is not None:
                    W = W / rd[:, None]
                mats.append((W, QType(int(by_name[n].qtype))))
            kv = None
            if site_id == 1:
                head_dim = mats[0][0].shape[1] // n_head
                kv = (n_head_kv, n_head // n_head_kv, head_dim)
            s, alpha, gain = awq_search(site, mats, kv)
            log.debug("awq %s: alpha %.1f, output error / %.3f", key, alpha, gain)
            if alpha == 0.0:
                continue
            site.scale = s
            if site_id == 1:
                n_kv, g, hd = kv
                div = s.reshape(n_kv, g, hd)[:, 0, :].reshape(-1)
            else:
                div = s
            for p in producers:
                if p.endswith("norm.weight"):
                    plan.norm_div[p] = div
                else:
                    prev = plan.row_div.get(p)
                    plan.row_div[p] = div if prev is None else prev * div
