"""Quantization speed (MB/s of float32 in): lowbit vs gguf.quants, same run; prints a markdown table.

    LOWBIT_CORE_DIR=build/dev-NAME PYTHONPATH=python python tests/bench/quantize_speed.py [--threads 2] [--full]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import lowbit
from lowbit.quants import QType


def tinyllama_shapes() -> list[tuple[int, int]]:
    """TinyLlama-1.1B weight matrices: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 kv heads."""
    h, inter, layers, vocab, kv = 2048, 5632, 22, 32000, 2048 * 4 // 32
    per_layer = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
    return [(vocab, h)] + per_layer * layers + [(vocab, h)]


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--full", action="store_true", help="also the whole 1.1B-parameter set (lowbit only, slow peer skipped)")
    args = ap.parse_args()
    import gguf
    from gguf import GGMLQuantizationType as G

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 5632)).astype(np.float32)
    mb = x.nbytes / 1e6
    rows = []
    for t in (QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.NF4, QType.F16, QType.BF16):
        ours = median_time(lambda: lowbit.quantize(x, t, n_threads=args.threads), args.runs)
        peer = float("nan")
        if t.name in G.__members__ and t != QType.NF4:
            peer = median_time(lambda: gguf.quants.quantize(x, G[t.name]), max(1, args.runs // 2))
        rows.append((t.name, mb / ours, mb / peer, peer / ours))
    print(f"quantize 2048x5632 f32 ({mb:.0f} MB), lowbit {args.threads} threads ({lowbit.quants.quantize_isa()}), "
          f"median of {args.runs}")
    print("| type | lowbit MB/s | gguf.quants MB/s | ratio |\n|---|---|---|---|")
    for name, a, b, r in rows:
        if b != b:  # NaN: gguf.quants has no such type (NF4)
            print(f"| {name} | {a:.0f} | - | - |")
        else:
            print(f"| {name} | {a:.0f} | {b:.0f} | {r:.1f}x |")
    if args.full:
        shapes = tinyllama_shapes()
        total = sum(r * c for r, c in shapes) * 4 / 1e6
        print(f"\nwhole TinyLlama-1.1B-shaped set ({total:.0f} MB f32), lowbit {args.threads} threads")
        print("| type | lowbit MB/s | gguf.quants MB/s (one run) | ratio |\n|---|---|---|---|")
        mats = {s: rng.standard_normal(s).astype(np.float32) for s in set(shapes)}
        for t in (QType.Q8_0, QType.Q4_0):
            def run() -> None:
                for s in shapes:
                    lowbit.quantize(mats[s], t, n_threads=args.threads)

            def run_peer() -> None:
                for s in shapes:
                    gguf.quants.quantize(mats[s], G[t.name])
            ours, peer = median_time(run, 3), median_time(run_peer, 1)
            print(f"| {t.name} | {total / ours:.0f} | {total / peer:.0f} | {peer / ours:.1f}x |")


if __name__ == "__main__":
    main()
