"""GPU benchmark: decode / prompt tokens/s of random 1.1B- and 7B-shaped Q4_0 and NF4 models with every
block (and the output head) on the GPU, device copy bandwidth and the share of it decode achieves, a
partial-offload curve (tokens/s vs n_gpu_layers), and transformers bf16 generate on the same GPU.

    LOWBIT_CORE_DIR=build/dev-cuda PYTHONPATH=python python tests/bench/gpu.py [--shapes 1.1b,7b] [--json out.json]
        [--archs llama,qwen2,qwen3,gemma3] [--models a.gguf,b.gguf]

--archs runs the random shapes as each architecture's block (qwen2's q/k/v biases, qwen3's q/k head norms and
neox RoPE, gemma3's post-norms, GELU gate and sliding window of 1024 on five blocks of six), so the cost of
those ops shows next to llama's. --models times real GGUF files of any architecture lowbit runs, every block
and the head on the GPU. Weights are random block bytes (finite scales): speed does not depend on the values.
Never pass/fail.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

import lowbit
from lowbit import QType, _core
from lowbit.bench import bench_model

log = logging.getLogger("bench.gpu")


@dataclass
class Shape:
    name: str
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_layer: int
    n_vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


SHAPES = {
    "1.1b": Shape("1.1B (TinyLlama)", 2048, 32, 4, 5632, 22),
    "7b": Shape("7B (LLaMA-2)", 4096, 32, 32, 11008, 32),
}

BLOCK_BYTES = {"Q4_0": (32, 18), "NF4": (64, 36), "Q8_0": (32, 34)}


@dataclass
class ArchOps:
    """What an architecture's block adds to llama's (the backend's optional vectors and config)."""
    bias: bool = False
    qk_norm: bool = False
    neox: bool = False
    gelu: bool = False
    post_norms: bool = False
    window: int = 0        # sliding blocks attend to this many positions
    swa_pattern: int = 0   # every swa_pattern-th block is global, the others slide


ARCHS = {
    "llama": ArchOps(),
    "qwen2": ArchOps(bias=True, neox=True),
    "qwen3": ArchOps(qk_norm=True, neox=True),
    "gemma3": ArchOps(qk_norm=True, neox=True, gelu=True, post_norms=True, window=1024, swa_pattern=6),
}


def random_matrix(qtype: str, n_rows: int, n_cols: int, rng: np.random.Generator) -> tuple:
    """(qtype, raw bytes, n_rows, n_cols) of random blocks with small finite scales."""
    block, size = BLOCK_BYTES[qtype]
    nb = n_rows * n_cols // block
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    if qtype == "NF4":
        raw[:, :4] = np.full(nb, 0.02, np.float32).view(np.uint8).reshape(nb, 4)
    else:
        raw[:, :2] = np.full(nb, 0.002, np.float16).view(np.uint8).reshape(nb, 2)
    return (QType[qtype], raw.reshape(-1), n_rows, n_cols)


def layer_weights(s: Shape, qtype: str, rng: np.random.Generator, ops: ArchOps = ArchOps()) -> dict[str, Any]:
    qd, kvd = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    w: dict[str, Any] = {
        "attn_norm": np.ones(s.n_embd, np.float32), "ffn_norm": np.ones(s.n_embd, np.float32),
        "wq": random_matrix(qtype, qd, s.n_embd, rng), "wk": random_matrix(qtype, kvd, s.n_embd, rng),
        "wv": random_matrix(qtype, kvd, s.n_embd, rng), "wo": random_matrix(qtype, s.n_embd, qd, rng),
        "w_gate": random_matrix(qtype, s.n_ff, s.n_embd, rng), "w_up": random_matrix(qtype, s.n_ff, s.n_embd, rng),
        "w_down": random_matrix(qtype, s.n_embd, s.n_ff, rng),
    }
    if ops.bias:
        w.update(bq=np.zeros(qd, np.float32), bk=np.zeros(kvd, np.float32), bv=np.zeros(kvd, np.float32))
    if ops.qk_norm:
        w.update(q_norm=np.ones(s.head_dim, np.float32), k_norm=np.ones(s.head_dim, np.float32))
    if ops.post_norms:
        w.update(attn_post_norm=np.ones(s.n_embd, np.float32), ffn_post_norm=np.ones(s.n_embd, np.float32))
    return w


def backend_config(s: Shape, matvec: str, n_ctx: int, ops: ArchOps = ArchOps()) -> dict[str, Any]:
    cfg: dict[str, Any] = {"n_embd": s.n_embd, "n_head": s.n_head, "n_head_kv": s.n_head_kv, "head_dim": s.head_dim,
                           "n_ff": s.n_ff, "n_ctx": n_ctx, "rms_eps": 1e-5, "rope_freq_base": 10000.0,
                           "matvec": matvec, "rope_mode": "neox" if ops.neox else "normal",
                           "act": "gelu_tanh" if ops.gelu else "silu"}
    if ops.window:
        i = np.arange(s.head_dim // 2, dtype=np.float64)
        cfg["rope_inv_freq_swa"] = (10000.0 ** (-2.0 * i / s.head_dim)).astype(np.float32)
    return cfg


def sliding(ops: ArchOps, layer: int) -> bool:
    return ops.window > 0 and ops.swa_pattern > 0 and layer % ops.swa_pattern < ops.swa_pattern - 1


def weight_bytes(w: dict[str, Any]) -> int:
    return sum(len(v[1]) if isinstance(v, tuple) else v.nbytes for v in w.values())


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_backend(s: Shape, qtype: str, matvec: str, n_prompt: int, n_decode: int, bandwidth: float,
                  n_ctx: int = 1024, arch: str = "llama") -> dict[str, Any]:
    rng = np.random.default_rng(0)
    ops = ARCHS[arch]
    be = _core.cuda.Backend(backend_config(s, matvec, n_ctx, ops), n_batch=512)
    w = layer_weights(s, qtype, rng, ops)  # one host copy, uploaded n_layer times (speed is value-independent)
    t0 = time.perf_counter()
    for layer in range(s.n_layer):
        if sliding(ops, layer):
            be.add_layer(w, window=ops.window, rope_table=1)
        else:
            be.add_layer(w)
    out = random_matrix(qtype, s.n_vocab, s.n_embd, rng)
    be.set_output(np.ones(s.n_embd, np.float32), out)
    upload_s = time.perf_counter() - t0
    x_prompt = (rng.standard_normal((n_prompt, s.n_embd)) * 0.1).astype(np.float32)

    def prompt():
        be.truncate(0)
        h = be.forward(x_prompt, 0)
        be.output(h[-1:])

    prompt()  # warm-up
    t_prompt = median_time(prompt, 3)

    x1 = (rng.standard_normal((1, s.n_embd)) * 0.1).astype(np.float32)

    def decode():
        be.truncate(n_prompt)
        for i in range(n_decode):
            h = be.forward(x1, n_prompt + i)
            be.output(h)

    decode()
    t_decode = median_time(decode, 3) / n_decode
    model_bytes = weight_bytes(w) * s.n_layer + len(out[1])
    # Bytes a decode step must read: all weights plus the fp16 K/V of ~n_prompt + n_decode/2 positions.
    kv_read = s.n_layer * 2 * (n_prompt + n_decode // 2) * s.n_head_kv * s.head_dim * 2
    achieved = (model_bytes + kv_read) / t_decode
    return {
        "shape": s.name, "arch": arch, "qtype": qtype, "matvec": matvec, "model_GiB": model_bytes / 2**30,
        "device_GiB": be.device_bytes / 2**30, "upload_s": upload_s,
        f"pp{n_prompt}_tok_s": n_prompt / t_prompt, "tg_tok_s": 1.0 / t_decode,
        "tg_GB_s": achieved / 1e9, "tg_pct_of_copy_bw": 100.0 * achieved / bandwidth,
    }


def write_q4_0_gguf(path: Path, s: Shape) -> Optional[Path]:
    """A random Q4_0 llama GGUF (gguf-py writer) for the model-level offload curve."""
    try:
        import gguf
    except ImportError:
        return None
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(2048)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(s.n_vocab)])
    w.add_token_merges([])
    q4 = gguf.GGMLQuantizationType.Q4_0

    def add(name: str, rows: int, cols: int) -> None:
        raw = random_matrix("Q4_0", rows, cols, rng)[1].reshape(rows, cols // 32 * 18)
        w.add_tensor(name, raw, raw_dtype=q4)

    add("token_embd.weight", s.n_vocab, s.n_embd)
    w.add_tensor("output_norm.weight", np.ones(s.n_embd, np.float32))
    add("output.weight", s.n_vocab, s.n_embd)
    qd, kvd = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    for i in range(s.n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(s.n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(s.n_embd, np.float32))
        add(f"blk.{i}.attn_q.weight", qd, s.n_embd)
        add(f"blk.{i}.attn_k.weight", kvd, s.n_embd)
        add(f"blk.{i}.attn_v.weight", kvd, s.n_embd)
        add(f"blk.{i}.attn_output.weight", s.n_embd, qd)
        add(f"blk.{i}.ffn_gate.weight", s.n_ff, s.n_embd)
        add(f"blk.{i}.ffn_up.weight", s.n_ff, s.n_embd)
        add(f"blk.{i}.ffn_down.weight", s.n_embd, s.n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _model_rates(m, n_prompt: int, n_decode: int) -> tuple[float, float]:
    """Median prompt and decode tokens/s of a loaded model, as `lowbit bench` measures them (lowbit.bench: a
    warm-up, then fresh random prompts, decode steps that each evaluate one new token)."""
    bench_model(m, n_prompt=n_prompt, n_gen=2, repetitions=1)  # warm-up
    r = bench_model(m, n_prompt=n_prompt, n_gen=n_decode, repetitions=3)
    return r["pp_median"], r["tg_median"]


def offload_curve(s: Shape, n_prompt: int, n_decode: int, threads: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_q4_0_gguf(Path(tmp) / "random-q4_0.gguf", s)
        if path is None:
            log.warning("offload curve skipped: the gguf package is not installed")
            return rows
        points = sorted({0, 1, s.n_layer // 4, s.n_layer // 2, 3 * s.n_layer // 4, s.n_layer, s.n_layer + 1})
        for ngl in points:
            try:
                m = lowbit.load(path, n_gpu_layers=ngl, n_threads=threads, n_ctx=n_prompt + n_decode + 8)
            except lowbit.LowbitError as e:
                log.warning("offload curve stopped at n_gpu_layers=%d: %s", ngl, e)
                break
            with m:
                pp, tg = _model_rates(m, n_prompt, n_decode)
            rows.append({"n_gpu_layers": ngl, f"pp{n_prompt}_tok_s": pp, "tg_tok_s": tg})
            log.info("n_gpu_layers=%d: %s", ngl, rows[-1])
    return rows


def bench_model_files(paths: list[Path], n_prompt: int, n_decode: int, threads: int) -> list[dict[str, Any]]:
    """Prompt and decode tokens/s of GGUF files with every block and the head on the GPU (n_gpu_layers=-1)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            m = lowbit.load(path, n_gpu_layers=-1, n_threads=threads, n_ctx=n_prompt + n_decode + 8)
        except lowbit.LowbitError as e:
            log.warning("%s: not benchmarked: %s", path, e)
            continue
        with m:
            pp, tg = _model_rates(m, n_prompt, n_decode)
            rows.append({"model": str(path), "arch": m.config.architecture, "n_layer": m.config.n_layer,
                         f"pp{n_prompt}_tok_s": pp, "tg_tok_s": tg})
        log.info("%s", rows[-1])
    return rows


def bench_transformers(s: Shape, n_prompt: int, n_decode: int) -> Optional[dict[str, Any]]:
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    if not torch.cuda.is_available():
        log.warning("transformers baseline skipped: torch has no CUDA here")
        return None
    cfg = LlamaConfig(vocab_size=s.n_vocab, hidden_size=s.n_embd, intermediate_size=s.n_ff,
                      num_hidden_layers=s.n_layer, num_attention_heads=s.n_head, num_key_value_heads=s.n_head_kv,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(3, s.n_vocab, (1, n_prompt), device="cuda")
    with torch.no_grad():
        model(ids)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids)
        torch.cuda.synchronize()
        t_pp = time.perf_counter() - t0
        model.generate(ids, do_sample=False, max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, do_sample=False, max_new_tokens=n_decode, min_new_tokens=n_decode, pad_token_id=0)
        torch.cuda.synchronize()
        t_gen = time.perf_counter() - t0
    result = {"shape": s.name, "impl": "transformers bf16", f"pp{n_prompt}_tok_s": n_prompt / t_pp,
              "tg_tok_s": n_decode / max(t_gen - t_pp, 1e-9)}
    del model
    torch.cuda.empty_cache()
    return result


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1.1b,7b")
    p.add_argument("--qtypes", default="Q4_0,NF4")
    p.add_argument("--archs", default="llama", help=f"blocks of these architectures ({','.join(ARCHS)})")
    p.add_argument("--models", default="", help="comma-separated GGUF files to time with n_gpu_layers=-1")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--threads", type=int, default=8, help="CPU threads for the partial-offload curve")
    p.add_argument("--no-curve", action="store_true")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    info = lowbit.cuda_info()
    if not info["compiled"] or not info["devices"]:
        print(f"no GPU benchmark: {info['error']}")
        return 0
    dev = info["devices"][0]
    bw = _core.cuda.copy_bandwidth(1 << 30, 10)
    print(f"GPU: {dev['name']} ({dev['total_memory'] / 2**30:.0f} GiB); device copy bandwidth "
          f"(read+write) {bw / 1e9:.0f} GB/s")
    results: dict[str, Any] = {"device": dev["name"], "copy_bw_GB_s": bw / 1e9, "backend": [], "curve": {},
                               "transformers": [], "models": []}
    archs = args.archs.split(",")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        p.error(f"unknown --archs {unknown}; choose from {list(ARCHS)}")
    for key in args.shapes.split(","):
        s = SHAPES[key]
        for arch, qtype in ((a, q) for a in archs for q in args.qtypes.split(",")):
            for matvec in ("int8", "float"):
                r = bench_backend(s, qtype, matvec, args.prompt, args.decode, bw, arch=arch)
                results["backend"].append(r)
                print(f"{s.name:18s} {arch:6s} {qtype:5s} matvec={matvec:5s} pp{args.prompt} "
                      f"{r[f'pp{args.prompt}_tok_s']:8.0f} tok/s  tg {r['tg_tok_s']:7.1f} tok/s  "
                      f"({r['tg_GB_s']:.0f} GB/s, {r['tg_pct_of_copy_bw']:.0f}% of copy bw)  "
                      f"model {r['model_GiB']:.2f} GiB")
        if not args.no_transformers:
            t = bench_transformers(s, args.prompt, args.decode)
            if t:
                results["transformers"].append(t)
                print(f"{s.name:18s} transformers bf16: pp{args.prompt} {t[f'pp{args.prompt}_tok_s']:8.0f} tok/s  "
                      f"tg {t['tg_tok_s']:7.1f} tok/s")
    if args.models:
        results["models"] = bench_model_files([Path(m) for m in args.models.split(",")], args.prompt, args.decode,
                                              args.threads)
        for r in results["models"]:
            print(f"{r['model']} ({r['arch']}, {r['n_layer']} blocks): pp{args.prompt} "
                  f"{r[f'pp{args.prompt}_tok_s']:8.0f} tok/s  tg {r['tg_tok_s']:7.1f} tok/s")
    if not args.no_curve:
        s = SHAPES["1.1b"]
        rows = offload_curve(s, min(args.prompt, 128), min(args.decode, 16), args.threads)
        results["curve"] = {"shape": s.name, "qtype": "Q4_0", "threads": args.threads, "rows": rows}
        for r in rows:
            print(f"  n_gpu_layers={r['n_gpu_layers']:3d}: pp {r[f'pp{min(args.prompt, 128)}_tok_s']:8.1f} tok/s  "
                  f"tg {r['tg_tok_s']:7.1f} tok/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
