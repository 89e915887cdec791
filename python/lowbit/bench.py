"""Measurements behind `lowbit bench` and `lowbit perplexity`: prompt/decode tokens/s and windowed perplexity."""
from __future__ import annotations

import math
import statistics
from typing import Any, Optional

import numpy as np

from ._core import LowbitError


def bench_model(model, n_prompt: int = 128, n_gen: int = 64, repetitions: int = 3, seed: int = 0) -> dict[str, Any]:
    """Prompt processing (n_prompt tokens in one batch) and greedy decode (n_gen tokens, EOS ignored) speed.

    Each repetition starts from an empty cache with a fresh random prompt, so nothing is reused."""
    rng = np.random.default_rng(seed)
    pp, tg = [], []
    for _ in range(repetitions):
        model.reset()
        prompt = rng.integers(0, model.n_vocab, size=n_prompt).tolist()
        model.generate_tokens(prompt, max_new_tokens=n_gen, temperature=0.0, add_bos=False, stop_at_eos=False)
        t = model.last_timings
        pp.append(t["prompt_tokens"] / t["prompt_seconds"])
        # The first generated token comes from the prompt's logits; the rest each cost one decode step.
        if t["generated_tokens"] > 1 and t["generate_seconds"] > 0:
            tg.append((t["generated_tokens"] - 1) / t["generate_seconds"])
    model.reset()
    return {
        "threads": model.n_threads,
        "pp": pp,
        "tg": tg,
        "pp_median": statistics.median(pp),
        "tg_median": statistics.median(tg) if tg else float("nan"),
    }


def perplexity(model, text: str, n_ctx: int = 512, max_chunks: Optional[int] = None,
               progress: bool = False) -> dict[str, Any]:
    """llama.cpp's convention: tokenize the whole text, cut it into windows of n_ctx tokens, put BOS at the
    start of each window, and score the second half of each window (each token predicted from at least
    n_ctx/2 tokens of context). Returns ppl, its standard error, and the per-window mean NLLs."""
    if n_ctx < 16 or n_ctx > model.n_ctx:
        raise LowbitError(f"the perplexity window must be in [16, {model.n_ctx}] (the model's context; --ppl-ctx), "
                          f"got {n_ctx}")
    tokens = model.tokenize(text, add_bos=False)
    n_chunks = len(tokens) // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks == 0:
        raise LowbitError(f"the text is too short: {len(tokens)} tokens, fewer than one window of {n_ctx} "
                          "(give a longer text or a smaller --ppl-ctx)")
    bos = model.tokenizer.bos_id
    first = n_ctx // 2
    nll_all: list[np.ndarray] = []
    chunks = range(n_chunks)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="perplexity", unit="window")
    for c in chunks:
        window = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            window[0] = bos
        logits = model.logits(window).astype(np.float64)      # (n_ctx, n_vocab)
        scored = logits[first:-1]                              # predicts window[first + 1:]
        targets = np.asarray(window[first + 1:])
        m = scored.max(axis=1, keepdims=True)
        logsumexp = (m[:, 0] + np.log(np.exp(scored - m).sum(axis=1)))
        nll_all.append(logsumexp - scored[np.arange(len(targets)), targets])
    nll = np.concatenate(nll_all)
    mean = float(nll.mean())
    stderr = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else 0.0
    ppl = math.exp(mean)
    model.reset()
    return {"ppl": ppl, "ppl_stderr": ppl * stderr, "nll": mean, "n_tokens": int(len(nll)),
            "n_chunks": n_chunks, "window_nll": [float(x.mean()) for x in nll_all]}
