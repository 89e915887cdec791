"""Writes the fuzzer's seed corpus: small valid GGUF files covering every metadata value type (nested arrays
included) and every tensor type lowbit computes with (a small K-quant llama file among them), plus hand-made
hostile files. Bytes are built here with
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


# (elements, bytes) per block of every type id the seeds use (cpp/include/lowbit/qtypes.def).
BLOCKS = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
          10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
          20: (32, 18), 23: (256, 136), 1024: (64, 36), 1026: (64, 36),
          # ggml types lowbit parses but does not compute with
          9: (32, 36), 16: (256, 66), 34: (256, 54), 39: (32, 17)}


def tensor_nbytes(type_id: int, n: int) -> int:
    """Bytes of n elements of a type (spec/quant-types.md); whole blocks only, so a row that is not a multiple
    of the block size gets the bytes of its whole blocks."""
    if type_id == 1025:  # NF4_DQ: float offset, float absmax2[ng], uint8 qabsmax[nb], uint8 qs[nb*32]
        nb = n // 64
        ng = (nb + 255) // 256
        return 4 + 4 * ng + nb + nb * 32
    block, size = BLOCKS[type_id]
    return n // block * size


TENSOR_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7,
                "q2_k": 10, "q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14, "q8_k": 15, "iq4_nl": 20, "iq4_xs": 23,
                "nf4": 1024, "nf4_dq": 1025, "fp4": 1026}
Q4_K, Q6_K, Q5_0, IQ4_XS, Q8_0 = 12, 14, 6, 23, 8
UNSUPPORTED_TYPES = {"q8_1": 9, "iq2_xxs": 16, "tq1_0": 34, "mxfp4": 39}
# Byte offsets of the fp16 scales in a block (spec/quant-types.md): set to a small finite value in the model
# seed so its weights decode to finite numbers, like a real file's.
SCALE_OFFSETS = {Q4_K: (0, 2), Q6_K: (208,), Q5_0: (0,), IQ4_XS: (0,), Q8_0: (0,)}


def row_length(type_id: int) -> int:
    """A short row that is a whole number of blocks: 256 for the super-block types, else 64."""
    return max(64, BLOCKS.get(type_id, (64, 0))[0])


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

    def tensor(self, name: str, ne: list[int], type_id: int, rng: random.Random, offset: int | None = None,
               data_type: int | None = None):
        """Random bytes for the tensor; data_type: lay out the bytes of that type instead of type_id's (a
        declared type whose byte size disagrees with the data)."""
        n = 1
        for d in ne:
            n *= d
        data = bytearray(rng.randbytes(tensor_nbytes(type_id if data_type is None else data_type, n)))
        if data_type is None and type_id in SCALE_OFFSETS:
            size = BLOCKS[type_id][1]
            for b in range(0, len(data), size):
                for at in SCALE_OFFSETS[type_id]:
                    data[b + at:b + at + 2] = struct.pack("<e", 0.01)
        self.infos.append((name, ne, type_id, bytes(data), offset))
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


# (name, ggml dims, type) of the K-quant model seed: n_embd 256, n_ff 512, 4 tokens, 2 heads, 1 layer; under
# 8 KiB so that the fuzzer's -max_len keeps it whole.
KQUANT_MODEL = [("token_embd.weight", [256, 4], Q6_K), ("blk.0.attn_norm.weight", [256], 0),
                ("blk.0.attn_q.weight", [256, 2], Q4_K), ("blk.0.attn_k.weight", [256, 1], Q4_K),
                ("blk.0.attn_v.weight", [256, 1], Q6_K), ("blk.0.attn_output.weight", [256, 2], IQ4_XS),
                ("blk.0.ffn_gate.weight", [256, 2], Q4_K), ("blk.0.ffn_up.weight", [256, 2], Q5_0),
                ("blk.0.ffn_down.weight", [512, 1], Q6_K), ("output.weight", [256, 4], Q6_K)]


def kquant_model(rng: random.Random, types: dict[str, tuple[int, int | None]] | None = None,
                 dims: dict[str, list[int]] | None = None) -> Builder:
    """The K-quant model seed; types: name -> (declared type, type whose bytes are stored or None); dims:
    name -> declared ggml dims (the bytes stay those of the right dims)."""
    b = Builder().kv("general.architecture", STRING, "llama").kv("general.name", STRING, "kquant")
    for key, v in (("block_count", 1), ("embedding_length", 256), ("feed_forward_length", 512),
                   ("attention.head_count", 2), ("attention.head_count_kv", 1), ("context_length", 64)):
        b.kv(f"llama.{key}", UINT32, v)
    b.kv("llama.attention.layer_norm_rms_epsilon", FLOAT32, 1e-5)
    b.kv("general.file_type", UINT32, 15)  # llama.cpp's MOSTLY_Q4_K_M
    b.kv("tokenizer.ggml.tokens", ARRAY, (STRING, ["<s>", "</s>", "a", "b"]))
    for name, ne, tid in KQUANT_MODEL:
        declared, stored = (types or {}).get(name, (tid, None))
        b.tensor(name, ne, declared, rng, data_type=stored)
        if dims and name in dims:
            n, _, t, data, off = b.infos[-1]
            b.infos[-1] = (n, dims[name], t, data, off)
    return b


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
        b.tensor(f"{name}.weight", [row_length(tid), 2], tid, rng)
    files["every_tensor_type"] = b.bytes()
    for name, tid in TENSOR_TYPES.items():
        ne = [256] if row_length(tid) == 256 else [64, 1, 1, 2]
        files[f"tensor_{name}"] = Builder().kv("t", STRING, name).tensor("w", ne, tid, rng).bytes()
    # A small llama file in the types of a Q4_K_M / IQ4_XS model (K-quant matrices, Q5_0, IQ4_XS, Q6_K output).
    files["kquant_model"] = kquant_model(rng).bytes()
    # Q6_K bytes declared as Q4_K: GGUF stores no byte size, so this only leaves a gap before the next tensor.
    files["kquant_gap"] = kquant_model(rng, types={"blk.0.ffn_up.weight": (Q4_K, Q6_K)}).bytes()
    # ggml types lowbit only parses: the container accepts them (lowbit.load refuses them).
    for name, tid in UNSUPPORTED_TYPES.items():
        files[f"unsupported_{name}"] = kquant_model(rng, types={"blk.0.ffn_up.weight": (tid, None)}).bytes()
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
    h.update(kquant_hostile_files(rng))
    return h


def kquant_hostile_files(rng: random.Random) -> dict[str, bytes]:
    """The malformed K-quant / IQ4 / Q5 cases of tests/test_kquant_errors.py, in byte form."""
    h: dict[str, bytes] = {}
    # Rows that are not whole super-blocks (the reader refuses them whatever the bytes).
    for name, tid in (("q4_k", Q4_K), ("q6_k", Q6_K), ("iq4_xs", IQ4_XS)):
        for ne0 in (200, 384):
            h[f"{name}_row_{ne0}"] = Builder().tensor("w", [ne0, 2], tid, rng).bytes()
    # The same in the model file: same element count, rows of 128.
    for name, tensor, dims in (("q4_k", "blk.0.attn_q.weight", [128, 4]), ("q6_k", "token_embd.weight", [128, 8]),
                               ("iq4_xs", "blk.0.attn_output.weight", [128, 4])):
        h[f"{name}_model_row_128"] = kquant_model(rng, dims={tensor: dims}).bytes()
    # Cut inside the last tensor's (Q6_K) last super-block, and inside its first one.
    b = kquant_model(rng)
    blob, last = b.bytes(), b.infos[-1][3]
    end = len(blob) - (-len(last)) % b.alignment  # the end of the last tensor's bytes (its padding follows)
    h["kquant_cut_last_block"] = blob[:end - 210 // 2]
    h["kquant_cut_one_byte"] = blob[:end - 1]
    h["kquant_cut_first_block"] = blob[:end - len(last) + 7]
    # A declared type larger than its bytes: into the next tensor, and past the end of the file.
    h["kquant_q4_k_as_q6_k"] = kquant_model(rng, types={"blk.0.attn_q.weight": (Q6_K, Q4_K)}).bytes()
    h["kquant_last_as_q8_0"] = kquant_model(rng, types={"output.weight": (Q8_0, Q6_K)}).bytes()
    h["kquant_iq4_xs_as_q6_k"] = kquant_model(rng, types={"blk.0.attn_output.weight": (Q6_K, IQ4_XS)}).bytes()
    h["kquant_q5_0_as_q6_k"] = kquant_model(rng, types={"blk.0.ffn_up.weight": (Q6_K, Q5_0)}).bytes()
    # Type ids no table knows, in the model file.
    for tid in (4, 31, 99, 1027, 2**32 - 1):
        h[f"kquant_unknown_type_{tid}"] = kquant_model(rng, types={"blk.0.ffn_gate.weight": (tid, Q4_K)}).bytes()
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
