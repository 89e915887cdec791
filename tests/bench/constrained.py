"""Per-token cost of constrained decoding (lowbit.constrain with llguidance): decode tokens/s with and without a
JSON schema on the same model, same prompt, same number of tokens; plus the cost of one step's mask alone on
49k (SmolLM2) and 262k (the Gemma-3-1B-shaped file) vocabularies, and the one-time tokenizer build.

    python tests/bench/constrained.py [--reps 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# A schema that keeps the model writing: one long string field.
SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 400, "maxLength": 600}},
          "required": ["story"], "additionalProperties": False}


def decode_rate(m, n: int, **kw) -> tuple[float, int]:
    m.generate_tokens("Write a JSON object with a story:", max_new_tokens=n, temperature=0.8, seed=1,
                      stop_at_eos=False, **kw)
    t = m.last_timings
    return t["generated_tokens"] / t["generate_seconds"], t["generated_tokens"]


def mask_cost(m, reps: int = 200) -> float:
    from lowbit.constrain import Constraint, grammar_text

    c = Constraint(m, grammar_text(json_schema=SCHEMA))
    logits = np.random.default_rng(0).standard_normal(m.n_vocab).astype(np.float32)
    tok = m.tokenize('{"story": "', add_bos=False)
    for t in tok:
        c.consume(t)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        c.mask(logits)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96)
    args = ap.parse_args()
    import lowbit
    from lowbit.constrain import ll_tokenizer
    from lowbit.hub import default_cache_dir
    from vs_llamacpp import smollm2_files

    path = smollm2_files(default_cache_dir(), ("q4_0",))["q4_0"]
    rows = []
    with lowbit.load(path, n_ctx=1024, n_threads=args.threads) as m:
        t0 = time.perf_counter()
        ll_tokenizer(m)
        build = time.perf_counter() - t0
        decode_rate(m, 8)  # warm-up
        free, con = [], []
        for _ in range(args.reps):  # alternating
            free.append(decode_rate(m, args.tokens)[0])
            r, n = decode_rate(m, args.tokens, json_schema=SCHEMA)
            assert n == args.tokens, n
            con.append(r)
        f, c = statistics.median(free), statistics.median(con)
        rows.append(("SmolLM2-135M Q4_0 (49,152 tokens)", f, c, mask_cost(m), build))
        print(f"SmolLM2: decode {f:.1f} tok/s free, {c:.1f} with the schema ({100 * (1 - c / f):.1f}% slower); "
              f"free {sorted(round(x) for x in free)}, schema {sorted(round(x) for x in con)}", file=sys.stderr)
    gemma = default_cache_dir() / "bench-gemma3-1b-llamacpp-q4_k_m.gguf"
    if gemma.exists():
        with lowbit.load(gemma, n_ctx=512, n_threads=args.threads) as m:
            t0 = time.perf_counter()
            ll_tokenizer(m)
            build = time.perf_counter() - t0
            rows.append(("Gemma-3-1B shape (262,144 tokens)", float("nan"), float("nan"), mask_cost(m), build))
    print("\n| model | decode free (tok/s) | decode with schema (tok/s) | slower by | mask per token (us) | "
          "tokenizer build (s) |")
    print("|---|---|---|---|---|---|")
    for name, f, c, mask, build in rows:
        slower = f"{100 * (1 - c / f):.1f}%" if f == f else "-"
        fs = f"{f:.1f}" if f == f else "-"
        cs = f"{c:.1f}" if c == c else "-"
        print(f"| {name} | {fs} | {cs} | {slower} | {mask * 1e6:.0f} | {build:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
