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

from .core import convert, quantize_file
from .core import convert as convert_checkpoint

__all__ = ["convert", "quantize_file", "main", "quantize_main", "add_convert_args", "add_quantize_args",
           "run_convert_args", "run_quantize_args"]


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


def run_convert_args(args: argparse.Namespace) -> int:
    out = args.outfile or args.hf_dir / f"{args.hf_dir.resolve().name}-{args.outtype}.gguf"
    path = convert_checkpoint(args.hf_dir, out, outtype=args.outtype, keep=args.keep or None, force=args.force,
                              progress=not args.no_progress, pure=args.pure)
    print(f"wrote {path}")
    return 0


def run_quantize_args(args: argparse.Namespace) -> int:
    path = quantize_file(args.in_gguf, args.out_gguf, args.type, keep=args.keep or None, force=args.force,
                         progress=not args.no_progress, pure=args.pure, allow_requantize=args.allow_requantize)
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
