"""Soak run of `lowbit serve`: many requests from concurrent clients with hang-ups and bad requests mixed in.

Checks: the server never dies, every good request is answered (200 and text), every bad one gets a 4xx with an
OpenAI error body, hang-ups free their sequences (slots in use 0 at the end), and resident memory after the run
is within 5% of resident memory after a warm-up (the first 10% of the requests).

    python tests/bench/soak.py [--model smollm2] [--requests 2000] [--clients 8]
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_load import WORDS, start  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post(base: str, body: bytes, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(base + "/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def hang_up(base: str, prompt: str) -> bool:
    """A streamed request whose client closes the connection after the first event."""
    host, port = base.rsplit("//", 1)[1].split(":")
    body = json.dumps({"prompt": prompt, "max_tokens": 200, "temperature": 0.7, "stream": True})
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        seen = b""
        while b"data:" not in seen:  # the headers may come in a packet of their own
            part = s.recv(4096)
            if not part:
                return False
            seen += part
        return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny11b"])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    from lowbit.hub import default_cache_dir
    from vs_llamacpp import smollm2_files, tiny11b_files

    cache = default_cache_dir()
    path = (smollm2_files if args.model == "smollm2" else tiny11b_files)(cache, ("q4_0",))["q4_0"]
    proc, base = start("lowbit", path, args.threads, args.clients, 2048)
    rng = random.Random(0)
    kinds = rng.choices(["good", "good_stream", "hang_up", "bad_json", "bad_value"], [60, 20, 10, 5, 5],
                        k=args.requests)
    counts = {k: 0 for k in ("good_ok", "bad_ok", "hang_ok", "failures")}
    failures: list[str] = []
    lock = threading.Lock()
    todo = list(enumerate(kinds))
    warm_rss = [None]
    t0 = time.time()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i, kind = todo.pop(0)
                if i == args.requests // 10 and warm_rss[0] is None:
                    warm_rss[0] = rss_mib(proc.pid)
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
            try:
                if kind in ("good", "good_stream"):
                    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.7, "seed": i}
                    if kind == "good_stream":
                        body["stream"] = True
                        req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                                     method="POST", headers={"Content-Type": "application/json"})
                        with urllib.request.urlopen(req, timeout=120) as r:
                            ok = r.status == 200 and b"data: [DONE]" in r.read()
                    else:
                        code, payload = post(base, json.dumps(body).encode())
                        ok = code == 200 and payload["choices"][0]["finish_reason"] in ("stop", "length")
                    key = "good_ok"
                elif kind == "hang_up":
                    ok, key = hang_up(base, prompt), "hang_ok"
                else:
                    body = b'{"prompt": "x", ' if kind == "bad_json" else b'{"prompt": "x", "max_tokens": -3}'
                    code, payload = post(base, body)
                    ok, key = code == 400 and "error" in payload, "bad_ok"
            except Exception as e:  # noqa: BLE001 - counted as a failure
                ok, key = False, "failures"
                with lock:
                    failures.append(f"{kind}: {e!r}")
            with lock:
                counts[key if ok else "failures"] += 1
                if not ok and key != "failures":
                    failures.append(f"{kind}: unexpected answer")

    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    time.sleep(1.0)
    alive = proc.poll() is None
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    slots = next(float(x.split()[1]) for x in metrics.splitlines() if x.startswith("lowbit_slots_in_use "))
    end_rss = rss_mib(proc.pid)
    proc.terminate()
    proc.wait(timeout=60)
    growth = (end_rss - warm_rss[0]) / warm_rss[0]
    print(json.dumps({"model": args.model, "requests": args.requests, "clients": args.clients, "wall_s": round(wall, 1),
                      "kinds": {k: kinds.count(k) for k in set(kinds)}, "counts": counts,
                      "failures": failures[:10], "server_alive": alive, "slots_in_use_after": slots,
                      "rss_after_warmup_mib": round(warm_rss[0], 1), "rss_end_mib": round(end_rss, 1),
                      "rss_growth": round(growth, 4)}, indent=1))
    ok = alive and counts["failures"] == 0 and slots == 0 and growth < 0.05
    print("SOAK " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
