"""Micro benchmark of the CPU matmul kernels: matvec GB/s of weight bytes per type and ISA, GEMM tokens/s, for
the file's row layout and the load-time panel layout, next to a memory-bandwidth probe (sum over a 1 GB array)
and the thread pool's barrier cost.

    LOWBIT_CORE_DIR=build/dev-NAME PYTHONPATH=python python tests/bench/kernels.py [--threads 2] [--isa avx512]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time

import numpy as np

from lowbit import _core

TYPES = {"q4_0": (2, 32, 18), "q4_1": (3, 32, 20), "q8_0": (8, 32, 34), "nf4": (1024, 64, 36),
         "f16": (1, 1, 2), "bf16": (30, 1, 2), "f32": (0, 1, 4)}


def weights(name: str, n_out: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random rows of the type with sane scale fields (raw bytes, as a uint8 array)."""
    tid, bs, nbytes = TYPES[name]
    nb = n_out * k // bs
    raw = rng.integers(0, 256, nb * nbytes, dtype=np.uint8)
    if name in ("q4_0", "q4_1", "q8_0"):
        view = raw.reshape(nb, nbytes)
        view[:, 0:2] = np.full(nb, 0.01, dtype=np.float16).view(np.uint8).reshape(nb, 2)
        if name == "q4_1":
            view[:, 2:4] = np.full(nb, -0.05, dtype=np.float16).view(np.uint8).reshape(nb, 2)
    elif name == "nf4":
        raw.reshape(nb, nbytes)[:, 0:4] = np.full(nb, 0.1, dtype=np.float32).view(np.uint8).reshape(nb, 4)
    elif name == "f16":
        raw = rng.standard_normal(n_out * k).astype(np.float16).view(np.uint8)
    elif name == "bf16":
        raw = (rng.standard_normal(n_out * k).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        raw = rng.standard_normal(n_out * k).astype(np.float32).view(np.uint8)
    return raw


STAT = statistics.median


def timed(fn, repeat: int) -> float:
    """Median (or, with --best, minimum) wall time of `repeat` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return STAT(times)


def bandwidth_probe(threads: int) -> float:
    """GB/s of summing a 1 GB float32 array, split over `threads` numpy reductions (they drop the GIL)."""
    a = np.ones(1 << 28, dtype=np.float32)
    parts = np.array_split(a, threads)
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        def run():
            list(ex.map(np.sum, parts))
        t = timed(run, 3)
    return a.nbytes / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", action="append", help="ISA(s) to measure (default: every runnable one)")
    ap.add_argument("--types", default="q4_0,q4_1,q8_0,nf4,f16,bf16,f32")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--gemm-tokens", type=int, default=128)
    ap.add_argument("--best", action="store_true", help="report the fastest run instead of the median "
                    "(steadier on a shared, busy machine)")
    args = ap.parse_args()
    global STAT
    if args.best:
        STAT = min
    isas = args.isa or _core.kernels_available()
    rng = np.random.default_rng(0)

    print(f"threads={args.threads}  memory probe (numpy sum over 1 GB): "
          f"{bandwidth_probe(1):.1f} GB/s 1 thread, {bandwidth_probe(args.threads):.1f} GB/s {args.threads} threads")
    print(f"{'isa':8} {'type':5} {'5632x2048 GB/s':>15} {'32000x2048 GB/s':>16} "
          f"{'gemm 5632x2048 tok/s':>21}")
    k = 2048
    for name in args.types.split(","):
        tid = TYPES[name][0]
        shapes = {n_out: weights(name, n_out, k, rng) for n_out in (5632, 32000)}
        x1 = rng.standard_normal(k).astype(np.float32)
        xg = rng.standard_normal((args.gemm_tokens, k)).astype(np.float32)
        for isa in isas:
            _core.set_isa(isa)
            gbs = []
            for n_out, w in shapes.items():
                t = timed(lambda: _core.matmul(tid, w, n_out, k, x1, n_threads=args.threads), args.repeat)
                gbs.append(w.nbytes / t / 1e9)
            w = shapes[5632]
            t = timed(lambda: _core.matmul(tid, w, 5632, k, xg, n_threads=args.threads), max(2, args.repeat // 3))
            row = f"{isa:8} {name:5} {gbs[0]:15.1f} {gbs[1]:16.1f} {args.gemm_tokens / t:21.0f}"
            # The load-time panel layout (what load() uses where the ISA has panel kernels).
            pgbs = []
            for n_out, w in shapes.items():
                s = _core.matmul_panels_seconds(tid, w, n_out, k, x1, n_threads=args.threads, reps=args.repeat)
                pgbs.append(w.nbytes / s / 1e9 if s else None)
            if pgbs[0] is not None:
                s = _core.matmul_panels_seconds(tid, shapes[5632], 5632, k, xg, n_threads=args.threads,
                                                reps=max(2, args.repeat // 3))
                row += f"   panels: {pgbs[0]:.1f} / {pgbs[1]:.1f} GB/s, gemm {args.gemm_tokens / s:.0f} tok/s"
            print(row)
    _core.reset_isa()
    for n in sorted({1, args.threads}):
        print(f"pool barrier (empty job, median of 10000), {n} thread(s): "
              f"{_core.pool_barrier_seconds(n) * 1e6:.2f} us")


if __name__ == "__main__":
    main()
