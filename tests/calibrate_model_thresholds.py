"""Re-measure the quantized-logits thresholds of tests/test_model.py (not a test; prints a table).

    LOWBIT_CORE_DIR=build/dev-NAME PYTHONPATH=python python tests/calibrate_model_thresholds.py [q8_0 q4_1 q4_0 nf4]

For each type, seeds 0-5 of the tiny model, untied and tied: mean KL and top-1 agreement of lowbit's logits
against transformers fp32 (the original weights) and against transformers on the file's own dequantized
weights. Set each limit from the worst value seen (about 2x for KL, a little below for top-1).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lowbit  # noqa: E402
from model_helpers import (N_THREADS, hf_logits, hf_logits_same_weights, kl_and_top1, random_ids, tiny_gguf,  # noqa: E402
                           tiny_hf)


def main(qtypes: list[str]) -> None:
    for qtype in qtypes:
        for tied in (False, True):
            worst = [0.0, 1.0, 0.0, 1.0]
            for seed in range(6):
                hf, path = tiny_hf(seed, tied), tiny_gguf(qtype, seed, tied)
                ids = random_ids(32, 400, seed=seed + 10)
                with lowbit.load(path, n_threads=N_THREADS) as m:
                    ours = m.logits(ids)
                kl, top1 = kl_and_top1(hf_logits(hf, ids), ours)
                kls, top1s = kl_and_top1(hf_logits_same_weights(hf, path, ids), ours)
                worst = [max(worst[0], kl), min(worst[1], top1), max(worst[2], kls), min(worst[3], top1s)]
            print(f"{qtype:5s} tied={tied!s:5s} fp32: KL {worst[0]:.3g} top-1 {worst[1]:.3f} | "
                  f"same weights: KL {worst[2]:.3g} top-1 {worst[3]:.3f}  ({lowbit.build_info()['cpu_isa_active']})")


if __name__ == "__main__":
    main(sys.argv[1:] or ["q8_0", "q4_1", "q4_0", "nf4"])
