"""Calibrated weight quantization into standard blocks: importance-weighted grid search, GPTQ, AWQ scales.

Every block type here is described by a *grid*: the values a group of input columns of one row may take,
``a * L[q] + b`` with a per-element scale ``a``, offset ``b`` and a sorted table of levels ``L`` (integers for
the ggml types, the NormalFloat codes for NF4). A type's ``fit`` chooses the grid of a group (a block, or a
K-quant super-block with its 6/8-bit sub-block scales already quantized) from the weights and per-column
importances; ``project`` rounds a column onto it; ``pack`` writes the block bytes. Because a weight is only
ever rounded onto a grid that its block can store exactly, GPTQ's error feedback sees the real rounding, and
the packed bytes dequantize (lowbit, llama.cpp, gguf-py) to exactly the values the search scored. The block
layouts are those of spec/quant-types.md; the searches follow spec/imatrix.md section 5 in spirit (weighted
least squares over candidate scales), not llama.cpp's code.

    W (n_out, n_in) float32, imp (n_in,) mean x^2, H (n_in, n_in) = X^T X / n
    data = quantize_weighted(W, "q4_0", imp)          # bytes, (n_out, row_bytes) uint8
    data = quantize_gptq(W, "q4_k", H)                # GPTQ with the grid chosen as each group is reached
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .quants import QType, nf4_codes, row_size


def _f16(x: np.ndarray) -> np.ndarray:
    """x rounded to the nearest float16, back in float32 (what a block's f16 field will hold)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def _wls_scale(x: np.ndarray, w: np.ndarray, lv: np.ndarray) -> np.ndarray:
    """Per row, the scale d minimising sum w (x - d*lv)^2 over the last axis (0 where lv is all zero)."""
    num = (w * x * lv).sum(axis=-1)
    den = (w * lv * lv).sum(axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def _wls_scale_min(x: np.ndarray, w: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, (d, m) minimising sum w (x - d*q - m)^2 over the last axis."""
    sw = w.sum(axis=-1)
    sq = (w * q).sum(axis=-1)
    sqq = (w * q * q).sum(axis=-1)
    sx = (w * x).sum(axis=-1)
    sqx = (w * q * x).sum(axis=-1)
    det = sw * sqq - sq * sq
    ok = det > 1e-30 * np.maximum(sw * sqq, 1e-30)
    safe = np.where(ok, det, 1.0)
    d = np.where(ok, (sw * sqx - sq * sx) / safe, 0.0)
    m = np.where(ok, (sqq * sx - sq * sqx) / safe, np.where(sw > 0, sx / np.where(sw > 0, sw, 1), 0.0))
    return d, m


def _round_levels(t: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.rint(t), lo, hi)


# ---- symmetric and asymmetric searches on a group of columns (rows independent) ----------------------------

def _search_sym(x: np.ndarray, w: np.ndarray, lo: int, hi: int, n_cand: int = 16) -> np.ndarray:
    """Scale per row of x (..., k) for values d*q, q in [lo, hi], minimising the w-weighted squared error:
    candidates around amax / |lo| (the signed extreme on the wide side of the range), each refined by weighted
    least squares on its rounding."""
    imax = np.argmax(np.abs(x), axis=-1)
    vmax = np.take_along_axis(x, imax[..., None], axis=-1)[..., 0]
    best_d = np.zeros(x.shape[:-1], dtype=np.float64)
    best_e = np.full(x.shape[:-1], np.inf)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    nz = vmax != 0
    vsafe = np.where(nz, vmax, 1.0)
    for k in range(-n_cand // 2, n_cand // 2 + 1):
        inv = (lo - 0.1 * k) / vsafe  # maps the extreme to lo - 0.1k (lo is negative)
        q = _round_levels(x64 * inv[..., None], lo, hi)
        d = _wls_scale(x64, w64, q)
        e = (w64 * (x64 - d[..., None] * q) ** 2).sum(axis=-1)
        better = (e < best_e) & nz
        best_e = np.where(better, e, best_e)
        best_d = np.where(better, d, best_d)
    return best_d


def _search_asym(x: np.ndarray, w: np.ndarray, nmax: int, nonneg_min: bool,
                 n_cand: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(d, m) per row for values d*q + m, q in [0, nmax], minimising the weighted squared error (d >= 0).
    nonneg_min: the offset may not be positive (K-quants store -m with m >= 0)."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    xmin = x64.min(axis=-1)
    xmax = x64.max(axis=-1)
    if nonneg_min:
        xmin = np.minimum(xmin, 0.0)
    rng = xmax - xmin
    flat = rng <= 0
    rsafe = np.where(flat, 1.0, rng)
    best_d = np.zeros_like(xmin)
    best_m = xmin.copy()
    best_e = np.full(xmin.shape, np.inf)
    for k in range(-n_cand // 2, n_cand // 2 + 1):
        inv = (nmax + 0.1 * k) / rsafe
        q = _round_levels((x64 - xmin[..., None]) * inv[..., None], 0, nmax)
        d, m = _wls_scale_min(x64, w64, q)
        if nonneg_min:
            # m > 0 is not storable: refit d alone with m = 0
            pos = m > 0
            d = np.where(pos, _wls_scale(x64, w64, q), d)
            m = np.where(pos, 0.0, m)
        bad = d < 0
        d = np.where(bad, 0.0, d)
        e = (w64 * (x64 - d[..., None] * q - m[..., None]) ** 2).sum(axis=-1)
        better = (e < best_e) & ~flat
        best_e = np.where(better, e, best_e)
        best_d = np.where(better, d, best_d)
        best_m = np.where(better, m, best_m)
    best_d = np.where(flat, 0.0, best_d)
    if nonneg_min:
        best_m = np.minimum(best_m, 0.0)
    return best_d, best_m


# ---- grids ------------------------------------------------------------------------------------------------

@dataclass
class Grid:
    """The storable values of one group (n_out rows x k columns): a * levels[q] + b."""

    a: np.ndarray            # (n_out, k) float32 scale per element
    b: np.ndarray            # (n_out, k) float32 offset per element
    fields: dict             # what pack() needs besides the codes (type specific)

    def project(self, t: "BlockType", x: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Column j of the group, x (n_out,): (rounded values, code indices)."""
        a, b = self.a[:, j], self.b[:, j]
        asafe = np.where(a != 0, a, 1.0)
        q = t.nearest((x - b) / asafe)
        q = np.where(a != 0, q, t.zero_index)
        return (a * t.levels[q] + b).astype(np.float32), q


class BlockType:
    """One block type: its group (columns sharing grid parameters), its levels, fit and pack."""

    qtype: QType
    group: int
    levels: np.ndarray
    zero_index: int

    def nearest(self, t: np.ndarray) -> np.ndarray:
        lo = int(self.levels[0])
        return (np.clip(np.rint(t), lo, int(self.levels[-1])) - lo).astype(np.int64)

    def fit(self, x: np.ndarray, w: np.ndarray) -> Grid:
        raise NotImplementedError

    def pack(self, grid: Grid, q: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _nibbles_lo_hi(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes 0..15 -> (n, 16) bytes: byte i = q[i] | q[i+16] << 4 (ggml's order)."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes 0..31 -> (n, 4) bytes: bit j of the little-endian uint32 is q[j] >> 4 (ggml's qh)."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


class _Legacy(BlockType):
    """ggml's blocks of 32 with F16 scale d (and min m for the _1 types), then for 5 bits the high bits qh,
    then the low nibbles."""

    group = 32
    bits = 4

    def pack(self, grid, q):
        parts = [grid.fields[k].astype(np.float16).view(np.uint8).reshape(-1, 2) for k in ("d", "m")
                 if k in grid.fields]
        if self.bits == 5:
            parts.append(_high_bits(q))
        parts.append(_nibbles_lo_hi(q & 15))
        return np.concatenate(parts, axis=1)


class _Sym(_Legacy):
    """Codes lo..hi around zero_index, value d * level (Q4_0, Q5_0, Q8_0)."""

    lo: int
    hi: int
    n_cand = 16

    def fit(self, x, w):
        d = _f16(_search_sym(x, w, self.lo, self.hi, n_cand=self.n_cand))
        a = np.repeat(d[:, None], self.group, axis=1).astype(np.float32)
        return Grid(a, np.zeros_like(a), {"d": d})


class _Asym(_Legacy):
    """Codes 0..2^bits-1, value d * q + m (Q4_1, Q5_1)."""

    zero_index = 0

    def fit(self, x, w):
        d, m = _search_asym(x, w, len(self.levels) - 1, nonneg_min=False)
        d, m = _f16(d), _f16(m)
        a = np.repeat(d[:, None], self.group, axis=1)
        b = np.repeat(m[:, None], self.group, axis=1)
        return Grid(a.astype(np.float32), b.astype(np.float32), {"d": d, "m": m})


class Q4_0(_Sym):
    qtype, lo, hi = QType.Q4_0, -8, 7
    levels = np.arange(-8, 8, dtype=np.float32)
    zero_index = 8


class Q4_1(_Asym):
    qtype = QType.Q4_1
    levels = np.arange(0, 16, dtype=np.float32)


class Q5_0(_Sym):
    qtype, lo, hi, bits = QType.Q5_0, -16, 15, 5
    levels = np.arange(-16, 16, dtype=np.float32)
    zero_index = 16


class Q5_1(_Asym):
    qtype, bits = QType.Q5_1, 5
    levels = np.arange(0, 32, dtype=np.float32)


class Q8_0(_Sym):
    qtype, lo, hi, n_cand = QType.Q8_0, -127, 127, 4
    levels = np.arange(-128, 128, dtype=np.float32)
    zero_index = 128

    def nearest(self, t):
        return (np.clip(np.rint(t), -127, 127) + 128).astype(np.int64)

    def pack(self, grid, q):
        out = np.empty((q.shape[0], 34), dtype=np.uint8)
        out[:, :2] = grid.fields["d"].astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[:, 2:] = (q - 128).astype(np.int8).view(np.uint8)
        return out


class NF4(BlockType):
    """lowbit's NF4 (spec/quant-types.md#nf4): blocks of 64, an f32 absmax, codes high nibble first."""

    qtype, group = QType.NF4, 64
    levels = nf4_codes().astype(np.float32)
    zero_index = 7
    _mid = (levels[1:] + levels[:-1]) / 2

    def nearest(self, t):
        return np.searchsorted(self._mid, np.clip(t, -1.0, 1.0), side="left").astype(np.int64)

    def fit(self, x, w):
        x64, w64 = x.astype(np.float64), w.astype(np.float64)
        amax = np.abs(x64).max(axis=-1)
        best_a = amax.copy()
        best_e = np.full(amax.shape, np.inf)
        safe = np.where(amax > 0, amax, 1.0)
        for f in np.linspace(0.70, 1.05, 15):
            s = safe * f
            q = self.nearest(x64 / s[:, None])
            c = self.levels[q].astype(np.float64)
            a = _wls_scale(x64, w64, c)
            a = np.where(a > 0, a, s)
            e = (w64 * (x64 - a[:, None] * self.levels[self.nearest(x64 / a[:, None])]) ** 2).sum(axis=-1)
            better = e < best_e
            best_e = np.where(better, e, best_e)
            best_a = np.where(better, a, best_a)
        best_a = np.where(amax > 0, best_a, 0.0).astype(np.float32)
        a = np.repeat(best_a[:, None], self.group, axis=1)
        return Grid(a, np.zeros_like(a), {"absmax": best_a})

    def pack(self, grid, q):
        out = np.empty((q.shape[0], 36), dtype=np.uint8)
        out[:, :4] = grid.fields["absmax"].astype(np.float32).view(np.uint8).reshape(-1, 4)
        out[:, 4:] = ((q[:, 0::2] << 4) | q[:, 1::2]).astype(np.uint8)
        return out


def _kquant_scales(s: np.ndarray, w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-block scales s (n, n_sub) >= 0 -> (f16 super scale D, integer codes 0..2^bits-1), choosing D among a
    few candidates to minimise sum w (s - D*code)^2 (w: the weight of each sub-block's scale)."""
    nmax = (1 << bits) - 1
    smax = s.max(axis=-1)
    safe = np.where(smax > 0, smax, 1.0)
    best_D = np.zeros_like(smax)
    best_c = np.zeros_like(s)
    best_e = np.full(smax.shape, np.inf)
    for k in range(-4, 5):
        D = _f16(safe / (nmax + 0.25 * k)).astype(np.float64)
        Ds = np.where(D > 0, D, 1.0)
        c = np.clip(np.rint(s / Ds[:, None]), 0, nmax)
        e = (w * (s - D[:, None] * c) ** 2).sum(axis=-1)
        better = e < best_e
        best_e = np.where(better, e, best_e)
        best_D = np.where(better, D, best_D)
        best_c = np.where(better[:, None], c, best_c)
    best_D = np.where(smax > 0, best_D, 0.0)
    best_c = np.where((smax > 0)[:, None], best_c, 0)
    return best_D.astype(np.float32), best_c.astype(np.int64)


class _KAsym(BlockType):
    """Q4_K / Q5_K: super-blocks of 256 = 8 sub-blocks of 32, value = d*sc*q - dmin*mc, 6-bit sc and mc."""

    group, sub = 256, 32
    bits = 4

    def __init__(self):
        self.levels = np.arange(0, 1 << self.bits, dtype=np.float32)
        self.zero_index = 0

    def fit(self, x, w):
        n = x.shape[0]
        xs = x.reshape(n, 8, 32)
        ws = w.reshape(n, 8, 32) if w.shape[0] == n else np.broadcast_to(w.reshape(-1, 8, 32), (n, 8, 32))
        d, m = _search_asym(xs, ws, (1 << self.bits) - 1, nonneg_min=True)
        wsum = ws.sum(axis=-1).astype(np.float64)
        D, sc = _kquant_scales(d, wsum, 6)
        Dm, mc = _kquant_scales(-m, wsum, 6)
        a = np.repeat((D[:, None] * sc), 32, axis=1).astype(np.float32)
        b = np.repeat((-Dm[:, None] * mc), 32, axis=1).astype(np.float32)
        return Grid(a, b, {"d": D, "dmin": Dm, "sc": sc, "mc": mc})

    @staticmethod
    def _scales12(sc: np.ndarray, mc: np.ndarray) -> np.ndarray:
        """8 six-bit scales and mins -> ggml's 12-byte packing (get_scale_min_k4's inverse)."""
        n = sc.shape[0]
        out = np.zeros((n, 12), dtype=np.int64)
        out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
        out[:, 4:8] = mc[:, 0:4] | ((mc[:, 4:8] >> 4) << 6)
        out[:, 8:12] = (sc[:, 4:8] & 15) | ((mc[:, 4:8] & 15) << 4)
        return out.astype(np.uint8)

    def _head(self, grid: Grid, n: int) -> np.ndarray:
        out = np.empty((n, 16), dtype=np.uint8)
        out[:, 0:2] = grid.fields["d"].astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[:, 2:4] = grid.fields["dmin"].astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[:, 4:16] = self._scales12(grid.fields["sc"], grid.fields["mc"])
        return out


class Q4_K(_KAsym):
    qtype, bits = QType.Q4_K, 4

    def pack(self, grid, q):
        n = q.shape[0]
        qs = q.reshape(n, 4, 2, 32)  # chunk of 64: low nibbles the first 32, high the next 32
        body = (qs[:, :, 0, :] | (qs[:, :, 1, :] << 4)).reshape(n, 128).astype(np.uint8)
        return np.concatenate([self._head(grid, n), body], axis=1)


class Q5_K(_KAsym):
    qtype, bits = QType.Q5_K, 5

    def pack(self, grid, q):
        n = q.shape[0]
        qs = q.reshape(n, 4, 2, 32)
        lo = qs & 15
        hi = qs >> 4
        body = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(n, 128)
        qh = np.zeros((n, 32), dtype=np.int64)
        for c in range(4):
            qh |= hi[:, c, 0, :] << (2 * c)
            qh |= hi[:, c, 1, :] << (2 * c + 1)
        return np.concatenate([self._head(grid, n), qh.astype(np.uint8), body.astype(np.uint8)], axis=1)


class Q6_K(BlockType):
    """Super-blocks of 256 = 16 sub-blocks of 16, value = d * sc * (q - 32), int8 sc, f16 d."""

    qtype, group = QType.Q6_K, 256
    levels = np.arange(-32, 32, dtype=np.float32)
    zero_index = 32

    def fit(self, x, w):
        n = x.shape[0]
        xs = x.reshape(n, 16, 16)
        ws = w.reshape(n, 16, 16) if w.shape[0] == n else np.broadcast_to(w.reshape(-1, 16, 16), (n, 16, 16))
        s = _search_sym(xs, ws, -32, 31)  # signed sub-block scales
        wsum = ws.sum(axis=-1).astype(np.float64)
        imax = np.argmax(np.abs(s), axis=-1)
        smax = np.take_along_axis(s, imax[:, None], axis=-1)[:, 0]
        best_D = np.zeros(n)
        best_c = np.zeros_like(s)
        best_e = np.full(n, np.inf)
        safe = np.where(smax != 0, smax, 1.0)
        for k in range(-4, 5):
            D = _f16(safe / (-128 + 0.25 * k)).astype(np.float64)  # the extreme maps to about -128
            Ds = np.where(D != 0, D, 1.0)
            c = np.clip(np.rint(s / Ds[:, None]), -128, 127)
            e = (wsum * (s - D[:, None] * c) ** 2).sum(axis=-1)
            better = e < best_e
            best_e = np.where(better, e, best_e)
            best_D = np.where(better, D, best_D)
            best_c = np.where(better[:, None], c, best_c)
        best_D = np.where(smax != 0, best_D, 0.0).astype(np.float32)
        sc = best_c.astype(np.int64)
        a = np.repeat(best_D[:, None] * sc, 16, axis=1).astype(np.float32)
        return Grid(a, np.zeros_like(a), {"d": best_D, "sc": sc})

    def pack(self, grid, q):
        n = q.shape[0]
        u = q.reshape(n, 2, 4, 32)  # q already 0..63 (level index = q + 32)
        ql = np.empty((n, 2, 64), dtype=np.int64)
        ql[:, :, 0:32] = (u[:, :, 0] & 15) | ((u[:, :, 2] & 15) << 4)
        ql[:, :, 32:64] = (u[:, :, 1] & 15) | ((u[:, :, 3] & 15) << 4)
        qh = (u[:, :, 0] >> 4) | ((u[:, :, 1] >> 4) << 2) | ((u[:, :, 2] >> 4) << 4) | ((u[:, :, 3] >> 4) << 6)
        scales = grid.fields["sc"].astype(np.int8).view(np.uint8)
        d = grid.fields["d"].astype(np.float16).view(np.uint8).reshape(-1, 2)
        return np.concatenate([ql.reshape(n, 128).astype(np.uint8), qh.reshape(n, 64).astype(np.uint8), scales, d],
                              axis=1)


BLOCK_TYPES: dict[QType, Callable[[], BlockType]] = {
    QType.Q4_0: Q4_0, QType.Q4_1: Q4_1, QType.Q5_0: Q5_0, QType.Q5_1: Q5_1, QType.Q8_0: Q8_0, QType.NF4: NF4,
    QType.Q4_K: Q4_K, QType.Q5_K: Q5_K, QType.Q6_K: Q6_K,
}


def block_type(qtype: QType | int | str) -> Optional[BlockType]:
    """The grid description of a type, or None where calibrated quantization does not cover it."""
    make = BLOCK_TYPES.get(QType.parse(qtype))
    return make() if make else None


def _pack_rows(t: BlockType, grids: list[Grid], codes: np.ndarray) -> np.ndarray:
    n_out = codes.shape[0]
    parts = [t.pack(g, codes[:, i * t.group:(i + 1) * t.group]) for i, g in enumerate(grids)]
    out = np.concatenate(parts, axis=1)
    assert out.shape[1] == row_size(t.qtype, codes.shape[1]), (out.shape, t.qtype)
    return np.ascontiguousarray(out).reshape(n_out, -1)


def _check_shape(t: BlockType, W: np.ndarray) -> None:
    if W.ndim != 2 or W.shape[1] % t.group:
        raise ValueError(f"{t.qtype.name} needs rows whose length is a multiple of {t.group}; got shape {W.shape}")


def quantize_weighted(W: np.ndarray, qtype: QType | int | str, importance: Optional[np.ndarray] = None,
                      return_values: bool = False):
    """Each group's grid chosen by weighted least squares (weights: the importance of each input column,
    e.g. an imatrix's mean x^2; None: unweighted), each weight rounded to its nearest storable value.
    Returns the rows' block bytes (n_out, row_bytes) uint8, and with return_values the dequantized W too."""
    t = block_type(qtype)
    W = np.asarray(W, dtype=np.float32)
    _check_shape(t, W)
    n_out, n_in = W.shape
    imp = np.ones(n_in, dtype=np.float32) if importance is None else np.asarray(importance, dtype=np.float32)
    grids, codes, vals = [], np.empty((n_out, n_in), dtype=np.int64), np.empty_like(W)
    for g0 in range(0, n_in, t.group):
        x = W[:, g0:g0 + t.group]
        grid = t.fit(x, np.broadcast_to(imp[g0:g0 + t.group], x.shape))
        for j in range(t.group):
            vals[:, g0 + j], codes[:, g0 + j] = grid.project(t, x[:, j], j)
        grids.append(grid)
    data = _pack_rows(t, grids, codes)
    return (data, vals) if return_values else data


def quantize_gptq(W: np.ndarray, qtype: QType | int | str, H: np.ndarray, damp: float = 0.01,
                  block: int = 128, act_order: bool = False, return_values: bool = False):
    """GPTQ (Frantar et al. 2022): columns quantized one at a time, each one's rounding error pushed onto the
    columns not yet quantized through the Cholesky factor of the inverse Hessian H = X^T X / n.

    In natural order a group's grid (block scale, K-quant super-block scales) is fitted when its first column
    is reached, on the weights as updated so far, weighted by diag(H). With act_order the columns are taken
    in decreasing diag(H), so the most active inputs are rounded first and the others absorb their error;
    since a group's columns are then spread over the whole pass, every grid is fitted beforehand on the
    original weights (the "static groups" of GPTQ's implementations). Returns block bytes (and the
    dequantized W with return_values)."""
    t = block_type(qtype)
    W = np.array(W, dtype=np.float64)
    _check_shape(t, W)
    n_out, n_in = W.shape
    H = np.array(H, dtype=np.float64)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(n_in)] += damp * float(np.mean(np.diag(H)))
    imp = np.diag(H).astype(np.float32)
    G = t.group
    grids: list[Optional[Grid]] = [None] * (n_in // G)
    if act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        for g in range(n_in // G):
            x = W[:, g * G:(g + 1) * G].astype(np.float32)
            grids[g] = t.fit(x, np.broadcast_to(imp[g * G:(g + 1) * G], x.shape))
        W, H = W[:, perm], H[np.ix_(perm, perm)]
    else:
        perm = np.arange(n_in)
    U = _inverse_cholesky_upper(H)
    B = max(block // G, 1) * G
    codes = np.empty((n_out, n_in), dtype=np.int64)
    vals = np.empty((n_out, n_in), dtype=np.float32)
    for i1 in range(0, n_in, B):
        i2 = min(i1 + B, n_in)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if not act_order and col % G == 0:
                x = W1[:, i:i + G].astype(np.float32)
                grids[col // G] = t.fit(x, np.broadcast_to(imp[col:col + G], x.shape))
            v, q = grids[col // G].project(t, W1[:, i].astype(np.float32), col % G)
            codes[:, col], vals[:, col] = q, v
            err = (W1[:, i] - v) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    data = _pack_rows(t, grids, codes)
    return (data, vals) if return_values else data


def _inverse_cholesky_upper(H: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of H^-1, adding damping until H is positive definite."""
    n = H.shape[0]
    extra = 0.0
    for _ in range(8):
        try:
            L = np.linalg.cholesky(H + extra * np.eye(n))
            Linv = np.linalg.solve_triangular(L, np.eye(n), lower=True) if hasattr(np.linalg, "solve_triangular") \
                else np.linalg.inv(L)
            Hinv = Linv.T @ Linv
            return np.linalg.cholesky(Hinv).T
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(H))) + 1e-12)
    raise np.linalg.LinAlgError("the Hessian is not positive definite even after damping")


def output_error(W: np.ndarray, Wq: np.ndarray, H: np.ndarray) -> float:
    """tr((W - Wq) H (W - Wq)^T): the summed mean squared error of the layer's outputs on the calibration
    rows whose second moment is H."""
    D = (np.asarray(W, dtype=np.float64) - np.asarray(Wq, dtype=np.float64))
    return float(np.einsum("ij,ij->", D @ H, D))
