"""Perplexity and per-token KL divergence, lowbit vs llama.cpp (llama-cpp-python), on the same GGUF files and the
same token windows of wikitext-2 (llama.cpp's convention: windows of n_ctx tokens, BOS first, the second half
scored). Agreement here checks the whole runtime (tokenizer aside: both engines get lowbit's token ids) against
llama.cpp's; the perplexity of each type says what the quantization costs.

    python tests/bench/ppl_vs_llamacpp.py [--text ../shared/data/wikitext-2-test.raw] [--windows 8] [--threads 2]

Files: q4_1 is llama.cpp's SmolLM2 download; f16, q8_0, q4_0, nf4 are lowbit's requantizations of it;
llamacpp-q4_k_m, llamacpp-q2_k, llamacpp-iq4_xs and llamacpp-q4_0 are made by llama.cpp's own quantizer
(llama-quantize's per-tensor mix) from that F16 file.

The two engines quantize activations differently (lowbit: int8 blocks of 32 for every type; llama.cpp: blocks of
256, Q8_K, against K-quant and IQ4_XS weights), so their outputs on a quantized file differ by more than either
differs from exact arithmetic on the same weights. --ref measures that: each file's weights are dequantized to
F32 (lowbit.quantize_file(file, out, "f32")) and run by lowbit, and each engine is scored against that exact
reference (F32 lowbit and F32 llama.cpp agree to ~1e-6 nats; the last table checks it on the same windows).

    python tests/bench/ppl_vs_llamacpp.py --types llamacpp-q4_k_m,llamacpp-q2_k,llamacpp-iq4_xs,llamacpp-q4_0 --ref
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


def kl(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, from log-probabilities."""
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(HERE.parents[2] / "shared" / "data" / "wikitext-2-test.raw"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="q4_1,q8_0,q4_0,nf4",
                    help="q4_1, f16, q8_0, q4_0, nf4, llamacpp-q4_k_m, llamacpp-q5_k_m, llamacpp-q6_k, "
                         "llamacpp-q2_k, llamacpp-iq4_xs, llamacpp-q4_0")
    ap.add_argument("--ref", action="store_true",
                    help="also score both engines against the same weights dequantized to F32, run by lowbit")
    args = ap.parse_args()

    import lowbit
    from lowbit.hub import default_cache_dir, fetch_smollm2

    sys.path.insert(0, str(HERE))
    from vs_llamacpp import LLAMA_FTYPE, requantize_file, smollm2_files, smollm2_llamacpp_files

    cache = default_cache_dir()
    types = args.types.split(",")
    lc_types = tuple(t[len("llamacpp-"):] for t in types if t.startswith("llamacpp-"))
    unknown = [t for t in lc_types if t not in LLAMA_FTYPE]
    if unknown:
        raise SystemExit(f"no llama.cpp file type for {unknown}; use {', '.join(LLAMA_FTYPE)}")
    files = {"q4_1": fetch_smollm2(cache), **smollm2_files(cache)}
    files.update({f"llamacpp-{t}": p for t, p in smollm2_llamacpp_files(cache, lc_types).items()})
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        print("llama-cpp-python is not installed: lowbit only", file=sys.stderr)
    text = Path(args.text).read_text(encoding="utf-8")
    n = args.n_ctx
    first = n // 2

    def llama(path: Path):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n, n_threads=args.threads, n_threads_batch=args.threads,
                               n_batch=n, n_ubatch=n, logits_all=True, verbose=False)

    def llama_logprobs(lc, window: list) -> np.ndarray:
        lc.reset()
        lc.eval(window)
        return log_softmax(np.asarray(lc.scores[:n])[first:-1])

    print(f"SmolLM2-135M-Instruct, {args.windows} windows of {n} tokens from {Path(args.text).name}, "
          f"second half of each window scored; {args.threads} threads\n")
    print("| file | lowbit ppl | llama.cpp ppl | mean KL(llama.cpp ‖ lowbit) | top-1 agreement |")
    print("|---|---|---|---|---|")
    ref_rows, check_rows = [], []
    for qt in types:
        path = files[qt]
        m = lowbit.load(path, n_ctx=n, n_threads=args.threads, kv_f16=True)
        toks = m.tokenize(text[: args.windows * n * 12], add_bos=False)  # enough text for the windows
        if len(toks) < args.windows * n:
            raise SystemExit(f"the text gives only {len(toks)} tokens")
        bos = m.tokenizer.bos_id
        lc = llama(path) if llama_cpp is not None and qt != "nf4" else None
        mr = lcr = None
        if args.ref and qt != "f16":
            ref_path = cache / f"{path.stem}-dequantized-f32.gguf"
            if not ref_path.exists():
                requantize_file(path, ref_path, "f32")
            mr = lowbit.load(ref_path, n_ctx=n, n_threads=args.threads, kv_f16=True)
            lcr = llama(ref_path) if lc is not None else None
        acc: dict[str, list] = {}
        for w in range(args.windows):
            window = list(toks[w * n:(w + 1) * n])
            if bos is not None:
                window[0] = bos
            target = np.asarray(window[first + 1:])
            rows = np.arange(len(target))
            la = log_softmax(m.logits(window)[first:-1])
            acc.setdefault("nll_a", []).append(-la[rows, target])
            lb = None
            if lc is not None:
                lb = llama_logprobs(lc, window)
                acc.setdefault("nll_b", []).append(-lb[rows, target])
                acc.setdefault("kl_ba", []).append(kl(lb, la))
                acc.setdefault("top1_ab", []).append(la.argmax(axis=-1) == lb.argmax(axis=-1))
            if mr is not None:
                lr = log_softmax(mr.logits(window)[first:-1])
                acc.setdefault("nll_r", []).append(-lr[rows, target])
                acc.setdefault("kl_ra", []).append(kl(lr, la))
                acc.setdefault("top1_ra", []).append(lr.argmax(axis=-1) == la.argmax(axis=-1))
                if lb is not None:
                    acc.setdefault("kl_rb", []).append(kl(lr, lb))
                    acc.setdefault("top1_rb", []).append(lr.argmax(axis=-1) == lb.argmax(axis=-1))
                if lcr is not None:
                    acc.setdefault("kl_rr", []).append(kl(llama_logprobs(lcr, window), lr))
        mean = {k: float(np.concatenate(v).mean()) for k, v in acc.items()}
        ppl = {k: math.exp(mean[f"nll_{k}"]) for k in "abr" if f"nll_{k}" in mean}
        if lc is not None:
            print(f"| {path.name} | {ppl['a']:.3f} | {ppl['b']:.3f} | {mean['kl_ba']:.2e} | {mean['top1_ab']:.4f} |")
        else:
            print(f"| {path.name} | {ppl['a']:.3f} | - | - | - |")
        if mr is not None:
            ref_rows.append((path.name, ppl["r"], mean["kl_ra"], mean.get("kl_rb"), mean["top1_ra"],
                             mean.get("top1_rb")))
            if "kl_rr" in mean:
                check_rows.append((path.name, mean["kl_rr"]))
            mr.close()
        m.close()
    if ref_rows:
        def opt(v, fmt):
            return "-" if v is None else fmt.format(v)

        print("\nAgainst the exact reference: the same weights dequantized to F32, run by lowbit.\n")
        print("| file | reference ppl | KL(ref ‖ lowbit) | KL(ref ‖ llama.cpp) | top-1 lowbit = ref | "
              "top-1 llama.cpp = ref |")
        print("|---|---|---|---|---|---|")
        for name, p_r, k_a, k_b, t_a, t_b in ref_rows:
            print(f"| {name} | {p_r:.3f} | {k_a:.2e} | {opt(k_b, '{:.2e}')} | {t_a:.4f} | {opt(t_b, '{:.4f}')} |")
    if check_rows:
        print("\nThe reference itself: KL(llama.cpp on the F32 file ‖ lowbit on the F32 file), same windows:")
        for name, k in check_rows:
            print(f"- {name}: {k:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
