"""Calibrated quantization against llama.cpp's importance-matrix pipeline (BENCHMARKS.md, calibrated
quantization). Text the methods never see decides: wikitext-2's test split is cut into calibration (the first
40%), validation (40-50%, where the method's constants were chosen) and held-out (from the first article
heading after 50%); a second kind of text is Python source from the standard library.

    python tests/bench/calibrated.py --f16 SmolLM2-135M-f16.gguf --wikitext wikitext-2-test.raw \
        --llama-bin DIR --work /tmp/cal

DIR holds llama-imatrix, llama-quantize and llama-perplexity, built with CMake from the llama.cpp sources
inside llama-cpp-python's sdist. Files readable by llama.cpp are scored by llama-perplexity (perplexity and
KL divergence to the F16 model); NF4, lowbit's own type, by lowbit's perplexity. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

STDLIB = ["argparse.py", "difflib.py", "configparser.py", "textwrap.py", "statistics.py", "fractions.py",
          "calendar.py", "pathlib.py", "inspect.py"]
# (file type, method): method None = llama.cpp's rounding (or lowbit's for NF4); "lc-imatrix" = llama.cpp's
# own importance-matrix pipeline; the rest lowbit's methods. gptq-plain: GPTQ on X^T X alone (mix 0);
# gptq-plain+sink: the same with the attention sink's rows weighted (calibrate.SINK_WEIGHT 0.25).
RUNS = {
    "q4_0": [None, "lc-imatrix", "imatrix", "gptq", "gptq-plain", "gptq-plain+sink", "awq+imatrix", "awq+gptq"],
    "q4_k_m": [None, "lc-imatrix", "imatrix", "gptq"],
    "nf4": [None, "imatrix", "gptq"],
}


def split_wikitext(raw: str) -> tuple[str, str, str]:
    n = len(raw)
    a = raw.rfind("\n", 0, int(0.4 * n)) + 1
    b = raw.find("\n = ", int(0.5 * n)) + 1
    return raw[:a], raw[a:b], raw[b:]


def stdlib_text() -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((root / f).read_text(encoding="utf-8") for f in STDLIB)


def sh(cmd: list[str], log: Path) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}); see {log}")
    return r.stdout + r.stderr


def llama_ppl(bin_dir: Path, model: Path, text: Path, chunks: int, log: Path) -> float:
    out = sh([str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "512", "--chunks",
              str(chunks), "-t", str(os.cpu_count())], log)
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))


def llama_kld(bin_dir: Path, model: Path, base: Path, log: Path) -> float:
    out = sh([str(bin_dir / "llama-perplexity"), "-m", str(model), "--kl-divergence-base", str(base),
              "--kl-divergence", "-t", str(os.cpu_count())], log)
    return float(re.search(r"Mean\s+KLD:\s+([0-9.]+)", out).group(1))


def lowbit_scores(f16: Path, model: Path, texts: dict[str, Path], chunks: int, kl_chunks: int) -> dict:
    """lowbit's perplexity per text and the mean KL divergence to the F16 model's next-token distributions
    (the scored second half of each window, as llama-perplexity's)."""
    import lowbit
    from lowbit.bench import perplexity

    m = lowbit.load(model, n_ctx=512)
    out = {name: perplexity(m, p.read_text(), 512, chunks)["ppl"] for name, p in texts.items()}
    if kl_chunks == 0:
        return out
    ref = lowbit.load(f16, n_ctx=512)
    toks = m.tokenize(texts["held-out"].read_text(), add_bos=False)
    kls = []
    for c in range(kl_chunks):
        w = list(toks[c * 512:(c + 1) * 512])
        lp, lq = (np.asarray(x.logits(w), dtype=np.float64)[256:-1] for x in (ref, m))
        lp -= lp.max(1, keepdims=True)
        lq -= lq.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        lq -= np.log(np.exp(lq).sum(1, keepdims=True))
        kls.append((np.exp(lp) * (lp - lq)).sum(1))
        m.reset()
        ref.reset()
    out["kld"] = float(np.concatenate(kls).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--f16", type=Path, required=True)
    ap.add_argument("--llama-bin", type=Path, required=True)
    ap.add_argument("--wikitext", type=Path, required=True, help="wikitext-2's test split (wikitext-2-test.raw)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lowbit-calibrated"))
    ap.add_argument("--chunks", type=int, default=60, help="perplexity windows of 512 per text")
    ap.add_argument("--kl-chunks", type=int, default=10)
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--types", default=",".join(RUNS))
    args = ap.parse_args()

    import lowbit.calibrate as cal
    import lowbit.converter.calibrated as calq
    from lowbit.converter import quantize_file

    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    calib, valid, held = split_wikitext(args.wikitext.read_text(encoding="utf-8"))
    texts = {"held-out": w / "heldout.txt", "python": w / "python.txt"}
    (w / "calib.txt").write_text(calib)
    (w / "valid.txt").write_text(valid)
    texts["held-out"].write_text(held)
    texts["python"].write_text(stdlib_text())
    lb = args.llama_bin

    t0 = time.perf_counter()
    stats = cal.collect(args.f16, calib, n_tokens=args.calib_tokens, progress=False, dataset="wikitext-2 calib")
    t_collect = time.perf_counter() - t0
    print(f"collect: {stats.n_tokens} tokens in {t_collect:.0f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", flush=True)

    lc_imatrix = w / "lc-imatrix.gguf"
    if not lc_imatrix.exists():
        sh([str(lb / "llama-imatrix"), "-m", str(args.f16), "-f", str(w / "calib.txt"), "-c", "512", "--chunks",
            str(args.calib_tokens // 512), "-o", str(lc_imatrix), "-t", str(os.cpu_count())], w / "imatrix.log")
    kl_base = w / "f16.kld"
    kl_text = w / "kl.txt"
    kl_text.write_text(held[: len(held) * args.kl_chunks // max(args.chunks, 1) + 20000])
    sh([str(lb / "llama-perplexity"), "-m", str(args.f16), "-f", str(kl_text), "-c", "512", "--chunks",
        str(args.kl_chunks), "--kl-divergence-base", str(kl_base), "-t", str(os.cpu_count())], w / "kl-base.log")

    rows = []
    f16_scores = {name: llama_ppl(lb, args.f16, p, args.chunks, w / f"ppl-f16-{name}.log") for name, p in texts.items()}
    rows.append({"file": "F16", "method": "-", **f16_scores, "kld": 0.0, "size": args.f16.stat().st_size})
    f16_lowbit = None
    for typ in args.types.split(","):
        for method in RUNS[typ]:
            out = w / f"{typ}-{method or 'round'}.gguf"
            t0 = time.perf_counter()
            if method is None and typ != "nf4":
                sh([str(lb / "llama-quantize"), str(args.f16), str(out), typ.upper()], w / "quantize.log")
            elif method == "lc-imatrix":
                sh([str(lb / "llama-quantize"), "--imatrix", str(lc_imatrix), str(args.f16), str(out), typ.upper()],
                   w / "quantize.log")
            elif method is None:
                quantize_file(args.f16, out, typ, force=True, progress=False)
            else:
                real = method.replace("-plain+sink", "").replace("-plain", "")
                mix, sink = calq.GPTQ_DIAG_MIX, cal.SINK_WEIGHT
                if "-plain" in method:
                    calq.GPTQ_DIAG_MIX = 0.0
                if "+sink" in method:
                    cal.SINK_WEIGHT = 0.25
                try:
                    quantize_file(args.f16, out, typ, stats=stats, method=real, force=True, progress=False)
                finally:
                    calq.GPTQ_DIAG_MIX, cal.SINK_WEIGHT = mix, sink
            t_q = time.perf_counter() - t0
            if typ == "nf4":
                if f16_lowbit is None:
                    f16_lowbit = lowbit_scores(args.f16, args.f16, texts, args.chunks, 0)
                    rows.append({"file": "F16 (lowbit)", "method": "-", **f16_lowbit, "kld": 0.0,
                                 "size": args.f16.stat().st_size})
                sc = lowbit_scores(args.f16, out, texts, args.chunks, args.kl_chunks)
                scorer = "lowbit"
            else:
                sc = {name: llama_ppl(lb, out, p, args.chunks, w / f"ppl-{out.stem}-{name}.log")
                      for name, p in texts.items()}
                sc["kld"] = llama_kld(lb, out, kl_base, w / f"kld-{out.stem}.log")
                scorer = "llama.cpp"
            row = {"file": typ.upper(), "method": method or "round", **sc, "size": out.stat().st_size,
                   "seconds": round(t_q, 1), "scorer": scorer}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (w / "results.json").write_text(json.dumps({"collect_s": t_collect, "rows": rows}, indent=1))

    print("\n| file | method | held-out ppl | gap closed | python ppl | gap closed | KLD | size (bytes) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next((x for x in rows if x["file"] == r["file"] and x["method"] == "round"), None)
        f16 = f16_lowbit if r["file"] == "NF4" else f16_scores

        def closed(k: str) -> str:
            if base is None or r is base or f16 is None:
                return "-"
            return f"{100 * (base[k] - r[k]) / (base[k] - f16[k]):.0f}%"

        print(f"| {r['file']} | {r['method']} | {r['held-out']:.3f} | {closed('held-out')} | {r['python']:.3f} | "
              f"{closed('python')} | {r['kld']:.4f} | {r['size']} |")


if __name__ == "__main__":
    main()
