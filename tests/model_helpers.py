"""Helpers for the model tests: tiny checkpoints converted once per session, transformers reference logits,
KL / top-1 metrics, and hand-made GGUF files for the error tests (written with llama.cpp's gguf package)."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

import lowbit

N_THREADS = 2
_ROOT = Path(tempfile.mkdtemp(prefix="lowbit-model-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def tiny_hf(seed: int = 0, tied: bool = False, n_kv_heads: int = 2) -> Path:
    from tiny_models import make_tiny_llama

    return make_tiny_llama(_ROOT / "hf", seed=seed, tied=tied, n_kv_heads=n_kv_heads)


@functools.lru_cache(maxsize=None)
def tiny_gguf(qtype: str = "f32", seed: int = 0, tied: bool = False, n_kv_heads: int = 2) -> Path:
    """The tiny checkpoint converted with lowbit.convert (every 2-D tensor in qtype, norms F32)."""
    hf = tiny_hf(seed, tied, n_kv_heads)
    out = _ROOT / f"tiny-{qtype}-s{seed}-{'tied' if tied else 'untied'}-kv{n_kv_heads}.gguf"
    if not out.exists():  # lru_cache keys differ for positional and default arguments
        lowbit.convert(hf, out, outtype=qtype, progress=False)
    return out


@functools.lru_cache(maxsize=None)
def _hf_model(hf_dir: Path):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=None)
def _hf_model_rounded(hf_dir: Path, dtype: str):
    """The model with every 2-D weight rounded to dtype and back (what an F16/BF16 file holds); norms and
    all arithmetic stay fp32."""
    import copy

    import torch

    model = copy.deepcopy(_hf_model(hf_dir))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.to(getattr(torch, dtype)).float())
    return model


def hf_logits(hf_dir: Path, ids: np.ndarray, weights_as: Optional[str] = None) -> np.ndarray:
    """transformers fp32 logits (len(ids), n_vocab) for one sequence; weights_as="float16" rounds the
    matrices to fp16 first."""
    import torch

    model = _hf_model(hf_dir) if weights_as is None else _hf_model_rounded(hf_dir, weights_as)
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None])
    return out.logits[0].float().numpy()


def hf_greedy(hf_dir: Path, ids: np.ndarray, n_new: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = _hf_model(hf_dir).generate(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None], do_sample=False,
                                         max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=None,
                                         pad_token_id=0)
    return out[0, len(ids):].tolist()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_and_top1(ref: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """Mean KL(ref || ours) over positions, and the fraction of positions whose argmax agrees."""
    lp, lq = log_softmax(ref), log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return float(kl.mean()), float((ref.argmax(-1) == ours.argmax(-1)).mean())


def random_ids(n: int, n_vocab: int, seed: int = 0, low: int = 3) -> np.ndarray:
    """n token ids, skipping the special tokens at 0..low-1."""
    return np.random.default_rng(seed).integers(low, n_vocab, size=n).astype(np.int32)


def write_synthetic_gguf(path: Path, arch: str = "llama", n_embd: int = 256, n_ff: int = 256, n_vocab: int = 32,
                         n_head: int = 4, types: Optional[dict[str, int]] = None, drop: tuple[str, ...] = (),
                         shapes: Optional[dict[str, tuple[int, ...]]] = None, keys: Optional[dict] = None) -> Path:
    """A one-layer llama-shaped GGUF with random F32 weights, written by gguf.GGUFWriter.

    types: tensor name -> ggml type id whose bytes are random (for unsupported-type tests); drop: tensors
    left out; shapes: numpy shapes overriding the right ones; keys: extra/overriding uint32 metadata."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.context_length", 64)
    w.add_uint32(f"{arch}.embedding_length", n_embd)
    w.add_uint32(f"{arch}.block_count", 1)
    w.add_uint32(f"{arch}.feed_forward_length", n_ff)
    w.add_uint32(f"{arch}.attention.head_count", n_head)
    w.add_uint32(f"{arch}.attention.head_count_kv", n_head)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    for k, v in (keys or {}).items():
        w.add_uint32(k, v)
    tensors = {
        "token_embd.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,), "output.weight": (n_vocab, n_embd),
        "blk.0.attn_norm.weight": (n_embd,), "blk.0.attn_q.weight": (n_embd, n_embd),
        "blk.0.attn_k.weight": (n_embd, n_embd), "blk.0.attn_v.weight": (n_embd, n_embd),
        "blk.0.attn_output.weight": (n_embd, n_embd), "blk.0.ffn_norm.weight": (n_embd,),
        "blk.0.ffn_gate.weight": (n_ff, n_embd), "blk.0.ffn_up.weight": (n_ff, n_embd),
        "blk.0.ffn_down.weight": (n_embd, n_ff),
    }
    tensors.update(shapes or {})
    for name, shape in tensors.items():
        if name in drop:
            continue
        qt = (types or {}).get(name)
        if qt is None:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
        else:
            gt = gguf.GGMLQuantizationType(qt)
            block, size = gguf.GGML_QUANT_SIZES[gt]
            raw = rng.integers(0, 256, size=(shape[0], shape[1] // block * size), dtype=np.uint8)
            if gt == gguf.GGMLQuantizationType.Q4_K:
                raw[:, :4] = 0  # zero fp16 scales: no NaN/Inf in the data, only the type is the problem
            w.add_tensor(name, raw, raw_dtype=gt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    # Inverse of llama.cpp's q/k row permutation (adjacent RoPE pairs back to rotate-half halves).
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.lru_cache(maxsize=None)
def _hf_model_from_gguf(hf_dir: Path, gguf_path: Path):
    """transformers' model carrying the GGUF file's weights, dequantized to fp32: by llama.cpp's gguf package
    for ggml types, by lowbit for NF4 (no ggml id)."""
    import copy

    import gguf
    import torch

    model = copy.deepcopy(_hf_model(hf_dir))
    cfg = model.config
    state = model.state_dict()
    for t in lowbit.GGUFFile(gguf_path).tensors:
        if t.type_id < 1024:
            w = gguf.quants.dequantize(np.array(t.data), gguf.GGMLQuantizationType(t.type_id)).astype(np.float32)
        else:
            w = t.to_numpy()
        w = w.reshape(t.shape)
        if t.name == "token_embd.weight":
            names = ["model.embed_tokens.weight"] + (["lm_head.weight"] if cfg.tie_word_embeddings else [])
        elif t.name == "output.weight":
            names = ["lm_head.weight"]
        elif t.name == "output_norm.weight":
            names = ["model.norm.weight"]
        else:
            _, layer, kind, _ = t.name.split(".")
            names = [f"model.layers.{layer}.{_HF_NAMES[kind]}.weight"]
            if kind == "attn_q":
                w = _unpermute_qk(w, cfg.num_attention_heads)
            elif kind == "attn_k":
                w = _unpermute_qk(w, cfg.num_key_value_heads)
        for n in names:
            assert state[n].shape == w.shape, (n, state[n].shape, w.shape)
            state[n] = torch.from_numpy(np.ascontiguousarray(w))
    model.load_state_dict(state)
    return model.eval()


def hf_logits_same_weights(hf_dir: Path, gguf_path: Path, ids: np.ndarray) -> np.ndarray:
    """transformers fp32 logits with the file's (dequantized) weights: what lowbit should compute, up to the
    int8 quantization of activations."""
    import torch

    with torch.no_grad():
        out = _hf_model_from_gguf(hf_dir, gguf_path)(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None])
    return out.logits[0].float().numpy()
