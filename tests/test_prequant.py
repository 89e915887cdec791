"""GPTQ and AWQ checkpoints -> GGUF (converter/prequant.py): tiny llama checkpoints whose linears are packed here
from known integer codes, scales and zeros, by a packer written from the formats' descriptions (not the
converter's code), then converted and compared with those codes and their dequantized weights."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gguf
import numpy as np
import pytest

import lowbit
from lowbit.converter.prequant import PackedLinear, PrequantConfig
from tiny_models import make_tiny_model

GT = gguf.GGMLQuantizationType
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]   # nibble k of an AWQ word holds output column AWQ_ORDER[k] of its 8
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
GGUF_LINEAR = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
N_HEAD, N_KV = 4, 2
IDS = [1, 17, 250, 33, 4, 99, 150, 7, 300, 12, 64, 201]


@dataclass(frozen=True)
class Scheme:
    method: str = "gptq"        # "gptq" | "awq"
    fmt: str = "gptq"           # GPTQ: "gptq" (v1) | "gptq_v2"; AWQ: "gemm"
    sym: bool = False
    group: int = 32             # -1: per output channel
    act_order: str = ""         # "": g_idx = i // group; "blocks": groups shuffled in runs of 32; "cols": any
    lm_head: bool = False       # lm_head packed too
    fmt_file: str = "safetensors"  # or "bin"

    @property
    def qtype(self) -> int:
        return GT.Q4_0 if self.sym else GT.Q4_1


# ---- an independent quantizer and packer -------------------------------------------------------------


@dataclass
class Quantized:
    """One linear as integer codes q [out, in], per-group scales s and zeros z [out, groups], g_idx [in]."""

    q: np.ndarray
    s: np.ndarray
    z: np.ndarray
    g_idx: np.ndarray

    def dequantized(self) -> np.ndarray:
        """w = s * (q - z), float64 then float32 (exact: fp16 s times a small integer)."""
        s = self.s.astype(np.float64)[:, self.g_idx]
        z = self.z.astype(np.float64)[:, self.g_idx]
        return (s * (self.q - z)).astype(np.float32)


def quantize_linear(w: np.ndarray, scheme: Scheme, rng: np.random.Generator) -> Quantized:
    """Round-to-nearest codes for w [out, in] in groups, with the scheme's zero range."""
    n_out, n_in = w.shape
    gs = n_in if scheme.group == -1 else scheme.group
    n_groups = n_in // gs
    g_idx = np.arange(n_in) // gs
    if scheme.act_order == "blocks":   # groups stay runs of 32 inputs, but in a shuffled order
        g_idx = rng.permutation(g_idx.reshape(-1, 32)).reshape(-1)
    elif scheme.act_order == "cols":   # a true act-order: inputs of one block in different groups
        g_idx = rng.permutation(g_idx)
    s = np.empty((n_out, n_groups), np.float16)
    z = np.empty((n_out, n_groups), np.int64)
    for g in range(n_groups):
        cols = w[:, g_idx == g]
        if scheme.sym:
            s[:, g] = np.abs(cols).max(axis=1) / 7.5
            z[:, g] = 8
        else:
            lo, hi = cols.min(axis=1), cols.max(axis=1)
            s[:, g] = (hi - lo) / 15
            # v1 stores z - 1 in 4 bits: zeros 1..16; the others store z: 0..15
            low, high = (1, 16) if scheme.fmt == "gptq" else (0, 15)
            z[:, g] = np.clip(np.round(-lo / s[:, g].astype(np.float64)), low, high)
    sf = s.astype(np.float64)[:, g_idx]
    q = np.clip(np.round(w / sf) + z[:, g_idx], 0, 15).astype(np.int64)
    return Quantized(q, s, z, g_idx)


def pack_words(codes: np.ndarray, order: list[int]) -> np.ndarray:
    """codes [..., 8n] (0..15) -> int32 words [..., n]: nibble k (bits 4k..4k+3) of word j holds code
    8j + order[k]. A last axis that 8 does not divide is padded with zero codes."""
    codes = codes.astype(np.uint32)
    codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (-codes.shape[-1] % 8,), np.uint32)], axis=-1)
    words = np.zeros(codes.shape[:-1] + (codes.shape[-1] // 8,), np.uint32)
    for k in range(8):
        words |= codes[..., order[k]::8] << np.uint32(4 * k)
    return words.view(np.int32)


def pack(qz: Quantized, scheme: Scheme) -> dict[str, np.ndarray]:
    """The suffix -> tensor of one packed linear, [in, out] orientation."""
    plain = list(range(8))
    if scheme.method == "gptq":
        stored_z = qz.z - 1 if scheme.fmt == "gptq" else qz.z
        assert stored_z.min() >= 0 and stored_z.max() <= 15
        parts = {"qweight": pack_words(qz.q, plain).T,
                 "qzeros": pack_words(stored_z.T, plain), "scales": qz.s.T.copy(),
                 "g_idx": qz.g_idx.astype(np.int32)}
    else:
        parts = {"qweight": pack_words(qz.q.T, AWQ_ORDER), "qzeros": pack_words(qz.z.T, AWQ_ORDER),
                 "scales": qz.s.T.copy()}
    return {k: np.ascontiguousarray(v) for k, v in parts.items()}


def test_packer_matches_the_format_descriptions():
    """The packer above, checked word by word against the descriptions: GPTQ's input row i is nibble i % 8
    of word i // 8; AWQ's nibbles hold columns 0, 2, 4, 6, 1, 3, 5, 7 of a word's 8 output columns."""
    q = np.arange(16).reshape(2, 8) % 16       # [out 2, in 8]
    gptq = pack_words(q, list(range(8))).T     # [in/8, out]
    assert gptq.view(np.uint32).tolist() == [[0x76543210, 0xFEDCBA98]]
    awq = pack_words(np.arange(8)[None, :], AWQ_ORDER)   # one input row, output columns 0..7 hold 0..7
    assert awq.view(np.uint32).tolist() == [[0x75316420]]


class DictStore:
    """A TensorStore over numpy arrays, for PackedLinear without files."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.dir, self.tensors = Path("."), tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def load(self, name: str) -> np.ndarray:
        return self.tensors[name].astype(np.float32)

    def load_raw(self, name: str) -> np.ndarray:
        return self.tensors[name]


@pytest.mark.parametrize("scheme", [Scheme("gptq", "gptq"), Scheme("gptq", "gptq_v2"), Scheme("awq", "gemm")])
def test_unpacking_literal_words(scheme):
    """Hand-written words: output column j of every input row holds code j; zero code 3 (GPTQ v1: z = 4)."""
    n_in, n_out = 32, 8
    if scheme.method == "gptq":
        qweight = np.array([[0x11111111 * j for j in range(n_out)]] * (n_in // 8), np.uint32)
        qzeros = np.array([[0x33333333]], np.uint32)
    else:
        qweight = np.array([[0x75316420]] * n_in, np.uint32)
        qzeros = np.array([[0x33333333]], np.uint32)
    store = DictStore({"x.qweight": qweight.view(np.int32), "x.qzeros": qzeros.view(np.int32),
                       "x.scales": np.full((1, n_out), 0.5, np.float16)})
    cfg = PrequantConfig(scheme.method, 4, 32, 1 if scheme.fmt == "gptq" else 0, scheme.fmt, "test")
    lin = PackedLinear(store, cfg, "x", store.names())
    z = 4 if scheme.fmt == "gptq" else 3
    want = np.repeat(0.5 * (np.arange(n_out, dtype=np.float32)[:, None] - z), n_in, axis=1)
    np.testing.assert_array_equal(lin(), want)
    assert lin.native() == lowbit.QType.Q4_1
    blocks = np.frombuffer(lin.blocks().tobytes(), dtype=[("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
    assert blocks["d"].tolist() == [0.5] * n_out and blocks["m"].tolist() == [-0.5 * z] * n_out
    assert [int(b[0]) for b in blocks["qs"]] == [0x11 * j for j in range(n_out)]


# ---- checkpoints -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A float llama (hidden 128, ffn 256, 4 heads of 32, 2 KV heads): rows that groups of 128 divide."""
    return make_tiny_model(tmp_path_factory.mktemp("base"), "llama3", hidden=128, intermediate=256,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, seed=1)


def _state(base: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float32) for k, v in load_file(str(base / "model.safetensors")).items()}


def _new_dir(base: Path, out: Path, tensors: dict[str, np.ndarray], quant: Optional[dict], fmt: str) -> Path:
    """A checkpoint directory with base's tokenizer and config (plus quant as quantization_config)."""
    out.mkdir(parents=True)
    for f in base.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((base / "config.json").read_text())
    if quant is not None:
        cfg["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(cfg))
    if fmt == "bin":
        import torch

        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
                   out / "pytorch_model.bin")
    else:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
    return out


def quant_config(scheme: Scheme) -> dict:
    if scheme.method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": scheme.group, "sym": scheme.sym,
                "desc_act": bool(scheme.act_order), "checkpoint_format": scheme.fmt}
    return {"quant_method": "awq", "bits": 4, "group_size": scheme.group, "version": scheme.fmt,
            "zero_point": True}


@dataclass
class Built:
    packed: Path                        # the GPTQ/AWQ checkpoint
    dense: Path                         # the same model with its linears dequantized (float32)
    quantized: dict[str, Quantized]     # GGUF name -> codes (HF row order)
    expected: dict[str, np.ndarray]     # GGUF name -> dequantized weights (GGUF row order)


def _rope_interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head from HF's halves (i, i + d/2) to ggml's adjacent pairs: new 2i + j = old j * d/2 + i."""
    d = w.shape[0] // n_heads
    idx = [h * d + j * (d // 2) + i for h in range(n_heads) for i in range(d // 2) for j in range(2)]
    return w[idx]


def build(base: Path, out: Path, scheme: Scheme, quant: Optional[dict] = None, seed: int = 0) -> Built:
    rng = np.random.default_rng(seed)
    state = _state(base)
    packed, dense, quantized, expected = {}, {}, {}, {}
    for name, w in state.items():
        parts = name.split(".")
        is_linear = name.endswith(".weight") and ".".join(parts[3:-1]) in LINEARS
        is_head = name == "lm_head.weight" and scheme.lm_head
        if not (is_linear or is_head):
            packed[name] = dense[name] = w
            continue
        qz = quantize_linear(w, scheme, rng)
        stem = name[:-len(".weight")]
        packed.update({f"{stem}.{k}": v for k, v in pack(qz, scheme).items()})
        dense[name] = qz.dequantized()
        gname = "output.weight" if is_head else f"blk.{parts[2]}.{GGUF_LINEAR['.'.join(parts[3:-1])]}.weight"
        quantized[gname] = qz
        want = dense[name]
        if gname.endswith("attn_q.weight"):
            want = _rope_interleave(want, N_HEAD)
        elif gname.endswith("attn_k.weight"):
            want = _rope_interleave(want, N_KV)
        expected[gname] = want
    q = quant if quant is not None else quant_config(scheme)
    return Built(_new_dir(base, out / "packed", packed, q, scheme.fmt_file),
                 _new_dir(base, out / "dense", dense, None, "safetensors"), quantized, expected)


def read(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _blocks(t, qtype: int) -> np.ndarray:
    fields = [("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)] if qtype == GT.Q4_1 else [("d", "<f2"), ("qs", "u1", 16)]
    return np.frombuffer(np.asarray(t.data).tobytes(), dtype=fields)


# ---- conversion --------------------------------------------------------------------------------------

SCHEMES = {
    "gptq-v1-sym-g32": Scheme("gptq", "gptq", sym=True, group=32),
    "gptq-v1-asym-g128": Scheme("gptq", "gptq", group=128, lm_head=True),
    "gptq-v2-asym-g32": Scheme("gptq", "gptq_v2", group=32),
    "gptq-v2-sym-g128-bin": Scheme("gptq", "gptq_v2", sym=True, group=128, fmt_file="bin"),
    "gptq-v1-asym-perchannel": Scheme("gptq", "gptq", group=-1),
    "gptq-v2-actorder-blocks": Scheme("gptq", "gptq_v2", group=32, act_order="blocks"),
    "awq-g32": Scheme("awq", "gemm", group=32),
    "awq-g128": Scheme("awq", "gemm", group=128),
    "awq-sym-g64": Scheme("awq", "gemm", sym=True, group=64),
}


def _logits(path: Path) -> np.ndarray:
    with lowbit.load(path, n_threads=2) as m:
        return m.logits(IDS)


@pytest.mark.parametrize("key", list(SCHEMES))
def test_packed_linears_become_their_own_q4_blocks(base_dir, tmp_path, key):
    scheme = SCHEMES[key]
    built = build(base_dir, tmp_path, scheme)
    outtype = "q4_0" if scheme.sym else "q4_1"
    out = lowbit.convert(built.packed, tmp_path / "m.gguf", outtype=outtype,
                         keep={"token_embd": "f32", **({} if scheme.lm_head else {"output": "f32"})}, progress=False)
    tensors = read(out)
    assert set(built.expected) <= set(tensors) and len(built.expected) == 14 + scheme.lm_head
    for name, want in built.expected.items():
        t = tensors[name]
        assert int(t.tensor_type) == scheme.qtype, name
        # (a) the blocks hold the checkpoint's own codes and scales: d = s, codes unchanged, m = fp16(-s z)
        qz = built.quantized[name]
        rows = np.arange(want.shape[0])
        if name.endswith("attn_q.weight"):
            rows = _rope_interleave(rows, N_HEAD)
        elif name.endswith("attn_k.weight"):
            rows = _rope_interleave(rows, N_KV)
        blocks = _blocks(t, scheme.qtype).reshape(want.shape[0], -1)
        block_group = qz.g_idx[::32]
        np.testing.assert_array_equal(blocks["d"], qz.s[rows][:, block_group], err_msg=name)
        codes = np.concatenate([blocks["qs"] & 15, blocks["qs"] >> 4], axis=-1).reshape(want.shape)
        np.testing.assert_array_equal(codes, qz.q[rows], err_msg=name)
        s = qz.s[rows][:, block_group].astype(np.float32)
        z = qz.z[rows][:, block_group].astype(np.float32)
        if scheme.qtype == GT.Q4_1:
            np.testing.assert_array_equal(blocks["m"], (-(s * z)).astype(np.float16), err_msg=name)
        # (b) dequantized, the tensor is the checkpoint's weights: exactly (Q4_0) / but for m's rounding (Q4_1)
        got = gguf.quants.dequantize(np.asarray(t.data), GT(scheme.qtype)).reshape(want.shape)
        if scheme.qtype == GT.Q4_0:
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            bound = np.repeat(s * z * 2.0 ** -11 + np.abs(s) * 16 * 2.0 ** -23, 32, axis=1)
            assert np.all(np.abs(got - want) <= bound), name
        lb = lowbit.GGUFFile(out).tensor(name).to_numpy()
        np.testing.assert_array_equal(lb, got)
    # the other tensors took the ordinary path: the same bytes as converting the dense twin
    twin = lowbit.convert(built.dense, tmp_path / "twin.gguf", outtype=outtype,
                          keep={"token_embd": "f32", **({} if scheme.lm_head else {"output": "f32"})}, progress=False)
    twin_tensors = read(twin)
    assert set(twin_tensors) == set(tensors)
    for name, t in twin_tensors.items():
        if name not in built.expected:
            assert int(tensors[name].tensor_type) == int(t.tensor_type), name
            np.testing.assert_array_equal(np.asarray(tensors[name].data), np.asarray(t.data), err_msg=name)
    # (c) the model runs as the float32 conversion of its dequantized weights does
    ref = _logits(lowbit.convert(built.dense, tmp_path / "f32.gguf", outtype="f32", progress=False))
    ours = _logits(out)
    # The weights are the same; what is left is the runtime's 8-bit activations in Q4 dot products (measured:
    # max |diff| 0.07-0.10 of the logits' std, KL ~2e-4; re-rounding the codes gives up to 0.9 and 2e-2).
    assert np.abs(ours - ref).max() <= 0.2 * float(np.std(ref))
    assert mean_kl(ref, ours) <= 1e-3


def mean_kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean KL(softmax p || softmax q) over positions."""
    lp = p - np.logaddexp.reduce(p.astype(np.float64), axis=-1, keepdims=True)
    lq = q - np.logaddexp.reduce(q.astype(np.float64), axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def test_symmetric_checkpoint_gives_q4_0_whatever_the_4bit_file_type(base_dir, tmp_path):
    """q4_1 asked, symmetric codes: Q4_0 (exact, smaller); q4_0 asked, asymmetric codes: Q4_1, never re-rounded."""
    sym = build(base_dir, tmp_path / "sym", Scheme("gptq", "gptq_v2", sym=True, group=32))
    tensors = read(lowbit.convert(sym.packed, tmp_path / "a.gguf", outtype="q4_1", progress=False))
    assert {int(tensors[n].tensor_type) for n in sym.expected} == {GT.Q4_0}
    asym = build(base_dir, tmp_path / "asym", Scheme("awq", "gemm", group=32))
    tensors = read(lowbit.convert(asym.packed, tmp_path / "b.gguf", outtype="q4_0", progress=False))
    assert {int(tensors[n].tensor_type) for n in asym.expected} == {GT.Q4_1}
    assert int(tensors["token_embd.weight"].tensor_type) == GT.Q4_0


def test_keep_rules_on_packed_linears(base_dir, tmp_path, caplog):
    """--keep naming a packed linear wins: its native type keeps the codes, another type re-rounds (warned)."""
    built = build(base_dir, tmp_path, Scheme("gptq", "gptq_v2", group=32))
    with caplog.at_level("WARNING", logger="lowbit.convert"):
        out = lowbit.convert(built.packed, tmp_path / "m.gguf", outtype="q4_0", progress=False,
                             keep={"blk.*.ffn_down*": "q8_0", "blk.0.attn_v": "q4_1"})
    tensors = read(out)
    for layer in (0, 1):
        name = f"blk.{layer}.ffn_down.weight"
        want = gguf.quants.quantize(built.expected[name], GT.Q8_0)
        assert int(tensors[name].tensor_type) == GT.Q8_0
        np.testing.assert_array_equal(np.asarray(tensors[name].data).reshape(-1), want.reshape(-1))
    assert "ffn_down" in caplog.text and "quantized again" in caplog.text
    qz = built.quantized["blk.0.attn_v.weight"]
    blocks = _blocks(tensors["blk.0.attn_v.weight"], GT.Q4_1).reshape(qz.q.shape[0], -1)
    np.testing.assert_array_equal(blocks["d"], qz.s[:, qz.g_idx[::32]])
    assert "attn_v" not in caplog.text


@pytest.mark.parametrize("outtype", ["f32", "f16"])
@pytest.mark.parametrize("key", ["gptq-v1-asym-g128", "awq-g32", "gptq-actorder-cols"])
def test_float_outtypes_dequantize(base_dir, tmp_path, key, outtype):
    """A float file type gets s * (q - z), also where Q4 blocks could not hold the groups (true act-order)."""
    scheme = SCHEMES.get(key) or Scheme("gptq", "gptq", group=32, act_order="cols")
    built = build(base_dir, tmp_path, scheme)
    tensors = read(lowbit.convert(built.packed, tmp_path / "m.gguf", outtype=outtype, progress=False))
    ftype = GT.F32 if outtype == "f32" else GT.F16
    for name, want in built.expected.items():
        t = tensors[name]
        assert int(t.tensor_type) == ftype, name
        np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape),
                                      want if outtype == "f32" else want.astype(np.float16), err_msg=name)


# ---- what cannot be mapped ---------------------------------------------------------------------------


def _refused(built: Built, tmp_path: Path, match: str, outtype: str = "q4_1") -> None:
    target = tmp_path / "out" / "m.gguf"
    target.parent.mkdir()
    with pytest.raises(lowbit.LowbitError, match=match):
        lowbit.convert(built.packed, target, outtype=outtype, progress=False)
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("scheme, quant, match", [
    (Scheme(group=16), None, r"group_size 16 is not a multiple of 32.*--outtype f16"),
    (Scheme(group=32, act_order="cols"), None, r"act-order.*desc_act=false.*--outtype f16"),
    (Scheme(), {"quant_method": "gptq", "bits": 8, "group_size": 32}, r"bits=8.*4-bit"),
    (Scheme(), {"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "marlin"},
     r"checkpoint_format 'marlin'.*gptq"),
    (Scheme("awq", "gemm"), {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"},
     r"AWQ version 'gemv'.*gemm"),
    (Scheme(), {"quant_method": "bitsandbytes", "load_in_4bit": True}, r"quant_method 'bitsandbytes'"),
])
def test_unsupported_checkpoints_are_refused(base_dir, tmp_path, scheme, quant, match):
    _refused(build(base_dir, tmp_path, scheme, quant=quant), tmp_path, match)


def test_packed_weights_without_quantization_config(base_dir, tmp_path):
    built = build(base_dir, tmp_path, Scheme())
    cfg_path = built.packed / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["quantization_config"]
    cfg_path.write_text(json.dumps(cfg))
    _refused(built, tmp_path, r"packed \.qweight.*no quantization_config", outtype="f16")


def test_quantize_config_json_beside_config(base_dir, tmp_path):
    """AutoGPTQ's quantize_config.json stands in for a missing quantization_config."""
    scheme = Scheme("gptq", "gptq", sym=True, group=32)
    built = build(base_dir, tmp_path, scheme)
    cfg_path = built.packed / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qcfg = cfg.pop("quantization_config")
    del qcfg["quant_method"]
    cfg_path.write_text(json.dumps(cfg))
    (built.packed / "quantize_config.json").write_text(json.dumps(qcfg))
    tensors = read(lowbit.convert(built.packed, tmp_path / "m.gguf", outtype="q4_0", progress=False))
    name = "blk.1.ffn_down.weight"
    got = gguf.quants.dequantize(np.asarray(tensors[name].data), GT.Q4_0).reshape(built.expected[name].shape)
    np.testing.assert_array_equal(got, built.expected[name])


def test_m_rounding_is_within_the_documented_bound():
    """|fp16(-s z) + s z| <= 2^-11 s z <= 15/2048 s, 0 for z a power of two (the module docstring's numbers)."""
    rng = np.random.default_rng(0)
    s = np.exp(rng.uniform(np.log(1e-4), np.log(0.1), 200_000)).astype(np.float16).astype(np.float32)
    z = rng.integers(0, 16, s.size).astype(np.float32)
    err = np.abs((-(s * z)).astype(np.float16).astype(np.float32) + s * z)
    assert np.all(err <= s * z * 2.0 ** -11)
    assert err.max() / s[err.argmax()] <= 15 / 2048
    assert np.all(err[np.isin(z, [0, 1, 2, 4, 8])] == 0)
    assert 0.4 < np.mean(err == 0) < 0.5
