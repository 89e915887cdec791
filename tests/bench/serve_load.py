"""Load test: concurrent streaming clients against `lowbit serve` and llama-cpp-python's server, same file,
same thread count, loopback only, bounded in requests and time.

For each level of concurrency (1, 2, 4, 8, 16 clients), every client sends streamed /v1/completions requests
(temperature 0, a fixed number of tokens, distinct prompts) one after another until the level's request
budget is spent; measured: aggregate generated tokens/s over the level's wall time, time to first token
p50/p99, inter-token latency p50/p99 (gaps between streamed chunks), errors.

    python tests/bench/serve_load.py --models smollm2,tiny11b --threads 2 [--engines lowbit,llamacpp]

Needs the server extra (fastapi, uvicorn) and, for the peer, `pip install 'llama-cpp-python[server]'`.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

WORDS = ("the sea fisherman village boat morning evening fox dog capital city river mountain story king "
         "queen garden winter summer light dark road house friend letter music").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: str, path: Path, threads: int, parallel: int, n_ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if engine == "lowbit":
        cmd = [sys.executable, "-m", "lowbit", "serve", "-m", str(path), "--port", str(port), "--parallel",
               str(parallel), "-c", str(n_ctx), "-t", str(threads), "--max-queue", "256"]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port), "--host",
               "127.0.0.1", "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx)]
    # The server's log goes to a file: an unread pipe fills up and stalls a verbose server.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=1):
                return proc, base
        except OSError:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{engine} server exited: {log.read()[-2000:]}")
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{engine} server did not come up")


def one_request(base: str, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("no tokens streamed")
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps)}


def level(base: str, clients: int, requests: int, max_tokens: int, seed: int) -> dict:
    import random

    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(24)) for _ in range(requests)]
    lock = threading.Lock()
    results, errors = [], []

    def client(k: int) -> None:
        while True:
            with lock:
                if not prompts:
                    return
                prompt = prompts.pop()
            try:
                res = one_request(base, prompt, max_tokens)
                with lock:
                    results.append(res)
            except Exception as e:  # noqa: BLE001 - counted
                with lock:
                    errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"clients": clients, "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
            "tokens": sum(r["tokens"] for r in results), "wall_s": wall,
            "tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,tiny11b")
    ap.add_argument("--engines", default="lowbit,llamacpp")
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=16, help="lowbit's --parallel")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from lowbit.hub import default_cache_dir
    from vs_llamacpp import smollm2_files, tiny11b_files

    cache = default_cache_dir()
    files = {"smollm2": ("SmolLM2-135M", lambda: smollm2_files(cache, ("q4_0",))["q4_0"]),
             "tiny11b": ("1.1B-shape", lambda: tiny11b_files(cache, ("q4_0",))["q4_0"])}
    levels = [int(c) for c in args.clients.split(",")]
    out = []
    for key in args.models.split(","):
        label, make = files[key]
        path = make()
        for engine in args.engines.split(","):
            n_ctx = 4096 if engine == "lowbit" else 2048
            proc, base = start(engine, path, args.threads, args.parallel, n_ctx)
            try:
                one_request(base, "warm up", 8)
                for c in levels:
                    r = level(base, c, max(c * args.requests_per_client, 2), args.max_tokens, seed=c)
                    r.update(model=label, engine=engine)
                    out.append(r)
                    print(f"{label} {engine} clients {c}: {r['tok_s']:.1f} tok/s aggregate, TTFT p50 "
                          f"{r['ttft_p50']:.2f} s p99 {r['ttft_p99']:.2f} s, ITL p50 {1e3 * r['itl_p50']:.0f} ms p99 "
                          f"{1e3 * r['itl_p99']:.0f} ms, {r['requests']} requests, errors {r['errors']}",
                          file=sys.stderr, flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    print("\n| model | server | clients | aggregate tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['model']} | {r['engine']} | {r['clients']} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} / "
              f"{r['ttft_p99']:.2f} | {1e3 * r['itl_p50']:.0f} / {1e3 * r['itl_p99']:.0f} | {r['errors']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
