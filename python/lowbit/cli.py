"""The `lowbit` command line: convert, quantize, run, chat, bench, perplexity, inspect, info, demo."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import lowbit

log = logging.getLogger("lowbit")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# ---- model options shared by run / chat / bench / perplexity ---------------------------------------


def _int_at_least(lo: int, what: str):
    """argparse type: an integer >= lo, with a message in the command line's words."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{what} must be at least {lo}, got {value}")
        return value
    return parse


def _add_model_args(p: argparse.ArgumentParser, model_positional: bool = True, kv_type: str = "f32") -> None:
    if model_positional:
        p.add_argument("model_pos", nargs="?", metavar="MODEL", help="GGUF file")
    p.add_argument("-m", "--model", help="GGUF file (same as the positional MODEL)")
    p.add_argument("-c", "--ctx-size", type=_int_at_least(0, "-c"), default=0,
                   help="context length (0: the file's, at most 4096)")
    p.add_argument("-t", "--threads", type=_int_at_least(1, "-t"), default=None,
                   help="CPU threads (default: the physical cores)")
    p.add_argument("-ngl", "--n-gpu-layers", type=_int_at_least(-1, "-ngl"), default=0,
                   help="transformer blocks to offload to the CUDA GPU (-1: all; needs a CUDA build)")
    p.add_argument("-b", "--batch-size", type=_int_at_least(1, "-b"), default=512,
                   help="prompt tokens evaluated per batch")
    p.add_argument("--kv-type", choices=("f16", "f32"), default=kv_type,
                   help=f"KV cache element type (default {kv_type}; f16 halves its memory and the bytes attention reads)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the repeat penalty looks back over (-1: all)")
    p.add_argument("-s", "--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the reply at this text (not printed); may be given several times")
    p.add_argument("--context-shift", action="store_true",
                   help="when the context fills, drop the older half of it and go on (default: stop)")
    p.add_argument("--keep", type=int, default=0, metavar="N",
                   help="with --context-shift: prompt tokens always kept at the start (-1: the whole prompt)")


def _model_path(args: argparse.Namespace) -> str:
    path = args.model or getattr(args, "model_pos", None)
    if not path:
        raise SystemExit("lowbit: no model given (use -m FILE.gguf)")
    return path


def _load(args: argparse.Namespace):
    if args.n_gpu_layers != 0 and not lowbit.cuda_info()["compiled"]:
        raise lowbit.LowbitError(f"-ngl {args.n_gpu_layers} needs a GPU, but this lowbit was built without CUDA; "
                                 "drop -ngl (or rebuild with nvcc on PATH)")
    return lowbit.load(_model_path(args), n_ctx=args.ctx_size, n_threads=args.threads,
                       n_gpu_layers=args.n_gpu_layers, n_batch=args.batch_size,
                       seed=getattr(args, "seed", None), kv_f16=args.kv_type == "f16")


def _sampling(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
                stop=args.stop, context_shift=args.context_shift, n_keep=args.keep)


def _report_length_stop(model, n_predict: int, file=None) -> None:
    """Say so when a reply ended because the context was full (not at its end or at -n)."""
    t = getattr(model, "last_timings", None) or {}
    if getattr(model, "last_finish_reason", None) == "length" and t.get("generated_tokens", 0) != n_predict:
        print(f"[stopped: the context of {model.n_ctx} tokens is full; use -c to enlarge it or --context-shift]",
              file=file or sys.stderr)


def _print_timings(model, file=None) -> None:
    file = file or sys.stderr
    t = getattr(model, "last_timings", None)
    if not t:
        return
    pp = t["prompt_tokens"] / t["prompt_seconds"] if t.get("prompt_seconds") else float("nan")
    tg = t["generated_tokens"] / t["generate_seconds"] if t.get("generate_seconds") else float("nan")
    print(f"\nprompt: {t['prompt_tokens']} tokens in {t['prompt_seconds']*1e3:.1f} ms ({pp:.1f} tokens/s)", file=file)
    print(f"generation: {t['generated_tokens']} tokens in {t['generate_seconds']*1e3:.1f} ms ({tg:.1f} tokens/s)",
          file=file)


# ---- subcommands -------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    model = _load(args)
    prompt = args.prompt
    if args.file:
        prompt = Path(args.file).read_text(encoding="utf-8")
    if prompt is None:
        raise SystemExit("lowbit run: give a prompt with -p TEXT or -f FILE")
    if not prompt.strip():
        raise lowbit.LowbitError("the prompt is empty; give some text with -p TEXT or -f FILE")
    if not args.no_echo:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    for piece in model.generate(prompt, max_new_tokens=args.n_predict, stream=True, **_sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _report_length_stop(model, args.n_predict)
    _print_timings(model)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    texts = list(args.prompt or [])
    if args.file:
        texts += [line for line in Path(args.file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise SystemExit("lowbit embed: give texts with -p TEXT (repeatable) or -f FILE (one per line)")
    model = _load(args)
    vectors = model.embed(texts, pooling=args.pooling, normalize=not args.no_normalize)
    json.dump([[round(float(x), 7) for x in v] for v in vectors], sys.stdout)
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model = _load(args)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    one_shot = args.prompt is not None
    print("lowbit chat: type a message; an empty line or Ctrl-D quits.", file=sys.stderr) if not one_shot else None
    while True:
        if one_shot:
            text = args.prompt
        else:
            try:
                text = input("> ")
            except EOFError:
                break
            if not text.strip():
                break
        messages.append({"role": "user", "content": text})
        reply = []
        try:
            for piece in model.chat(messages, max_new_tokens=args.n_predict, stream=True, **_sampling(args)):
                sys.stdout.write(piece)
                sys.stdout.flush()
                reply.append(piece)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        _report_length_stop(model, args.n_predict)
        _print_timings(model)  # after each reply, as llama.cpp's chat prints its speeds
        if one_shot:
            break
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    f = lowbit.GGUFFile(args.file)
    md = f.metadata
    mix = _type_mix(f)
    if args.json:
        out = {"metadata": {k: v for k, v in md.items() if args.full or not _is_bulky(v)},
               "tensors": [{"name": t.name, "type": _type_name(t.qtype), "shape": list(t.shape),
                            "nbytes": t.nbytes, "offset": t.offset} for t in f.tensors],
               "summary": mix}
        print(json.dumps(out, indent=1, default=str))
        return 0
    print(f"{args.file}: GGUF v{f.version}, {len(md)} metadata keys, {len(f.tensors)} tensors, "
          f"alignment {f.alignment}")
    print("\nmetadata:")
    for k, v in md.items():
        print(f"  {k} = {_short(v, args.full)}")
    print("\ntensors:")
    for t in f.tensors:
        print(f"  {t.name:<36} {_type_name(t.qtype):<7} {str(list(t.shape)):<20} {_human_bytes(t.nbytes):>11}")
    print()
    for name, row in mix["types"].items():
        print(f"type {name + ':':<7} {row['tensors']:4d} tensors, {_human_bytes(row['bytes']):>11}")
    if mix["file_type"] is not None:
        print(f"file type = {mix['file_type']}")
    print(f"file size = {_human_bytes(mix['file_size'])}, tensor data {_human_bytes(mix['tensor_bytes'])} "
          f"({mix['bpw']:.2f} BPW)")
    print(f"matrices  = {_human_bytes(mix['matrix_bytes'])} ({mix['matrix_bpw']:.2f} BPW over "
          f"{mix['matrix_elements']:,} weights)")
    return 0


def _type_mix(f) -> dict:
    """The type mix of a GGUF file, as llama.cpp's loader reports it: tensors and bytes per type (most bytes
    first), the file type, and bits per weight over all tensors and over the matrices (2-D and up)."""
    from .converter.ftype import FILE_TYPES
    from .converter.plan import LOWBIT_OUTTYPES

    types: dict[str, dict[str, int]] = {}
    n_all = bytes_all = n_mat = bytes_mat = 0
    for t in f.tensors:
        row = types.setdefault(_type_name(t.qtype), {"tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += t.nbytes
        n_all += t.n_elements
        bytes_all += t.nbytes
        if sum(d > 1 for d in t.shape) >= 2:
            n_mat += t.n_elements
            bytes_mat += t.nbytes
    file_type = None
    fid = f.metadata.get("general.file_type")
    if isinstance(fid, int):
        names = {ft.ftype_id: ft.name for ft in FILE_TYPES.values()}
        names.update({int(q): name for name, q in LOWBIT_OUTTYPES.items()})
        file_type = f"{names[fid]} ({fid})" if fid in names else f"id {fid}"
    return {"types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])), "file_type": file_type,
            "file_size": f.file_size, "tensor_bytes": bytes_all, "n_elements": n_all,
            "bpw": 8 * bytes_all / n_all if n_all else 0.0, "matrix_bytes": bytes_mat, "matrix_elements": n_mat,
            "matrix_bpw": 8 * bytes_mat / n_mat if n_mat else 0.0}


def _type_name(qtype) -> str:
    try:
        return lowbit.quants.type_info(int(qtype)).name
    except lowbit.LowbitError:  # unknown to the table: print the id
        return str(int(qtype))


def _is_bulky(v) -> bool:
    return (isinstance(v, list) and len(v) > 64) or (isinstance(v, str) and len(v) > 4096)


def _short(v, full: bool) -> str:
    if full:
        return repr(v)
    if isinstance(v, list):
        head = ", ".join(repr(x) for x in v[:6])
        return f"[{head}{', ...' if len(v) > 6 else ''}] ({len(v)} items)"
    if isinstance(v, str) and len(v) > 120:
        return repr(v[:100]) + f"... ({len(v)} chars)"
    return repr(v)


def cmd_info(args: argparse.Namespace) -> int:
    info = lowbit.build_info()
    cuda = lowbit.cuda_info()
    print(f"lowbit {lowbit.__version__}")
    print(f"CPU ISAs compiled:  {', '.join(info['cpu_isas_compiled'])}")
    print(f"CPU ISAs runnable:  {', '.join(info['cpu_isas_runnable'])}")
    print(f"CPU ISA in use:     {info.get('cpu_isa_active') or info.get('cpu_isa_error')}"
          + ("  (forced by LOWBIT_ISA)" if os.environ.get("LOWBIT_ISA") else ""))
    if info.get("cpu_isa_active"):
        # Which ISA's kernels serve each tensor type: "generic" marks a fallback where the active ISA has none.
        print("CPU kernels per type (dot / quantizer / load-time panels):")
        for name, dot, quant, panel, _gemm in lowbit._core.type_kernels():
            print(f"  {name:7s} {dot:8s} {quant:8s} {'panels' if panel else '-'}")
    print(f"CUDA backend:       {'compiled in' if cuda['compiled'] else 'absent from this build'}")
    for d in cuda["devices"]:
        cc = ".".join(str(x) for x in d["compute_capability"])
        print(f"  GPU {d['index']}: {d['name']} (sm_{cc.replace('.', '')}), "
              f"{_human_bytes(d['free_memory'])} free of {_human_bytes(d['total_memory'])}")
    if not cuda["devices"]:
        print(f"  no GPU: {cuda['error']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_model

    t0 = time.perf_counter()
    model = _load(args)
    load_s = time.perf_counter() - t0
    result = bench_model(model, n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions)
    print(f"model: {_model_path(args)}")
    print(f"threads: {result['threads']}, n_gpu_layers: {args.n_gpu_layers}, CPU kernels: "
          f"{lowbit.build_info().get('cpu_isa_active')}")
    print(f"load: {load_s:.3f} s")
    print(f"prompt  pp{args.n_prompt}: {result['pp_median']:.1f} tokens/s (median of {args.repetitions})")
    print(f"decode  tg{args.n_gen}: {result['tg_median']:.1f} tokens/s (median of {args.repetitions})")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from .bench import perplexity

    model = _load(args)
    text = Path(args.file).read_text(encoding="utf-8")
    res = perplexity(model, text, n_ctx=args.ppl_ctx, max_chunks=args.chunks, progress=True)
    print(f"perplexity: {res['ppl']:.4f} +/- {res['ppl_stderr']:.4f} over {res['n_tokens']} scored tokens "
          f"({res['n_chunks']} windows of {args.ppl_ctx})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .server import create_app
    except ImportError as e:
        raise lowbit.LowbitError(f"`lowbit serve` needs the server extra ({e}); pip install 'lowbit[server]'") from None
    from .batch import BatchEngine

    if args.n_gpu_layers != 0 and args.parallel > 1:
        raise lowbit.LowbitError("--parallel > 1 runs on the CPU only for now; pass -ngl 0 or --parallel 1")
    path = _model_path(args)
    engine = BatchEngine(path, n_seq=args.parallel, n_ctx=args.ctx_size, n_threads=args.threads,
                         n_batch=args.batch_size, kv_f16=args.kv_type == "f16")
    app = create_app(engine, model_name=Path(path).name, api_key=args.api_key, max_queue=args.max_queue)
    print(f"lowbit: serving {Path(path).name} on http://{args.host}:{args.port}/v1 ({args.parallel} sequences)",
          file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, lets running requests finish, then shuts down.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(question=args.question, n_threads=args.threads, max_new_tokens=args.n_predict,
                    cache_dir=Path(args.cache_dir) if args.cache_dir else None)


# ---- parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log what happens (chat: print timings)")
    parser = argparse.ArgumentParser(prog="lowbit", description="Run quantized LLaMA-family GGUF models.",
                                     parents=[common])
    parser.add_argument("--version", action="version", version=f"lowbit {lowbit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_parser = sub.add_parser

    def add_parser(name: str, **kw) -> argparse.ArgumentParser:
        return _add_parser(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    from . import converter as convert_mod

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint directory to GGUF")
    convert_mod.add_convert_args(p)
    p.set_defaults(func=lambda a: convert_mod.run_convert_args(a))

    p = sub.add_parser("quantize", help="quantize a GGUF file (lowbit's or llama.cpp's) to q4_k_m, q6_k, ... or nf4")
    convert_mod.add_quantize_args(p)
    p.set_defaults(func=lambda a: convert_mod.run_quantize_args(a))

    p = sub.add_parser("run", help="generate text from a prompt")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("-p", "--prompt", help="prompt text")
    p.add_argument("-f", "--file", help="read the prompt from a file")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (-1: until the end of text or the context)")
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat using the file's chat template (streaming)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", help="system message")
    p.add_argument("-p", "--prompt", help="ask one question and exit")
    p.add_argument("-n", "--n-predict", type=int, default=256, help="max tokens per reply (-1: no limit)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("embed", help="embeddings of texts (pooled final hidden states), printed as JSON")
    _add_model_args(p)
    p.add_argument("-p", "--prompt", action="append", help="a text to embed (repeatable)")
    p.add_argument("-f", "--file", help="texts to embed, one per line")
    p.add_argument("--pooling", choices=("mean", "last", "cls"), default="mean")
    p.add_argument("--no-normalize", action="store_true", help="keep the vectors' lengths (default: unit length)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("bench", help="prompt and decode tokens/s")
    _add_model_args(p)
    p.add_argument("-p", "--n-prompt", type=int, default=128)
    p.add_argument("-n", "--n-gen", type=int, default=64)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _add_model_args(p, kv_type="f16")  # as llama.cpp's server: n_seq caches, so half the memory
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-np", "--parallel", type=int, default=4, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a sequence (503 past it)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("perplexity", help="perplexity over a text file (windows of n_ctx, second half scored)")
    _add_model_args(p)
    p.add_argument("-f", "--file", required=True, help="text file, e.g. wikitext-2 test")
    p.add_argument("--ppl-ctx", type=int, default=512, help="window length")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many windows")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("inspect", help="print a GGUF file's metadata, tensor table, type mix and bits per weight")
    p.add_argument("file")
    p.add_argument("--full", action="store_true", help="print long arrays and strings whole")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("info", help="build information: CPU ISAs, CUDA")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="fetch SmolLM2-135M-Instruct, convert to Q4_0 and NF4, chat with both")
    p.add_argument("-q", "--question", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("-n", "--n-predict", type=int, default=64)
    p.add_argument("--cache-dir", default=None, help="where the model files go (default ~/.cache/lowbit)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    func: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "func", None)
    # `lowbit inspect FILE | head` must end quietly, not with a traceback.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL) if hasattr(signal, "SIGPIPE") else None
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except lowbit.LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nlowbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
