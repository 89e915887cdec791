"""At temperature 0, is a request's text the same alone and batched with others? Greedy generation of N prompts
with Model.generate_tokens one at a time, then all together through BatchEngine (8 sequences); prints how many
are identical and where the first differing token of the others is.

    python tests/bench/batch_equality.py MODEL.gguf [--prompts 32] [--tokens 64]
"""
from __future__ import annotations

import argparse

import numpy as np

import lowbit

WORDS = "the sea fisherman village boat morning evening fox dog capital city river mountain story king queen".split()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    prompts = [" ".join(rng.choice(WORDS, 20)) for _ in range(args.prompts)]
    with lowbit.load(args.model, n_ctx=512, n_threads=args.threads) as m:
        alone = [m.generate_tokens(p, max_new_tokens=args.tokens, temperature=0.0, stop_at_eos=False) for p in prompts]
    with lowbit.BatchEngine(args.model, n_seq=8, n_ctx=512, n_threads=args.threads) as eng:
        reqs = [eng.submit(p, max_new_tokens=args.tokens, temperature=0.0, stop_at_eos=False) for p in prompts]
        eng.run()
    same = sum(r.tokens == a for r, a in zip(reqs, alone))
    diffs = [next((i for i, (x, y) in enumerate(zip(r.tokens, a)) if x != y), None) for r, a in zip(reqs, alone)]
    print(f"identical: {same}/{len(prompts)}; first differing position of the others: "
          f"{[d for d in diffs if d is not None]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
