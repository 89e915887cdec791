"""Malformed GGUF files: every truncation, 10,000+ seeded corruptions (in a child process, so a crash fails the
test instead of killing pytest) and hand-made hostile files, each refused with a LowbitError that names the
problem and its byte offset."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf.quants as gq
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G

import lowbit
from lowbit import LowbitError
from lowbit.gguf import GGUFValueType as VT

# ---- a tiny GGUF byte builder (independent of both writers) ------------------------------------------------


def gstr(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_u32(key, v: int) -> bytes:
    return kv(key, VT.UINT32, struct.pack("<I", v))


def tinfo(name, dims, ggml_type: int, offset: int) -> bytes:
    return gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ggml_type, offset)


def build(kvs=(), infos=(), data=b"", version=3, n_kv=None, n_tensors=None, align=32, magic=b"GGUF") -> bytes:
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    if infos and data is not None:
        body += b"\0" * (-len(body) % align) + data
    return body


def f32_tensor(name="t", n=8, offset=0):
    return tinfo(name, [n], 0, offset)


def load(tmp_path: Path, blob: bytes, name="x.gguf") -> lowbit.GGUFFile:
    p = tmp_path / name
    p.write_bytes(blob)
    return lowbit.GGUFFile(p)


def refused(tmp_path: Path, blob: bytes, *fragments: str) -> str:
    with pytest.raises(LowbitError) as e:
        load(tmp_path, blob)
    msg = str(e.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    assert "[at byte " in msg, msg
    return msg


# ---- the small valid file every fuzz case starts from --------------------------------------------------


def valid_file(path: Path) -> bytes:
    rng = np.random.default_rng(7)
    with lowbit.GGUFWriter(path) as w:
        w.add_metadata("general.architecture", "llama")
        w.add_metadata("llama.block_count", 2, VT.UINT32)
        w.add_metadata("f", 0.5)
        w.add_metadata("b", True)
        w.add_metadata("i64", -5, VT.INT64)
        w.add_metadata("toks", ["a", "bc", ""])
        w.add_metadata("nest", [[1, 2], [3]])
        w.add_tensor("norm", rng.standard_normal(8).astype(np.float32))
        w.add_tensor("q8", gq.quantize(rng.standard_normal((2, 32)).astype(np.float32), G.Q8_0).view(np.uint8),
                     qtype=int(G.Q8_0), shape=(2, 32))
        w.add_tensor("q4", gq.quantize(rng.standard_normal(32).astype(np.float32), G.Q4_0).view(np.uint8),
                     qtype=int(G.Q4_0), shape=(32,))
    return path.read_bytes()


def field_offsets(blob: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every count, length, type, dim and offset field of a GGUF file: the fields a
    corruption is most likely to turn hostile."""
    out: list[tuple[int, int]] = [(8, 8), (16, 8)]
    pos = 24
    n_t, n_kv = struct.unpack_from("<QQ", blob, 8)

    def string(pos):
        out.append((pos, 8))
        return pos + 8 + struct.unpack_from("<Q", blob, pos)[0]

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def value(pos, t):
        if t == VT.STRING:
            return string(pos)
        if t == VT.ARRAY:
            et, n = struct.unpack_from("<IQ", blob, pos)
            out.extend([(pos, 4), (pos + 4, 8)])
            pos += 12
            for _ in range(n):
                pos = value(pos, et)
            return pos
        return pos + sizes[t]

    for _ in range(n_kv):
        pos = string(pos)
        out.append((pos, 4))
        t = struct.unpack_from("<I", blob, pos)[0]
        pos = value(pos + 4, t)
    for _ in range(n_t):
        pos = string(pos)
        nd = struct.unpack_from("<I", blob, pos)[0]
        out.append((pos, 4))
        pos += 4
        for _ in range(nd):
            out.append((pos, 8))
            pos += 8
        out.append((pos, 4))
        out.append((pos + 4, 8))
        pos += 12
    return out


# ---- fuzzing in a child process --------------------------------------------------------------------------

CHILD = textwrap.dedent(r"""
    import faulthandler, json, os, random, struct, sys
    faulthandler.enable()
    import numpy as np
    import lowbit
    from lowbit import LowbitError

    spec = json.loads(sys.argv[1])
    blob = open(spec["src"], "rb").read()
    fields = spec["fields"]
    rng = random.Random(spec["seed"])
    ok = refused = 0
    bad = []
    no_offset = []
    interesting = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 31, 32, 33, 63, 64, 255, 256, 65535, 65536, 2**31, 2**32 - 1,
                   2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1, len(blob), len(blob) - 1]

    def cases():
        if spec["mode"] == "truncate":
            for n in range(spec["limit"]):
                yield ("truncate", n), blob[:n]
            return
        for k in range(spec["count"]):
            b = bytearray(blob)
            kind = k % 3
            if kind == 0:    # one random byte anywhere before the data section
                pos = rng.randrange(spec["header_end"])
                b[pos] = rng.randrange(256)
            elif kind == 1:  # a length/count/type/dim/offset field set to a hostile value
                pos, width = fields[rng.randrange(len(fields))]
                v = rng.choice(interesting) if rng.random() < 0.7 else rng.getrandbits(8 * width)
                if rng.random() < 0.3:
                    v = int.from_bytes(b[pos:pos + width], "little") + rng.choice([-2, -1, 1, 2])
                b[pos:pos + width] = (v % 2 ** (8 * width)).to_bytes(width, "little")
            else:            # several random bytes, or a cut plus a flip
                for _ in range(rng.randrange(2, 6)):
                    b[rng.randrange(spec["header_end"])] = rng.randrange(256)
                if rng.random() < 0.3:
                    del b[rng.randrange(len(b)):]
            yield ("corrupt", k), bytes(b)

    for n, (case, data) in enumerate(cases()):
        # A fresh name per case: rewriting one file in place makes ext4 flush on every close.
        path = spec["work"] + "." + str(n)
        with open(path, "wb") as fh:
            fh.write(data)
        try:
            f = lowbit.GGUFFile(path)
            # A file that loads must be usable end to end.
            repr(f.metadata)
            for t in f.tensors:
                d = t.data
                assert d.nbytes == t.nbytes and t.offset + t.nbytes <= len(data)
                int(d.sum())
                if int(t.qtype) in (0, 1, 30):
                    t.to_numpy()
            f.close()
            ok += 1
        except LowbitError as e:
            refused += 1
            if "[at byte " not in str(e):
                no_offset.append([case, str(e)])
        except Exception as e:
            bad.append([case, type(e).__name__, str(e)[:300]])
        os.unlink(path)
    print(json.dumps({"ok": ok, "refused": refused, "bad": bad[:20], "no_offset": no_offset[:20]}))
""")


def run_child(tmp_path: Path, spec: dict) -> dict:
    script = tmp_path / "fuzz_child.py"
    script.write_text(CHILD)
    spec = dict(spec, work=str(tmp_path / "case.gguf"))
    proc = subprocess.run([sys.executable, str(script), json.dumps(spec)], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, f"the reader crashed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def data_end(path: Path) -> int:
    f = lowbit.GGUFFile(path)
    return max(t.offset + t.nbytes for t in f.tensors)


def test_every_truncation_is_refused(tmp_path):
    src = tmp_path / "valid.gguf"
    blob = valid_file(src)
    end = data_end(src)
    assert end <= len(blob)
    # Every prefix that cuts into the header, metadata, infos or any tensor's bytes is refused...
    res = run_child(tmp_path, {"mode": "truncate", "src": str(src), "limit": end, "fields": [], "seed": 0})
    assert res["bad"] == [] and res["no_offset"] == []
    assert (res["ok"], res["refused"]) == (0, end)
    # ...and the padding after the last tensor is not needed.
    f = load(tmp_path, blob[:end], "cut_padding.gguf")
    assert len(f.tensors) == 3


def test_ten_thousand_corruptions_never_crash(tmp_path):
    src = tmp_path / "valid.gguf"
    blob = valid_file(src)
    f = lowbit.GGUFFile(src)
    spec = {"mode": "corrupt", "src": str(src), "count": 10_500, "seed": 1234, "fields": field_offsets(blob),
            "header_end": f.data_offset}
    res = run_child(tmp_path, spec)
    assert res["bad"] == [], res["bad"]
    assert res["no_offset"] == [], res["no_offset"]
    assert res["ok"] + res["refused"] == spec["count"]
    assert res["refused"] > spec["count"] // 2  # the corruptions really do hit validated fields


def test_field_walker_matches_the_file(tmp_path):
    blob = valid_file(tmp_path / "v.gguf")
    fields = field_offsets(blob)
    assert len(fields) > 30 and all(p + w <= len(blob) for p, w in fields)


# ---- crafted hostile files -------------------------------------------------------------------------------


def test_header_problems(tmp_path):
    refused(tmp_path, b"", "is 0 bytes", "[at byte 0]")
    refused(tmp_path, b"GGUF\x03\0\0\0", "is 8 bytes")
    refused(tmp_path, build(magic=b"GGML"), "not a GGUF file", "[at byte 0]")
    refused(tmp_path, build(version=1), "version 1 is not supported", "[at byte 4]")
    refused(tmp_path, build(version=4), "version 4 is not supported")
    refused(tmp_path, b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian")
    refused(tmp_path, build(n_tensors=2**40), "tensor count 1099511627776 exceeds the limit", "[at byte 8]")
    refused(tmp_path, build(n_tensors=1000), "tensor count 1000 is larger than the file can hold", "[at byte 8]")
    refused(tmp_path, build(n_kv=2**63), "metadata kv count 9223372036854775808 exceeds the limit", "[at byte 16]")
    refused(tmp_path, build(n_kv=1000), "metadata kv count 1000 is larger than the file can hold", "[at byte 16]")
    refused(tmp_path, build(kvs=[kv_u32("a", 1)], n_kv=3), "metadata kv count 3")
    assert load(tmp_path, build(version=2, kvs=[kv_u32("a", 1)])).version == 2
    assert load(tmp_path, build()).metadata == {}


def test_string_and_key_problems(tmp_path):
    head = 24
    refused(tmp_path, build(kvs=[kv("s", VT.STRING, struct.pack("<Q", 2**63))]),
            "key 's': length 9223372036854775808 exceeds the limit", f"[at byte {head + 9 + 4}]")
    refused(tmp_path, build(kvs=[kv("s", VT.STRING, struct.pack("<Q", 1000) + b"abc")]),
            "key 's': needs 1000 bytes but the file ends after 3")
    refused(tmp_path, build(kvs=[struct.pack("<Q", 70000) + b"k" * 70000 + struct.pack("<IB", 0, 1)]),
            "metadata key #0: length 70000 exceeds the limit of 65535")
    refused(tmp_path, build(kvs=[kv(b"\xff\xfeab", VT.UINT8, b"\1")]), "is not valid UTF-8", f"[at byte {head}]")
    refused(tmp_path, build(kvs=[kv(b"\xc0\xaf", VT.UINT8, b"\1")]), "is not valid UTF-8")  # overlong '/'
    refused(tmp_path, build(kvs=[kv("", VT.UINT8, b"\1"), kv_u32("pad", 1)]), "metadata key #0 is empty")
    second = head + len(kv_u32("k", 1))
    refused(tmp_path, build(kvs=[kv_u32("k", 1), kv_u32("k", 2)]), "duplicate metadata key 'k'",
            f"[at byte {second}]")
    refused(tmp_path, build(kvs=[kv("v", 13, b"\0" * 8)]), "key 'v': value type 13 is not a GGUF value type",
            f"[at byte {head + 9}]")
    refused(tmp_path, build(kvs=[kv("b", VT.BOOL, b"\x02")]), "key 'b': BOOL value is 2; must be 0 or 1",
            f"[at byte {head + 9 + 4}]")
    refused(tmp_path, build(kvs=[kv("x", VT.UINT64, b"\0" * 7)]), "key 'x': needs 8 bytes but the file ends")


def test_array_problems(tmp_path):
    refused(tmp_path, build(kvs=[kv("a", VT.ARRAY, struct.pack("<IQ", VT.UINT8, 2**63))]),
            "key 'a': array count 9223372036854775808 exceeds the limit")
    refused(tmp_path, build(kvs=[kv("a", VT.ARRAY, struct.pack("<IQ", VT.UINT32, 1000) + b"\0" * 40)]),
            "array of 1000 UINT32 items needs at least 4000 bytes but only 40 remain")
    refused(tmp_path, build(kvs=[kv("a", VT.ARRAY, struct.pack("<IQ", 99, 1) + b"\0" * 8)]),
            "key 'a': array item type 99 is not a GGUF value type")
    refused(tmp_path, build(kvs=[kv("a", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2) + gstr("ok") +
                                    struct.pack("<Q", 2**62))]),
            "key 'a' item 1: length 4611686018427387904 exceeds the limit")

    def nested(depth: int) -> bytes:
        return struct.pack("<IQ", VT.ARRAY, 1) * (depth - 1) + struct.pack("<IQ", VT.UINT8, 1) + b"\7"

    refused(tmp_path, build(kvs=[kv("deep", VT.ARRAY, nested(1000))]), "key 'deep'", "nested more than 8 deep")
    refused(tmp_path, build(kvs=[kv("deep", VT.ARRAY, nested(9))]), "nested more than 8 deep")
    f = load(tmp_path, build(kvs=[kv("deep", VT.ARRAY, nested(8))]))
    v = f.metadata["deep"]
    for _ in range(7):
        v = v[0]
    assert v == [7]


def test_tensor_info_problems(tmp_path):
    data = b"\0" * 64
    refused(tmp_path, build(infos=[tinfo("t", [], 0, 0)], data=data), "tensor 't': n_dims is 0")
    refused(tmp_path, build(infos=[tinfo("t", [1] * 5, 0, 0)], data=data), "tensor 't': n_dims is 5")
    refused(tmp_path, build(infos=[tinfo("t", [4, 0], 0, 0)], data=data), "tensor 't': dim 1 is 0")
    refused(tmp_path, build(infos=[tinfo("t", [2**63], 0, 0)], data=data), "dim 0 is 9223372036854775808")
    refused(tmp_path, build(infos=[tinfo("t", [2**32, 2**32], 0, 0)], data=data),
            "tensor 't': the element count of dims [4294967296, 4294967296] overflows")
    refused(tmp_path, build(infos=[tinfo("t", [2**31, 2**31], 0, 0)], data=data), "byte size", "overflows")
    refused(tmp_path, build(infos=[tinfo("t", [33], int(G.Q4_0), 0)], data=data),
            "tensor 't': row length ne[0] = 33 is not a multiple of", "block size 32")
    at = 24 + 9 + 4 + 8
    refused(tmp_path, build(infos=[tinfo("t", [8], 99, 0)], data=data), "tensor 't': unknown tensor type id 99",
            f"[at byte {at}]")
    refused(tmp_path, build(infos=[tinfo("n" * 64, [8], 0, 0)], data=data),
            "tensor #0 name: length 64 exceeds the limit of 63")
    refused(tmp_path, build(infos=[tinfo(b"\xff", [8], 0, 0)], data=data), "tensor #0 name", "not valid UTF-8")
    refused(tmp_path, build(infos=[f32_tensor("t"), f32_tensor("t", offset=32)], data=data),
            "duplicate tensor name 't'")


def test_data_section_problems(tmp_path):
    one = [f32_tensor("t", 8, 0)]
    assert load(tmp_path, build(infos=one, data=b"\0" * 32)).tensor("t").nbytes == 32
    msg = refused(tmp_path, build(infos=one, data=b"\0" * 31), "tensor 't': offset 0 + size 32 is past the end",
                  "file size")
    assert f"[at byte {24 + 9 + 4 + 8 + 4}]" in msg  # the offset field of the info
    refused(tmp_path, build(infos=[f32_tensor("t", 8, 2**64 - 32)], data=b"\0" * 32), "is past the end")
    refused(tmp_path, build(infos=[f32_tensor("t", 8, 4)], data=b"\0" * 64),
            "tensor 't': data offset 4 is not a multiple of the alignment 32")
    refused(tmp_path, build(infos=[f32_tensor("a", 16, 0), f32_tensor("b", 8, 32)], data=b"\0" * 96),
            "tensor 'b' (offset 32) overlaps tensor 'a' (offset 0, 64 bytes)")
    refused(tmp_path, build(infos=[f32_tensor("a", 8, 0), f32_tensor("b", 8, 0)], data=b"\0" * 64), "overlaps")
    # Out of info order is fine for reading as long as nothing overlaps.
    f = load(tmp_path, build(infos=[f32_tensor("a", 8, 32), f32_tensor("b", 8, 0)],
                             data=np.arange(16, dtype=np.float32).tobytes()))
    assert f.tensor("a").to_numpy().tolist() == list(range(8, 16))
    # Truncated inside the data section, and a data section that would start past the end of the file.
    refused(tmp_path, build(infos=[f32_tensor("a", 8, 0), f32_tensor("b", 8, 32)], data=b"\0" * 40),
            "tensor 'b': offset 32 + size 32 is past the end")
    refused(tmp_path, build(infos=one, data=None), "data section would start at byte")


@pytest.mark.parametrize("vtype,value,fragment", [
    (VT.UINT32, 0, "general.alignment is 0; it must be a power of two"),
    (VT.UINT32, 3, "general.alignment is 3; it must be a power of two"),
    (VT.UINT32, 2**31, "general.alignment is 2147483648; it must be a power of two from 1 to 1048576"),
    (VT.UINT64, 2**40, "general.alignment has type UINT64; it must be UINT32"),
    (VT.INT32, 32, "general.alignment has type INT32"),
])
def test_bad_alignment(tmp_path, vtype, value, fragment):
    payload = struct.pack("<Q" if vtype == VT.UINT64 else ("<i" if vtype == VT.INT32 else "<I"), value)
    refused(tmp_path, build(kvs=[kv("general.alignment", vtype, payload)], infos=[f32_tensor()], data=b"\0" * 32),
            fragment)


def test_custom_alignment_is_honoured(tmp_path):
    blob = build(kvs=[kv_u32("general.alignment", 256)], infos=[f32_tensor("a", 8, 0), f32_tensor("b", 8, 256)],
                 data=b"\0" * 256 + np.ones(8, np.float32).tobytes(), align=256)
    f = load(tmp_path, blob)
    assert f.alignment == 256 and f.data_offset % 256 == 0
    assert f.tensor("b").to_numpy().tolist() == [1.0] * 8
    refused(tmp_path, build(kvs=[kv_u32("general.alignment", 256)], infos=[f32_tensor("a", 8, 32)],
                            data=b"\0" * 512, align=256), "not a multiple of the alignment 256")
