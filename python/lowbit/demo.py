"""`lowbit demo`: fetch SmolLM2-135M-Instruct, make Q4_0 and NF4 files with lowbit, answer a question with each."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("lowbit.demo")


def _human_mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run_demo(question: str, n_threads: Optional[int] = None, max_new_tokens: int = 64,
             cache_dir: Optional[Path] = None) -> int:
    import lowbit
    from lowbit.converter import quantize_file
    from lowbit.hub import default_cache_dir, fetch_smollm2

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    print("lowbit demo: SmolLM2-135M-Instruct (llama architecture, 30 layers)")
    source = fetch_smollm2(cache)
    print(f"  source file (llama.cpp, Q4_1 + Q8_0 embedding): {source} ({_human_mib(source.stat().st_size)})")
    print("  (the only source at hand is already 4-bit, so the Q4_0 and NF4 files below are quantized twice and "
          "lose a little more than a conversion from the original weights would)")

    outputs = []
    for qtype in ("q4_0", "nf4"):
        out = cache / f"SmolLM2-135M-Instruct.{qtype.upper()}.lowbit.gguf"
        if not out.exists():
            t0 = time.perf_counter()
            # The tied embedding doubles as the output head: keep it at 8 bits, as llama.cpp keeps its
            # output tensor above the body's precision.
            quantize_file(source, out, qtype, keep={"token_embd.weight": "q8_0"}, progress=False,
                          allow_requantize=True)
            print(f"  converted to {qtype.upper()} in {time.perf_counter() - t0:.1f} s: {out.name} "
                  f"({_human_mib(out.stat().st_size)})")
        else:
            print(f"  {qtype.upper()} file (cached): {out.name} ({_human_mib(out.stat().st_size)})")
        outputs.append((qtype, out))

    for qtype, path in outputs:
        t0 = time.perf_counter()
        model = lowbit.load(path, n_threads=n_threads, n_ctx=1024)
        load_s = time.perf_counter() - t0
        print(f"\n[{qtype.upper()}] loaded in {load_s * 1e3:.0f} ms; user: {question}")
        sys.stdout.write("assistant: ")
        for piece in model.chat([{"role": "user", "content": question}], max_new_tokens=max_new_tokens,
                                temperature=0.0, stream=True):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        t = model.last_timings
        pp = t["prompt_tokens"] / t["prompt_seconds"] if t["prompt_seconds"] > 0 else float("nan")
        tg = t["generated_tokens"] / t["generate_seconds"] if t["generate_seconds"] > 0 else float("nan")
        fp = model.memory_footprint()
        print(f"  prompt {t['prompt_tokens']} tokens at {pp:.0f} tokens/s, generated {t['generated_tokens']} "
              f"tokens at {tg:.1f} tokens/s; file {_human_mib(path.stat().st_size)}, "
              f"KV cache {_human_mib(fp['kv'])}")
        model.close()
    return 0
