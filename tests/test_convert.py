"""HF -> GGUF conversion and GGUF requantization, checked against transformers, gguf-py and bitsandbytes."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

import lowbit
from lowbit.converter import ftype
from tiny_models import load_hf_state, make_tiny_llama

GT = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType

# HF name -> GGUF name, written out independently of the converter's table.
_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    if hf in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf]
    parts = hf.split(".")
    return f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:-1])]}.weight"


def _rope_interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head reordered from HF's halves (i, i + d/2) to ggml's adjacent pairs (2i, 2i + 1):
    new row 2i + j of a head is old row j * d/2 + i."""
    d = w.shape[0] // n_heads
    idx = [h * d + j * (d // 2) + i for h in range(n_heads) for i in range(d // 2) for j in range(2)]
    return w[idx]


def expected_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """What the GGUF should hold (float32), computed from transformers' own loading of the checkpoint."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {}
    for hf, w in load_hf_state(hf_dir).items():
        if hf == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        name = _gguf_name(hf)
        if name.endswith("attn_q.weight"):
            w = _rope_interleave(w, n_head)
        elif name.endswith("attn_k.weight"):
            w = _rope_interleave(w, n_kv)
        out[name] = w
    return out


def read(path: Path) -> tuple[dict, dict]:
    """(fields, tensors) of a GGUF as llama.cpp's gguf-py reads it."""
    r = gguf.GGUFReader(str(path))
    return r.fields, {t.name: t for t in r.tensors}


def check_tensor(path: Path, t, want: np.ndarray, qtype: int) -> None:
    """The stored tensor equals `want` converted to qtype: F32 exactly, F16/BF16 by round-to-nearest-even,
    block types byte for byte with gguf-py's reference quantizer."""
    assert int(t.tensor_type) == qtype, t.name
    assert tuple(int(d) for d in reversed(t.shape.tolist())) == want.shape
    data = np.asarray(t.data)
    if qtype == GT.F32:
        np.testing.assert_array_equal(data.reshape(want.shape), want)
    elif qtype == GT.F16:
        np.testing.assert_array_equal(data.reshape(want.shape), want.astype(np.float16))
    elif qtype == GT.BF16:
        ref = gguf.quants.quantize(want, GT.BF16)
        np.testing.assert_array_equal(data.view(np.uint8).reshape(-1), ref.view(np.uint8).reshape(-1))
        got = gguf.quants.dequantize(data, GT.BF16).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=2**-8, atol=0)
    else:
        ref = gguf.quants.quantize(want, GT(qtype))
        np.testing.assert_array_equal(data.reshape(-1), ref.reshape(-1))
        got = gguf.quants.dequantize(data, GT(qtype)).reshape(want.shape)
        # Per block, the error is at most one quantization step (Q8_0: amax/127, 4-bit: amax/7 or range/15).
        step = {GT.Q8_0: 1 / 127, GT.Q4_0: 1 / 7, GT.Q4_1: 1 / 15 * 2}[GT(qtype)]
        blocks = want.reshape(-1, 32)
        bound = np.abs(blocks).max(axis=1, keepdims=True) * step * 1.01 + 1e-6
        assert np.all(np.abs(got.reshape(-1, 32) - blocks) <= bound), t.name
    # lowbit's own reader and dequantizer agree with gguf-py's.
    lb = lowbit.GGUFFile(path).tensor(t.name).to_numpy()
    np.testing.assert_array_equal(lb, gguf.quants.dequantize(data, GT(qtype)).reshape(want.shape))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def tiny_expected(tiny) -> dict[str, np.ndarray]:
    return expected_tensors(tiny)


def predicted_types(tensors: dict[str, np.ndarray], outtype: str, n_layer: int = 2, n_head: int = 4,
                    n_head_kv: int = 2, pure: bool = False) -> dict[str, int]:
    """ggml type id per tensor as llama-quantize chooses it (converter/ftype.py, checked against llama.cpp's
    own choices by tests/test_ftype.py), for float32 numpy arrays."""
    specs = {name: tuple(reversed(w.shape)) for name, w in tensors.items()}
    names = ftype.tensor_types(specs, ftype.ModelFacts(n_layer, n_head, n_head_kv), outtype, pure=pure)
    return {name: int(GT[t]) for name, t in names.items()}


OUT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")


@pytest.mark.parametrize("outtype", OUT_TYPES)
def test_outtypes_match_hf_weights(tiny, tiny_expected, tmp_path, outtype):
    out = lowbit.convert(tiny, tmp_path / f"m-{outtype}.gguf", outtype=outtype, progress=False)
    fields, tensors = read(out)
    assert set(tensors) == set(tiny_expected)
    want_types = predicted_types(tiny_expected, outtype)
    for name, want in tiny_expected.items():
        check_tensor(out, tensors[name], want, want_types[name])
    assert fields["general.file_type"].contents() == ftype.file_type_id(outtype)
    # llama.cpp's reader requires dense, in-order data; gguf-py exposes the offsets.
    order = [t.name for t in gguf.GGUFReader(str(out)).tensors]
    assert order[0] == "token_embd.weight" and order[-2:] == ["output_norm.weight", "output.weight"]


@pytest.mark.parametrize("variant", [
    dict(dtype="bfloat16"), dict(dtype="float16"), dict(fmt="sharded"), dict(fmt="bin"),
    dict(fmt="sharded_bin", dtype="bfloat16"), dict(tied=True), dict(n_kv_heads=4), dict(n_kv_heads=1),
    dict(head_dim=32), dict(tied=True, fmt="sharded", dtype="bfloat16", n_kv_heads=1),
])
def test_checkpoint_variants(tmp_path, variant):
    hf_dir = make_tiny_llama(tmp_path, seed=3, **variant)
    want = expected_tensors(hf_dir)
    out = lowbit.convert(hf_dir, tmp_path / "m.gguf", outtype="f32", progress=False)
    fields, tensors = read(out)
    assert set(tensors) == set(want)
    assert ("output.weight" in tensors) == (not variant.get("tied", False))
    for name, w in want.items():
        check_tensor(out, tensors[name], w, GT.F32)
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert fields["llama.attention.head_count_kv"].contents() == cfg["num_key_value_heads"]
    head_dim = variant.get("head_dim", 16)
    assert fields["llama.rope.dimension_count"].contents() == head_dim
    if "head_dim" in variant:
        assert fields["llama.attention.key_length"].contents() == head_dim
        assert fields["llama.attention.value_length"].contents() == head_dim
    else:
        assert "llama.attention.key_length" not in fields


def test_permutation_makes_interleaved_rope_equal_hf_rope(tiny, tmp_path):
    """ggml's RoPE rotates adjacent pairs (2i, 2i+1); HF's rotates (i, i + d/2). With the permuted weights,
    q.k after ggml RoPE equals q.k after HF RoPE (transformers' own rotary code)."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    out = lowbit.convert(tiny, tmp_path / "m.gguf", outtype="f32", progress=False)
    _, tensors = read(out)
    hf = load_hf_state(tiny)
    d, n_head, n_kv, base = 16, 4, 2, 10000.0
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    pos = np.array([0, 5, 17])
    inv = base ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None, :]
    cos = torch.tensor(np.concatenate([np.cos(ang)] * 2, axis=1), dtype=torch.float32)[None]
    sin = torch.tensor(np.concatenate([np.sin(ang)] * 2, axis=1), dtype=torch.float32)[None]

    def hf_proj(w, n):
        return torch.tensor((x @ w.T).reshape(3, n, d)).transpose(0, 1)[None]
    q_hf, k_hf = apply_rotary_pos_emb(hf_proj(hf["model.layers.0.self_attn.q_proj.weight"], n_head),
                                      hf_proj(hf["model.layers.0.self_attn.k_proj.weight"], n_kv), cos, sin)

    def ggml_rope(w, n):
        y = (x @ np.asarray(tensors[w].data).reshape(-1, 64).T).reshape(3, n, d // 2, 2)
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        return np.stack([y[..., 0] * c - y[..., 1] * s, y[..., 0] * s + y[..., 1] * c], axis=-1).reshape(3, n, d)
    q_g = ggml_rope("blk.0.attn_q.weight", n_head)
    k_g = ggml_rope("blk.0.attn_k.weight", n_kv)
    scores_hf = np.einsum("hqd,gkd->hgqk", q_hf[0].numpy(), k_hf[0].numpy())
    scores_g = np.einsum("qhd,kgd->hgqk", q_g, k_g)
    np.testing.assert_allclose(scores_g, scores_hf, rtol=1e-4, atol=1e-4)


def test_metadata_keys_and_types(tiny, tmp_path):
    out = lowbit.convert(tiny, tmp_path / "m.gguf", outtype="q8_0", progress=False)
    fields, _ = read(out)
    cfg = json.loads((tiny / "config.json").read_text())
    expect = {
        "general.architecture": (VT.STRING, "llama"),
        "general.file_type": (VT.UINT32, 7),
        "general.quantization_version": (VT.UINT32, 2),
        "general.alignment": (VT.UINT32, 32),
        "llama.context_length": (VT.UINT32, 256),
        "llama.embedding_length": (VT.UINT32, 64),
        "llama.block_count": (VT.UINT32, 2),
        "llama.feed_forward_length": (VT.UINT32, 128),
        "llama.rope.dimension_count": (VT.UINT32, 16),
        "llama.attention.head_count": (VT.UINT32, 4),
        "llama.attention.head_count_kv": (VT.UINT32, 2),
        "llama.attention.layer_norm_rms_epsilon": (VT.FLOAT32, np.float32(1e-5)),
        "llama.rope.freq_base": (VT.FLOAT32, 10000.0),
        "llama.vocab_size": (VT.UINT32, cfg["vocab_size"]),
        "tokenizer.ggml.model": (VT.STRING, "gpt2"),
        "tokenizer.ggml.pre": (VT.STRING, "smollm"),
        "tokenizer.ggml.bos_token_id": (VT.UINT32, 1),
        "tokenizer.ggml.eos_token_id": (VT.UINT32, 2),
        "tokenizer.ggml.unknown_token_id": (VT.UINT32, 0),
        "tokenizer.ggml.padding_token_id": (VT.UINT32, 2),
        "tokenizer.ggml.add_bos_token": (VT.BOOL, False),
        "tokenizer.ggml.add_eos_token": (VT.BOOL, False),
        "tokenizer.chat_template": (VT.STRING, (tiny / "chat_template.jinja").read_text()),
        "tokenizer.huggingface.json": (VT.STRING, (tiny / "tokenizer.json").read_text()),
    }
    for key, (vt, value) in expect.items():
        assert fields[key].types[0] == vt, key
        got = fields[key].contents()
        assert got == value, (key, got, value)
    assert "general.name" in fields
    tok = json.loads((tiny / "tokenizer.json").read_text())
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert fields["tokenizer.ggml.tokens"].types == [VT.ARRAY, VT.STRING]
    assert fields["tokenizer.ggml.token_type"].types == [VT.ARRAY, VT.INT32]
    assert len(tokens) == cfg["vocab_size"]
    for text, i in tok["model"]["vocab"].items():
        assert tokens[i] == text
    added = {a["content"]: a for a in tok["added_tokens"]}
    for text, a in added.items():
        assert tokens[a["id"]] == text
        assert types[a["id"]] == (3 if a["special"] else 4), text
    assert sum(t == 1 for t in types) == len(tokens) - len(added)
    merges = tok["model"]["merges"]
    assert fields["tokenizer.ggml.merges"].contents() == [m if isinstance(m, str) else " ".join(m) for m in merges]


@pytest.mark.parametrize("overrides,scaling", [
    ({"rope_parameters": None, "rope_theta": 500000.0, "rope_scaling": None}, None),
    ({"rope_parameters": None, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}, 4.0),
    ({"rope_parameters": {"rope_theta": 250000.0, "rope_type": "linear", "factor": 2.0}}, 2.0),
    ({"rope_parameters": {"rope_theta": 250000.0, "rope_type": "default"}}, None),
])
def test_rope_configs(tmp_path, overrides, scaling):
    hf_dir = make_tiny_llama(tmp_path, config_overrides=overrides)
    out = lowbit.convert(hf_dir, tmp_path / "m.gguf", outtype="f16", progress=False)
    fields, _ = read(out)
    theta = overrides.get("rope_theta") or overrides["rope_parameters"]["rope_theta"]
    assert fields["llama.rope.freq_base"].contents() == theta
    if scaling is None:
        assert "llama.rope.scaling.type" not in fields
    else:
        assert fields["llama.rope.scaling.type"].contents() == "linear"
        assert fields["llama.rope.scaling.factor"].types[0] == VT.FLOAT32
        assert fields["llama.rope.scaling.factor"].contents() == scaling


def test_keep_rules(tiny, tiny_expected, tmp_path):
    out = lowbit.convert(tiny, tmp_path / "m.gguf", outtype="q4_0", progress=False,
                         keep=["output=q8_0", "token_embd=f16", "blk.*.ffn_down*=q8_0", r"blk\.1\.attn_v=f32"])
    fields, tensors = read(out)
    want_types = {"output.weight": GT.Q8_0, "token_embd.weight": GT.F16, "blk.0.ffn_down.weight": GT.Q8_0,
                  "blk.1.ffn_down.weight": GT.Q8_0, "blk.1.attn_v.weight": GT.F32, "blk.0.attn_v.weight": GT.Q4_0}
    for name, want in tiny_expected.items():
        qtype = want_types.get(name, GT.F32 if want.ndim == 1 else GT.Q4_0)
        check_tensor(out, tensors[name], want, qtype)
    assert fields["general.file_type"].contents() == 2
    out2 = lowbit.convert(tiny, tmp_path / "m2.gguf", outtype="f16", progress=False, keep={"output": "q4_1"})
    assert int(read(out2)[1]["output.weight"].tensor_type) == GT.Q4_1


def test_bad_keep_and_outtype(tiny, tmp_path):
    with pytest.raises(lowbit.LowbitError, match="PATTERN=TYPE"):
        lowbit.convert(tiny, tmp_path / "m.gguf", keep=["output"], progress=False)
    with pytest.raises(lowbit.LowbitError, match="output=q9_k: unknown quant type .* q6_k"):
        lowbit.convert(tiny, tmp_path / "m.gguf", keep=["output=q9_k"], progress=False)
    for bad in ("q9_0", "q4_k", "Q8_K", lowbit.QType.Q8_K):
        with pytest.raises(lowbit.LowbitError, match="unknown file type") as e:
            lowbit.convert(tiny, tmp_path / "m.gguf", outtype=bad, progress=False)
        for choice in ("q4_k_m", "q5_0", "iq4_xs", "q8_0", "f16", "nf4", "fp4"):
            assert choice in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


def test_rows_not_multiple_of_block_fall_back_to_f16(tmp_path):
    hf_dir = make_tiny_llama(tmp_path, intermediate=80)   # ffn_down rows of 80: not a multiple of 32
    want = expected_tensors(hf_dir)
    out = lowbit.convert(hf_dir, tmp_path / "m.gguf", outtype="q4_0", progress=False)
    _, tensors = read(out)
    check_tensor(out, tensors["blk.0.ffn_down.weight"], want["blk.0.ffn_down.weight"], GT.F16)
    check_tensor(out, tensors["blk.0.ffn_up.weight"], want["blk.0.ffn_up.weight"], GT.Q4_0)


def test_nf4_matches_bitsandbytes(tiny, tiny_expected, tmp_path):
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    out = lowbit.convert(tiny, tmp_path / "m.gguf", outtype="nf4", progress=False)
    f = lowbit.GGUFFile(out)
    assert f.metadata["general.file_type"] == 1024
    for name, want in tiny_expected.items():
        t = f.tensor(name)
        if want.ndim == 1:
            assert int(t.qtype) == 0
            continue
        if name == "output.weight":  # the head: Q6_K, or Q8_0 where rows (64 here) do not fill 256
            assert t.qtype == lowbit.QType.Q8_0
            np.testing.assert_array_equal(t.data, lowbit.quantize(want, lowbit.QType.Q8_0).reshape(-1))
            continue
        assert int(t.qtype) == 1024
        packed, state = quantize_4bit(torch.from_numpy(want), blocksize=64, quant_type="nf4")
        ref = dequantize_4bit(packed, state).numpy()
        np.testing.assert_array_equal(t.to_numpy(), ref)
        # Block = fp32 absmax + 32 bytes, first element in the high nibble (bitsandbytes' packing).
        blocks = np.asarray(t.data).reshape(-1, 36)
        np.testing.assert_array_equal(blocks[:, :4].copy().view(np.float32).reshape(-1), state.absmax.numpy())
        np.testing.assert_array_equal(blocks[:, 4:].reshape(-1), packed.numpy().reshape(-1))



def test_nf4_dq_matches_bitsandbytes_double_quant(tiny, tiny_expected, tmp_path):
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    out = lowbit.convert(tiny, tmp_path / "m.gguf", outtype="nf4_dq", progress=False)
    f = lowbit.GGUFFile(out)
    assert f.metadata["general.file_type"] == 1025
    for name, want in tiny_expected.items():
        t = f.tensor(name)
        if name == "output.weight":  # the head: 8 bits (see test_nf4_matches_bitsandbytes)
            assert t.qtype == lowbit.QType.Q8_0
            continue
        assert int(t.qtype) == (0 if want.ndim == 1 else 1025)
        if want.ndim == 2:
            packed, state = quantize_4bit(torch.from_numpy(want), blocksize=64, quant_type="nf4",
                                          compress_statistics=True)
            # Layout: f32 offset, f32 absmax2[ng], u8 qabsmax[nb], u8 qs[nb * 32]; the 4-bit codes are bitsandbytes'.
            nb = want.size // 64
            ng = -(-nb // 256)
            qs = np.asarray(t.data)[4 + 4 * ng + nb:]
            np.testing.assert_array_equal(qs, packed.numpy().reshape(-1), err_msg=name)
            # The offset (mean absmax) is correctly rounded in lowbit and summed in torch's order in bitsandbytes:
            # a few ulps apart (tests/test_quants.py), so the scales agree to float32 rounding, not bit for bit.
            np.testing.assert_allclose(t.to_numpy(), dequantize_4bit(packed, state).numpy(), rtol=1e-6, atol=0,
                                       err_msg=name)

def test_refuses_to_overwrite(tiny, tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"precious")
    with pytest.raises(lowbit.LowbitError, match="already exists.*force"):
        lowbit.convert(tiny, target, progress=False)
    assert target.read_bytes() == b"precious"
    lowbit.convert(tiny, target, outtype="f32", force=True, progress=False)
    assert read(target)[0]["general.architecture"].contents() == "llama"


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_on_failure(tiny, tmp_path, monkeypatch, exc):
    from lowbit.converter import plan

    real = plan.encode
    calls = []

    def failing(x, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise exc("disk on fire")
        return real(x, qtype)

    monkeypatch.setattr("lowbit.converter.core.encode", failing)
    with pytest.raises(exc):
        lowbit.convert(tiny, tmp_path / "m.gguf", outtype="q8_0", progress=False)
    assert len(calls) == 5
    assert list(tmp_path.iterdir()) == []   # neither the target nor a temporary file


def test_unsupported_architecture(tmp_path):
    hf_dir = make_tiny_llama(tmp_path, architecture="GPTNeoXForCausalLM")
    with pytest.raises(lowbit.LowbitError, match="GPTNeoXForCausalLM.*not supported"):
        lowbit.convert(hf_dir, tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_mistral_architecture_accepted(tmp_path):
    hf_dir = make_tiny_llama(tmp_path, architecture="MistralForCausalLM")
    out = lowbit.convert(hf_dir, tmp_path / "m.gguf", outtype="f16", progress=False)
    assert read(out)[0]["general.architecture"].contents() == "llama"


def test_missing_inputs(tmp_path):
    with pytest.raises(lowbit.LowbitError, match="not a directory"):
        lowbit.convert(tmp_path / "nope", tmp_path / "m.gguf", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(lowbit.LowbitError, match="config.json"):
        lowbit.convert(tmp_path / "empty", tmp_path / "m.gguf", progress=False)


def test_quantize_file_round_trip(tiny, tmp_path):
    f32 = lowbit.convert(tiny, tmp_path / "f32.gguf", outtype="f32", progress=False)
    direct = lowbit.convert(tiny, tmp_path / "q8.gguf", outtype="q8_0", progress=False,
                            keep={"token_embd": "f16"})
    requant = lowbit.quantize_file(f32, tmp_path / "rq8.gguf", "q8_0", keep={"token_embd": "f16"},
                                           progress=False)
    fd, td = read(direct)
    fr, tr = read(requant)
    assert list(td) == list(tr)
    for name in td:
        assert td[name].tensor_type == tr[name].tensor_type
        np.testing.assert_array_equal(np.asarray(td[name].data), np.asarray(tr[name].data))
    for key in fd:
        if key.startswith("GGUF."):
            continue
        assert fr[key].types == fd[key].types, key
        assert fr[key].contents() == fd[key].contents(), key
    # Requantize again (q8_0 -> q4_0) and update file_type; refuse to overwrite.
    q4 = lowbit.quantize_file(requant, tmp_path / "q4.gguf", "q4_0", progress=False, allow_requantize=True)
    assert read(q4)[0]["general.file_type"].contents() == 2
    with pytest.raises(lowbit.LowbitError, match="already exists"):
        lowbit.quantize_file(requant, q4, "q4_0", progress=False, allow_requantize=True)


def test_quantize_file_reads_gguf_py_files(tmp_path):
    """A file written by llama.cpp's own writer (gguf-py), F16 weights: requantized to Q4_0."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    norm = rng.standard_normal(64).astype(np.float32)
    src = tmp_path / "src.gguf"
    writer = gguf.GGUFWriter(str(src), "llama")
    writer.add_block_count(1)
    writer.add_rope_freq_base(10000.0)
    writer.add_tensor("blk.0.attn_q.weight", w.astype(np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = lowbit.quantize_file(src, tmp_path / "q4.gguf", "q4_0", progress=False)
    fields, tensors = read(out)
    assert fields["llama.block_count"].contents() == 1 and fields["llama.block_count"].types[0] == VT.UINT32
    assert fields["llama.rope.freq_base"].types[0] == VT.FLOAT32
    assert fields["general.file_type"].contents() == 2
    check_tensor(out, tensors["blk.0.attn_q.weight"], w.astype(np.float16).astype(np.float32), GT.Q4_0)
    check_tensor(out, tensors["blk.0.attn_norm.weight"], norm, GT.F32)


def test_cli(tiny, tmp_path, capsys):
    from lowbit.converter import main, quantize_main

    out = tmp_path / "cli.gguf"
    assert main([str(tiny), "--outtype", "q4_1", "-o", str(out), "--keep", "output=q8_0", "--no-progress"]) == 0
    _, tensors = read(out)
    assert int(tensors["blk.0.attn_q.weight"].tensor_type) == GT.Q4_1
    assert int(tensors["output.weight"].tensor_type) == GT.Q8_0
    assert main([str(tiny), "--outtype", "q4_1", "-o", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert quantize_main([str(out), str(tmp_path / "q8.gguf"), "q8_0", "--no-progress"]) == 1
    assert "--allow-requantize" in capsys.readouterr().err
    assert quantize_main([str(out), str(tmp_path / "q8.gguf"), "q8_0", "--no-progress", "--allow-requantize"]) == 0
    assert int(read(tmp_path / "q8.gguf")[1]["blk.0.attn_q.weight"].tensor_type) == GT.Q8_0
    k = tmp_path / "k.gguf"
    assert main([str(tiny), "--outtype", "q4_k_m", "-o", str(k), "--no-progress"]) == 0
    assert read(k)[0]["general.file_type"].contents() == 15


def test_convert_script(tiny, tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "s.gguf"
    # The child inherits this interpreter's environment, so it imports the same lowbit the tests run against.
    r = subprocess.run([sys.executable, str(root / "convert.py"), str(tiny), "--outtype", "q8_0", "-o", str(out)],
                       capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert r.returncode == 0, r.stderr
    assert read(out)[0]["general.file_type"].contents() == 7


@pytest.mark.slow
def test_smollm2_round_trip_through_transformers(tmp_path):
    """llama.cpp's SmolLM2 file -> transformers (dequantized, q/k un-permuted, saved as an HF checkpoint) ->
    lowbit.convert f32: every tensor equals gguf-py's dequantization of the original, so our q/k permutation
    is exactly llama.cpp's on a real model. Then `lowbit quantize` requantizes llama.cpp's own file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.hub import fetch_smollm2

    src = fetch_smollm2()
    hf_dir = tmp_path / "hf"
    from safetensors.torch import save_file

    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # transformers will not save_pretrained a GGUF-loaded model: write the checkpoint files directly.
    AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(hf_dir)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    del model, state
    out = lowbit.convert(hf_dir, tmp_path / "f32.gguf", outtype="f32", progress=False)
    orig = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    fields, ours = read(out)
    assert set(ours) == set(orig)
    for name, t in orig.items():
        want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(ours[name].data.shape)
        np.testing.assert_array_equal(np.asarray(ours[name].data), want.astype(np.float32), err_msg=name)
    ofields = gguf.GGUFReader(str(src)).fields
    for key in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.feed_forward_length",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert fields[key].contents() == ofields[key].contents(), key

    q8 = lowbit.quantize_file(src, tmp_path / "q8.gguf", "q8_0", progress=False, allow_requantize=True)
    qfields, q8t = read(q8)
    assert qfields["general.file_type"].contents() == 7
    assert qfields["tokenizer.ggml.tokens"].contents() == ofields["tokenizer.ggml.tokens"].contents()
    name = "blk.0.attn_q.weight"
    want = gguf.quants.dequantize(np.asarray(orig[name].data), orig[name].tensor_type)
    np.testing.assert_array_equal(np.asarray(q8t[name].data).reshape(-1),
                                  gguf.quants.quantize(want.astype(np.float32), GT.Q8_0).reshape(-1))


# ---- llama.cpp's file types: lowbit quantize against llama-quantize ----------------------------------

try:
    import llama_cpp
    _NO_LLAMA_CPP = ""
except (ImportError, OSError) as e:  # OSError: the package is there but its shared library does not load
    llama_cpp = None
    _NO_LLAMA_CPP = f"import llama_cpp failed ({e}); install llama-cpp-python to compare with llama.cpp's quantizer"

needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason=_NO_LLAMA_CPP)

FILE_TYPES = ("q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q2_k", "q5_0", "q5_1", "q4_0", "iq4_xs")


def write_f16_llama(path: Path, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, n_vocab: int,
                    tied: bool, seed: int = 0) -> Path:
    """A llama-shaped GGUF with F16 matrices and F32 norms, written by gguf-py (llama.cpp's writer); random
    weights with a few outliers, so the quantizers' searches have something to choose."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)
    kv = n_embd // n_head * n_head_kv
    shapes = {"token_embd.weight": (n_vocab, n_embd)}
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (n_embd,), p + "attn_q.weight": (n_embd, n_embd),
                       p + "attn_k.weight": (kv, n_embd), p + "attn_v.weight": (kv, n_embd),
                       p + "attn_output.weight": (n_embd, n_embd), p + "ffn_norm.weight": (n_embd,),
                       p + "ffn_gate.weight": (n_ff, n_embd), p + "ffn_up.weight": (n_ff, n_embd),
                       p + "ffn_down.weight": (n_embd, n_ff)})
    shapes["output_norm.weight"] = (n_embd,)
    if not tied:
        shapes["output.weight"] = (n_vocab, n_embd)
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
        else:
            x = rng.standard_normal(shape) / np.sqrt(shape[1])
            x[rng.random(shape) < 0.01] *= 8
            w.add_tensor(name, x.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# k256: rows of 256 and 512, 8 layers (the _M mixes differ per layer), GQA 4, untied output.
# odd: rows of 192 (K types fall back to 32-blocks) and ffn_down rows of 200 (F16), tied embedding.
# tiny: lowbit's own F16 conversion of the tiny HF checkpoint (rows of 64 and 128), tied.
MODELS = {"k256": dict(n_layer=8, n_embd=256, n_ff=256, n_head=4, n_head_kv=1, n_vocab=288, tied=False),
          "odd": dict(n_layer=2, n_embd=192, n_ff=200, n_head=3, n_head_kv=1, n_vocab=300, tied=True)}


@pytest.fixture(scope="module")
def f16_models(tmp_path_factory) -> dict[str, Path]:
    from model_helpers import tiny_gguf

    d = tmp_path_factory.mktemp("f16")
    out = {name: write_f16_llama(d / f"{name}.gguf", seed=i, **kw) for i, (name, kw) in enumerate(MODELS.items())}
    out["tiny"] = tiny_gguf("f16", tied=True)
    return out


def gguf_predicted_types(path: Path, file_type: str, pure: bool = False) -> dict[str, str]:
    """ftype.tensor_types for a GGUF file, read with gguf-py."""
    r = gguf.GGUFReader(str(path))
    specs = [ftype.TensorSpec(t.name, tuple(int(d) for d in t.shape), t.tensor_type.name) for t in r.tensors]
    facts = ftype.ModelFacts(n_layer=int(r.fields["llama.block_count"].contents()),
                             n_head=int(r.fields["llama.attention.head_count"].contents()),
                             n_head_kv=int(r.fields["llama.attention.head_count_kv"].contents()))
    return ftype.tensor_types(specs, facts, file_type, pure=pure)


_lowbit_files: dict[tuple, Path] = {}


def lowbit_quantized(f16_models: dict[str, Path], model: str, file_type: str, pure: bool = False) -> Path:
    """lowbit quantize of one F16 model, made once per module."""
    key = (model, file_type, pure)
    if key not in _lowbit_files:
        src = f16_models[model]
        out = src.parent / f"{model}-{file_type}{'-pure' if pure else ''}.lowbit.gguf"
        _lowbit_files[key] = lowbit.quantize_file(src, out, file_type, pure=pure, progress=False, force=True)
    return _lowbit_files[key]


def llama_cpp_quantized(src: Path, out: Path, file_type: str, pure: bool = False) -> Path:
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype.file_type_id(file_type)
    params.pure = pure
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


@pytest.mark.parametrize("model", ["k256", "odd", "tiny"])
@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_file_type_tensor_types_follow_llama_cpp_rules(f16_models, model, file_type):
    out = lowbit_quantized(f16_models, model, file_type)
    want = gguf_predicted_types(f16_models[model], file_type)
    fields, tensors = read(out)
    assert {name: t.tensor_type.name for name, t in tensors.items()} == want
    assert fields["general.file_type"].contents() == ftype.file_type_id(file_type)
    if model == "k256":  # the K types and the mix's promotions appear, not only fallbacks
        base = ftype.FILE_TYPES[file_type].base_type
        assert tensors["blk.3.ffn_up.weight"].tensor_type.name == base
        assert tensors["output.weight"].tensor_type.name == "Q6_K"
    # every tensor decodes to the F16 input up to the quantization error of its type
    src = {t.name: t for t in gguf.GGUFReader(str(f16_models[model])).tensors}
    for name, t in tensors.items():
        x = gguf.quants.dequantize(np.asarray(src[name].data), src[name].tensor_type).astype(np.float32)
        y = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        err = np.abs(y - x).max() / np.abs(x).max()
        assert err < 0.3, (name, t.tensor_type.name, err)


@needs_llama_cpp
@pytest.mark.parametrize("model", ["k256", "odd", "tiny"])
@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_file_type_bytes_equal_llama_quantize(f16_models, tmp_path, model, file_type):
    ours = lowbit_quantized(f16_models, model, file_type)
    theirs = llama_cpp_quantized(f16_models[model], tmp_path / "ref.gguf", file_type)
    _, a = read(ours)
    _, b = read(theirs)
    assert set(a) == set(b)
    for name in b:
        assert a[name].tensor_type == b[name].tensor_type, name
        np.testing.assert_array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(b[name].data).view(np.uint8),
                                      err_msg=f"{name} ({b[name].tensor_type.name})")
    assert read(theirs)[0]["general.file_type"].contents() == read(ours)[0]["general.file_type"].contents()


@pytest.mark.parametrize("model", ["k256", "odd"])
def test_pure_gives_the_base_type_where_it_fits(f16_models, tmp_path, model):
    out = lowbit_quantized(f16_models, model, "q4_k_m", pure=True)
    _, tensors = read(out)
    want = gguf_predicted_types(f16_models[model], "q4_k_m", pure=True)
    assert {name: t.tensor_type.name for name, t in tensors.items()} == want
    for name, t in tensors.items():
        if t.data.ndim == 1 or "norm" in name:
            assert t.tensor_type.name == "F32"
        elif t.shape[0] % 256 == 0:  # gguf-py's shape is ggml order: row length first
            assert t.tensor_type.name == "Q4_K", name
    if llama_cpp is not None:
        theirs = llama_cpp_quantized(f16_models[model], tmp_path / "ref.gguf", "q4_k_m", pure=True)
        b = read(theirs)[1]
        for name, t in tensors.items():
            assert t.tensor_type == b[name].tensor_type, name
            np.testing.assert_array_equal(np.asarray(t.data).view(np.uint8), np.asarray(b[name].data).view(np.uint8))


def test_keep_overrides_the_file_type(f16_models, tmp_path):
    src = f16_models["k256"]
    out = lowbit.quantize_file(src, tmp_path / "k.gguf", "q4_k_m", progress=False,
                               keep=["output=q8_0", "blk.*.ffn_down*=q5_k", r"blk\.0\.attn_q=nf4", "blk.1.attn_k=f16"])
    f = lowbit.GGUFFile(out)  # gguf-py does not know NF4's private id
    got = {t.name: t.qtype.name for t in f.tensors}
    want = gguf_predicted_types(src, "q4_k_m")
    want.update({"output.weight": "Q8_0", "blk.0.attn_q.weight": "NF4", "blk.1.attn_k.weight": "F16"})
    want.update({f"blk.{i}.ffn_down.weight": "Q5_K" for i in range(8)})
    assert got == want
    x = lowbit.GGUFFile(src).tensor("blk.2.ffn_down.weight").to_numpy()
    np.testing.assert_array_equal(f.tensor("blk.2.ffn_down.weight").data,
                                  lowbit.quantize(x, lowbit.QType.Q5_K).reshape(-1))
    # A kept type whose block does not fit the row takes llama.cpp's fallback: Q4_K on rows of 192 -> Q5_0.
    odd = lowbit.quantize_file(f16_models["odd"], tmp_path / "o.gguf", "q8_0", progress=False,
                               keep={"blk.0.attn_q": "q4_k", "blk.0.ffn_down": "q4_k", "blk.1.ffn_down": "nf4"})
    _, tensors = read(odd)
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q5_0"
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F16"   # rows of 200: not even 32 fits
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "F16"   # lowbit's own types fall back to F16
    assert tensors["blk.1.attn_q.weight"].tensor_type.name == "Q8_0"


def test_requantizing_needs_allow_requantize(f16_models, tmp_path, caplog):
    q8 = lowbit.quantize_file(f16_models["k256"], tmp_path / "q8.gguf", "q8_0", progress=False)
    with pytest.raises(lowbit.LowbitError, match=r"quantized tensors \(Q8_0: 58 tensors\).*allow-requantize"):
        lowbit.quantize_file(q8, tmp_path / "k.gguf", "q4_k_m", progress=False)
    assert not (tmp_path / "k.gguf").exists()
    with caplog.at_level("WARNING", logger="lowbit.convert"):
        out = lowbit.quantize_file(q8, tmp_path / "k.gguf", "q4_k_m", progress=False, allow_requantize=True)
    assert "requantizing 58 tensors" in caplog.text and "worse" in caplog.text
    src = lowbit.GGUFFile(q8)
    _, tensors = read(out)
    assert {n: t.tensor_type.name for n, t in tensors.items()} == gguf_predicted_types(q8, "q4_k_m")
    for name, t in tensors.items():
        s = src.tensor(name)
        if t.tensor_type.name == s.qtype.name:  # unchanged type (the norms): copied byte for byte
            np.testing.assert_array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), s.data)
        else:  # dequantized with lowbit, quantized again
            want = lowbit.quantize(s.to_numpy(), lowbit.QType[t.tensor_type.name])
            np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), want.reshape(-1), err_msg=name)
    # The same file type again: nothing changes type, nothing is requantized, no flag needed.
    again = lowbit.quantize_file(q8, tmp_path / "q8b.gguf", "q8_0", progress=False)
    for name, t in read(again)[1].items():
        np.testing.assert_array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), src.tensor(name).data)


def test_lowbit_types_keep_every_matrix_but_the_head(f16_models, tmp_path):
    """NF4/FP4 files: every matrix in the type except the output head (the tied token embedding when there is no
    output.weight), which gets Q6_K as in llama.cpp's 4-bit file types; --pure keeps it 4-bit too."""
    for name, qtype in (("nf4", lowbit.QType.NF4), ("fp4", lowbit.QType.FP4)):
        src = f16_models["k256"]
        names = {t.name for t in lowbit.GGUFFile(src).tensors}
        head = "output.weight" if "output.weight" in names else "token_embd.weight"
        out = lowbit.quantize_file(src, tmp_path / f"{name}.gguf", name, progress=False)
        f = lowbit.GGUFFile(out)
        assert f.metadata["general.file_type"] == int(qtype)
        for t in f.tensors:
            want = lowbit.QType.Q6_K if t.name == head else qtype if len(t.shape) == 2 else lowbit.QType.F32
            assert t.qtype == want, t.name
        pure = lowbit.quantize_file(src, tmp_path / f"{name}-pure.gguf", name, progress=False, pure=True)
        assert lowbit.GGUFFile(pure).tensor(head).qtype == qtype
