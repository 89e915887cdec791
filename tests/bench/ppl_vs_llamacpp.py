"""Perplexity and per-token KL divergence, lowbit vs llama.cpp (llama-cpp-python), on the same GGUF files and the
same token windows of wikitext-2 (llama.cpp's convention: windows of n_ctx tokens, BOS first, the second half
scored). Agreement here checks the whole runtime (tokenizer aside: both engines get lowbit's token ids) against
llama.cpp's; the perplexity of each type says what the quantization costs.

    python tests/bench/ppl_vs_llamacpp.py [--text ../shared/data/wikitext-2-test.raw] [--windows 8] [--threads 2]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(HERE.parents[2] / "shared" / "data" / "wikitext-2-test.raw"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="q4_1,q8_0,q4_0,nf4")
    args = ap.parse_args()

    import lowbit
    from lowbit.hub import default_cache_dir, fetch_smollm2

    sys.path.insert(0, str(HERE))
    from vs_llamacpp import smollm2_files

    cache = default_cache_dir()
    files = {"q4_1": fetch_smollm2(cache), **smollm2_files(cache)}
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        print("llama-cpp-python is not installed: lowbit only", file=sys.stderr)
    text = Path(args.text).read_text(encoding="utf-8")
    n = args.n_ctx
    first = n // 2

    print(f"SmolLM2-135M-Instruct, {args.windows} windows of {n} tokens from {Path(args.text).name}, "
          f"second half of each window scored; {args.threads} threads\n")
    print("| file | lowbit ppl | llama.cpp ppl | mean KL(llama.cpp ‖ lowbit) | top-1 agreement |")
    print("|---|---|---|---|---|")
    for qt in args.types.split(","):
        path = files[qt]
        m = lowbit.load(path, n_ctx=n, n_threads=args.threads, kv_f16=True)
        toks = m.tokenize(text[: args.windows * n * 12], add_bos=False)  # enough text for the windows
        if len(toks) < args.windows * n:
            raise SystemExit(f"the text gives only {len(toks)} tokens")
        bos = m.tokenizer.bos_id
        lc = None
        if llama_cpp is not None and qt != "nf4":
            lc = llama_cpp.Llama(model_path=str(path), n_ctx=n, n_threads=args.threads, n_threads_batch=args.threads,
                                 n_batch=n, n_ubatch=n, logits_all=True, verbose=False)
        nll_a, nll_b, kls, top1 = [], [], [], []
        for w in range(args.windows):
            window = list(toks[w * n:(w + 1) * n])
            if bos is not None:
                window[0] = bos
            target = np.asarray(window[first + 1:])
            la = log_softmax(m.logits(window)[first:-1])
            nll_a.append(-la[np.arange(len(target)), target])
            if lc is not None:
                lc.reset()
                lc.eval(window)
                lb = log_softmax(np.asarray(lc.scores[:n])[first:-1])
                nll_b.append(-lb[np.arange(len(target)), target])
                kls.append((np.exp(lb) * (lb - la)).sum(axis=-1))
                top1.append(la.argmax(axis=-1) == lb.argmax(axis=-1))
        ppl_a = math.exp(float(np.concatenate(nll_a).mean()))
        if lc is not None:
            ppl_b = math.exp(float(np.concatenate(nll_b).mean()))
            kl = float(np.concatenate(kls).mean())
            agree = float(np.concatenate(top1).mean())
            print(f"| {path.name} | {ppl_a:.3f} | {ppl_b:.3f} | {kl:.2e} | {agree:.4f} |")
        else:
            print(f"| {path.name} | {ppl_a:.3f} | - | - | - |")
        m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
