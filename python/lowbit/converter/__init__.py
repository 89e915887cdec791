"""Hugging Face -> GGUF conversion (`lowbit convert`, `python convert.py`) and GGUF quantization (`lowbit quantize`).

    import lowbit
    lowbit.convert("SmolLM2-135M-Instruct/", "smollm2-q4_0.gguf", outtype="q4_0", keep={"output": "q8_0"})
    lowbit.quantize_file("smollm2-f16.gguf", "smollm2-q4_k_m.gguf", "q4_k_m")
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from .._core import LowbitError
from .core import convert, quantize_file
from .core import convert as convert_checkpoint

__all__ = ["convert", "quantize_file", "convert_calibrated", "main", "quantize_main", "add_convert_args",
           "add_quantize_args", "run_convert_args", "run_quantize_args"]


def _type_help(parser: argparse.ArgumentParser) -> None:
    from .plan import outtype_table

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("TYPE, its general.file_type id, size. llama.cpp's file types get llama-quantize's per-tensor "
                     "mix;\nlowbit's own (nf4, nf4_dq, fp4) go on every matrix.\n" + outtype_table())


def add_convert_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `lowbit convert` / `python convert.py`."""
    parser.add_argument("hf_dir", type=Path, help="Hugging Face checkpoint directory (config.json, *.safetensors or "
                                                  "pytorch_model*.bin, tokenizer files)")
    parser.add_argument("--outtype", default="f16", metavar="TYPE",
                        help="file type: f16 (default), q8_0, q4_k_m, ... or nf4 (listed below; norms stay f32)")
    parser.add_argument("-o", "--outfile", type=Path, default=None,
                        help="output .gguf (default: HF_DIR/<name>-<outtype>.gguf)")
    _add_common(parser)
    _type_help(parser)
    return parser


def add_quantize_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `lowbit quantize IN.gguf OUT.gguf TYPE`."""
    parser.add_argument("in_gguf", type=Path, help="GGUF file to quantize (lowbit's or llama.cpp's), ideally F16/F32")
    parser.add_argument("out_gguf", type=Path, help="output .gguf")
    parser.add_argument("type", metavar="TYPE", help="file type: q4_k_m, q6_k, q8_0, ... or nf4 (listed below)")
    parser.add_argument("--allow-requantize", action="store_true",
                        help="allow quantizing tensors that are already quantized (loses more quality than "
                             "quantizing the F16/F32 original)")
    _add_common(parser)
    _type_help(parser)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", action="append", default=[], metavar="PATTERN=TYPE",
                        help="give tensors whose GGUF name matches PATTERN (glob or regex, e.g. output, token_embd, "
                             "'blk.*.ffn_down*') another tensor type (q8_0, q6_k, f16, ...); repeatable, the first "
                             "match wins")
    parser.add_argument("--pure", action="store_true",
                        help="the file type's base type on every matrix, without llama.cpp's per-tensor mix "
                             "(llama-quantize --pure)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cal = parser.add_argument_group(
        "calibration", "quantize with statistics of the model's activations on sample text: standard blocks, "
                       "lower error (any GGUF runtime reads the file)")
    cal.add_argument("--calibrate", type=Path, metavar="TEXT_FILE",
                     help="plain text the unquantized model is run over to collect the statistics (text like "
                          "what the model will see; not the text you measure perplexity on)")
    cal.add_argument("--calib-tokens", type=_positive_int, default=32768, metavar="N",
                     help="tokens of TEXT_FILE to use (default 32768)")
    cal.add_argument("--calib-ctx", type=_positive_int, default=512, metavar="N",
                     help="tokens per calibration window (default 512)")
    cal.add_argument("--imatrix", type=Path, metavar="FILE",
                     help="an importance matrix instead of text: llama.cpp's (llama-imatrix, GGUF or .dat) or "
                          "lowbit's (--save-imatrix); allows the imatrix method only")
    cal.add_argument("--save-imatrix", type=Path, metavar="FILE",
                     help="also write the importance matrix collected from --calibrate (GGUF; .dat: llama.cpp's "
                          "legacy format)")
    cal.add_argument("--method", default="auto", choices=("auto", "imatrix", "gptq", "awq", "awq+imatrix",
                                                          "awq+gptq"),
                     help="auto (default: the best measured: gptq, or imatrix for the K-quant types), imatrix "
                          "(importance-weighted block scales), gptq (error feedback), awq / awq+imatrix, awq+gptq "
                          "(activation-aware scales folded into the norms, then imatrix or gptq rounding)")
    cal.add_argument("--memory-budget", type=_positive_int, default=None, metavar="MIB",
                     help="memory for the activations' second moments (default: a quarter of RAM); less means "
                          "more passes over the text")
    cal.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                     help="threads for the calibration forward pass (default: all cores)")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _calibration_kwargs(args: argparse.Namespace) -> dict:
    return dict(calibrate=args.calibrate, imatrix=args.imatrix, calib_tokens=args.calib_tokens,
                calib_ctx=args.calib_ctx, method=args.method, save_imatrix=args.save_imatrix,
                memory_budget=None if args.memory_budget is None else args.memory_budget << 20,
                n_threads=args.threads)


def run_convert_args(args: argparse.Namespace) -> int:
    out = args.outfile or args.hf_dir / f"{args.hf_dir.resolve().name}-{args.outtype}.gguf"
    if args.calibrate is None and args.imatrix is None:
        if args.save_imatrix is not None:
            raise LowbitError("--save-imatrix needs --calibrate TEXT_FILE")
        path = convert_checkpoint(args.hf_dir, out, outtype=args.outtype, keep=args.keep or None, force=args.force,
                                  progress=not args.no_progress, pure=args.pure)
    else:
        path = convert_calibrated(args.hf_dir, out, args.outtype, keep=args.keep or None, force=args.force,
                                  progress=not args.no_progress, pure=args.pure, **_calibration_kwargs(args))
    print(f"wrote {path}")
    return 0


def convert_calibrated(hf_dir, out_path, outtype, keep=None, force: bool = False, progress: bool = True,
                       pure: bool = False, **calibration) -> Path:
    """convert() with calibrated quantization: the checkpoint is converted to an unquantized GGUF (BF16 for
    bfloat16 checkpoints, else F16) in a temporary directory next to the output, which quantize_file then
    calibrates on and quantizes from; the temporary file is removed whatever happens."""
    import tempfile

    from .hf import LlamaParams

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if out_path.exists() and not force:
        raise LowbitError(f"{out_path} already exists; pass force=True (--force) to overwrite it")
    if not hf_dir.is_dir():
        raise LowbitError(f"{hf_dir}: not a directory; give a Hugging Face checkpoint directory")
    dtype = LlamaParams.from_dir(hf_dir).torch_dtype
    base = "bf16" if dtype == "bfloat16" else "f16"
    with tempfile.TemporaryDirectory(dir=out_path.parent if out_path.parent.is_dir() else None) as tmp:
        src = Path(tmp) / f"unquantized-{base}.gguf"
        convert_checkpoint(hf_dir, src, outtype=base, progress=progress)
        return quantize_file(src, out_path, outtype, keep=keep, force=force, progress=progress, pure=pure,
                             **calibration)


def run_quantize_args(args: argparse.Namespace) -> int:
    path = quantize_file(args.in_gguf, args.out_gguf, args.type, keep=args.keep or None, force=args.force,
                         progress=not args.no_progress, pure=args.pure, allow_requantize=args.allow_requantize,
                         **_calibration_kwargs(args))
    print(f"wrote {path}")
    return 0


def _run(parser: argparse.ArgumentParser, runner, argv: Optional[Sequence[str]]) -> int:
    from .._core import LowbitError

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return runner(args)
    except (LowbitError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted; no output file was written", file=sys.stderr)
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python convert.py HF_DIR --outtype q4_0 -o OUT.gguf [--keep PATTERN=TYPE ...] [--force]`."""
    parser = add_convert_args(argparse.ArgumentParser(
        prog="convert.py", description="Convert a Hugging Face LLaMA checkpoint to GGUF."))
    return _run(parser, run_convert_args, argv)


def quantize_main(argv: Optional[Sequence[str]] = None) -> int:
    """`lowbit quantize IN.gguf OUT.gguf TYPE [--keep PATTERN=TYPE ...] [--pure] [--allow-requantize] [--force]`."""
    parser = add_quantize_args(argparse.ArgumentParser(
        prog="lowbit quantize", description="Quantize a GGUF file to a llama.cpp file type or NF4/FP4."))
    return _run(parser, run_quantize_args, argv)
