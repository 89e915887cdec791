"""Writes the fuzzer's seed corpus: small valid GGUF files covering every metadata value type (nested arrays
included) and every tensor type lowbit computes with, plus hand-made hostile files. Bytes are built here with
struct (independent of lowbit's writer), so the script needs only the standard library:

    python tests/fuzz/make_corpus.py build/fuzz/corpus
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("make_corpus")

# GGUF metadata value types (spec/container.md, "Metadata value types").
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALAR_FMT = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
              BOOL: "<B", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
SCALAR_SAMPLE = {UINT8: 200, INT8: -7, UINT16: 60000, INT16: -300, UINT32: 4000000000, INT32: -123456,
                 FLOAT32: 0.5, BOOL: 1, UINT64: 2**63 + 5, INT64: -2**40, FLOAT64: -1.25e300}


def tensor_nbytes(type_id: int, n: int) -> int:
    """Bytes of n elements of a type (spec/quant-types.md)."""
    if type_id == 1025:  # NF4_DQ: float offset, float absmax2[ng], uint8 qabsmax[nb], uint8 qs[nb*32]
        nb = n // 64
        ng = (nb + 255) // 256
        return 4 + 4 * ng + nb + nb * 32
    block, size = {0: (1, 4), 1: (1, 2), 30: (1, 2), 8: (32, 34), 2: (32, 18), 3: (32, 20), 1024: (64, 36),
                   14: (256, 210)}[type_id]
    return n // block * size


TENSOR_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "nf4": 1024, "nf4_dq": 1025,
                "q6_k": 14}


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value(vtype: int, v) -> bytes:
    """Encoded value without its type tag. Arrays: v = (item_type, [items])."""
    if vtype == STRING:
        return gstr(v)
    if vtype == ARRAY:
        item_type, items = v
        return struct.pack("<IQ", item_type, len(items)) + b"".join(value(item_type, x) for x in items)
    return struct.pack(SCALAR_FMT[vtype], v)


@dataclass
class Builder:
    """A GGUF file: kvs, tensor infos and data, densely packed in info order unless offsets are given."""

    version: int = 3
    alignment: int = 32
    kvs: list[bytes] = field(default_factory=list)
    infos: list[tuple[str, list[int], int, bytes, int | None]] = field(default_factory=list)

    def kv(self, key: str, vtype: int, v) -> "Builder":
        self.kvs.append(gstr(key) + struct.pack("<I", vtype) + value(vtype, v))
        return self

    def tensor(self, name: str, ne: list[int], type_id: int, rng: random.Random, offset: int | None = None):
        n = 1
        for d in ne:
            n *= d
        self.infos.append((name, ne, type_id, rng.randbytes(tensor_nbytes(type_id, n)), offset))
        return self

    def bytes(self) -> bytes:
        a = self.alignment
        pad = lambda o: (a - o % a) % a  # noqa: E731  spec: align_offset
        offsets, pos = [], 0
        for _, _, _, data, off in self.infos:
            offsets.append(pos if off is None else off)
            pos = offsets[-1] + len(data) + pad(offsets[-1] + len(data))
        out = b"GGUF" + struct.pack("<IQQ", self.version, len(self.infos), len(self.kvs)) + b"".join(self.kvs)
        for (name, ne, type_id, _, _), off in zip(self.infos, offsets):
            out += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
            out += struct.pack("<IQ", type_id, off)
        if not self.infos:
            return out
        out += b"\0" * pad(len(out))
        data = bytearray(max((o + len(d) + pad(o + len(d)) for (_, _, _, d, _), o in zip(self.infos, offsets)),
                             default=0))
        for (_, _, _, d, _), o in zip(self.infos, offsets):
            data[o:o + len(d)] = d
        return out + bytes(data)


def valid_files(rng: random.Random) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    # Every scalar type, and an array of each scalar type.
    b = Builder()
    for t, v in SCALAR_SAMPLE.items():
        b.kv(f"scalar.{t}", t, v)
        b.kv(f"array.{t}", ARRAY, (t, [v, v]))
    b.kv("string", STRING, "llama")
    b.kv("array.strings", ARRAY, (STRING, ["a", "bc", "", "\u00e9\u4e16"]))
    b.kv("array.empty", ARRAY, (UINT8, []))
    files["all_value_types"] = b.bytes()
    # Nested arrays: inner arrays of different item types and lengths; the deepest allowed nesting (8).
    nested = (ARRAY, [(INT32, [1, 2]), (STRING, ["x"]), (ARRAY, [(FLOAT64, [0.25])]), (UINT8, [])])
    deep: tuple = (UINT8, [7])
    for _ in range(7):
        deep = (ARRAY, [deep])
    files["nested_arrays"] = Builder().kv("nest", ARRAY, nested).kv("deep", ARRAY, deep).bytes()
    # A model-like file: llama keys, then one tensor of every type.
    b = Builder().kv("general.architecture", STRING, "llama").kv("llama.block_count", UINT32, 1)
    b.kv("general.alignment", UINT32, 32).kv("tokenizer.ggml.tokens", ARRAY, (STRING, ["<s>", "a", "b"]))
    for name, tid in TENSOR_TYPES.items():
        b.tensor(f"{name}.weight", [256 if tid == 14 else 64, 2], tid, rng)
    files["every_tensor_type"] = b.bytes()
    for name, tid in TENSOR_TYPES.items():
        ne = [256] if tid == 14 else [64, 1, 1, 2]
        files[f"tensor_{name}"] = Builder().kv("t", STRING, name).tensor("w", ne, tid, rng).bytes()
    # Version 2, a custom alignment, offsets out of info order, no tensors, no metadata.
    files["version2"] = Builder(version=2).kv("a", UINT32, 1).tensor("t", [8], 0, rng).bytes()
    b = Builder(alignment=256).kv("general.alignment", UINT32, 256)
    files["align256"] = b.tensor("a", [8], 0, rng).tensor("b", [32], 8, rng).bytes()
    files["align1"] = Builder(alignment=1).kv("general.alignment", UINT32, 1).tensor("a", [3], 1, rng).bytes()
    files["out_of_order"] = Builder().tensor("a", [8], 0, rng, offset=32).tensor("b", [8], 0, rng, offset=0).bytes()
    files["empty"] = Builder().bytes()
    files["metadata_only"] = Builder().kv("general.name", STRING, "x").bytes()
    return files


def hostile_files(rng: random.Random) -> dict[str, bytes]:
    """The crafted cases of tests/test_gguf_malformed.py, in byte form (each one is refused by the reader)."""
    h: dict[str, bytes] = {}
    one = lambda: Builder().tensor("t", [8], 0, rng)  # noqa: E731
    h["short"] = b"GGUF\x03\0\0\0"
    h["bad_magic"] = b"GGML" + struct.pack("<IQQ", 3, 0, 0)
    h["version1"] = Builder(version=1).bytes()
    h["big_endian"] = b"GGUF" + struct.pack(">IQQ", 3, 0, 0)
    h["huge_tensor_count"] = b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0)
    h["huge_kv_count"] = b"GGUF" + struct.pack("<IQQ", 3, 0, 2**63)
    h["kv_count_too_big"] = b"GGUF" + struct.pack("<IQQ", 3, 0, 3) + gstr("a") + struct.pack("<II", UINT32, 1)
    h["string_too_long"] = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("s") + struct.pack("<IQ", STRING, 2**63)
    h["bool_2"] = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("b") + struct.pack("<IB", BOOL, 2)
    h["bad_utf8_key"] = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr(b"\xc0\xaf") + struct.pack("<IB", UINT8, 1)
    h["dup_key"] = Builder().kv("k", UINT32, 1).kv("k", UINT32, 2).bytes()
    h["value_type_13"] = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("v") + struct.pack("<I", 13) + b"\0" * 8
    h["array_huge_count"] = Builder().kv("a", ARRAY, (UINT8, [])).bytes()[:-8] + struct.pack("<Q", 2**63)
    h["array_bad_item_type"] = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("a") + struct.pack("<IIQB", ARRAY, 99, 1, 0)
    deep: tuple = (UINT8, [7])
    for _ in range(9):
        deep = (ARRAY, [deep])
    h["nested_9"] = Builder().kv("deep", ARRAY, deep).bytes()
    h["n_dims_0"] = Builder().tensor("t", [], 0, rng).bytes()
    h["n_dims_5"] = Builder().tensor("t", [1] * 5, 0, rng).bytes()
    h["dim_0"] = Builder().tensor("t", [4, 1], 0, rng).bytes().replace(struct.pack("<QQ", 4, 1), struct.pack("<QQ", 4, 0))
    h["dims_overflow"] = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + gstr("t") + struct.pack("<IQQIQ", 2, 2**32, 2**32, 0, 0)
    h["q4_0_bad_row"] = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + gstr("t") + struct.pack("<IQIQ", 1, 33, 2, 0) + b"\0" * 64
    h["unknown_type"] = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + gstr("t") + struct.pack("<IQIQ", 1, 8, 99, 0) + b"\0" * 64
    h["name_64"] = Builder().tensor("n" * 64, [8], 0, rng).bytes()
    h["dup_tensor"] = Builder().tensor("t", [8], 0, rng).tensor("t", [8], 0, rng).bytes()
    h["data_short"] = one().bytes()[:-1]
    h["offset_misaligned"] = one().bytes()  # patched below
    b = Builder().tensor("a", [16], 0, rng, offset=0).tensor("b", [8], 0, rng, offset=32)
    h["overlap"] = b.bytes()
    blob = bytearray(one().bytes())
    struct.pack_into("<Q", blob, 24 + 9 + 4 + 8 + 4, 2**64 - 32)
    h["offset_past_end"] = bytes(blob)
    h["align_3"] = Builder().kv("general.alignment", UINT32, 3).tensor("t", [8], 0, rng).bytes()
    h["align_u64"] = Builder().kv("general.alignment", UINT64, 32).tensor("t", [8], 0, rng).bytes()
    blob = bytearray(h["offset_misaligned"])
    struct.pack_into("<Q", blob, 24 + 9 + 4 + 8 + 4, 4)
    h["offset_misaligned"] = bytes(blob)
    return h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="corpus directory (created)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    files = {**{f"valid_{k}": v for k, v in valid_files(rng).items()},
             **{f"hostile_{k}": v for k, v in hostile_files(rng).items()}}
    for name, blob in files.items():
        (args.out / f"{name}-{hashlib.sha1(blob).hexdigest()[:8]}.gguf").write_bytes(blob)
    log.info("wrote %d seed files (%d bytes) to %s", len(files), sum(map(len, files.values())), args.out)


if __name__ == "__main__":
    main()
