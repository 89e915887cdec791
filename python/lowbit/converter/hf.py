"""Hugging Face LLaMA checkpoints: config.json parsing, weight files, llama.cpp tensor names, q/k permutation."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from .._core import LowbitError
from .safetensors_np import SafetensorsFile

log = logging.getLogger("lowbit.convert")

# Architectures whose checkpoints are llama-shaped (same tensors, same config keys).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


@dataclass
class LlamaParams:
    """The hyperparameters the GGUF needs, from config.json."""

    architecture: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope_scaling_type: Optional[str]   # None or "linear"
    rope_scaling_factor: Optional[float]
    tie_word_embeddings: bool
    torch_dtype: Optional[str]
    name: str

    @classmethod
    def from_dir(cls, hf_dir: Path) -> "LlamaParams":
        path = hf_dir / "config.json"
        if not path.is_file():
            raise LowbitError(f"{hf_dir}: no config.json; give the directory of a Hugging Face checkpoint")
        cfg = json.loads(path.read_text(encoding="utf-8"))
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise LowbitError(f"{path}: architecture {arch!r} (model_type {cfg.get('model_type')!r}) is not "
                              f"supported; lowbit converts {', '.join(SUPPORTED_ARCHITECTURES)}")

        def need(key: str):
            if key not in cfg:
                raise LowbitError(f"{path}: missing {key!r}, which a llama config must have")
            return cfg[key]

        n_embd = int(need("hidden_size"))
        n_head = int(need("num_attention_heads"))
        n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
        head_dim = int(cfg.get("head_dim") or n_embd // n_head)
        if n_head % n_head_kv:
            raise LowbitError(f"{path}: num_attention_heads {n_head} is not a multiple of num_key_value_heads "
                              f"{n_head_kv}")
        if head_dim % 2:
            raise LowbitError(f"{path}: head_dim {head_dim} is odd; RoPE needs an even head size")
        if cfg.get("sliding_window") and arch == "MistralForCausalLM":
            log.warning("%s: sliding_window=%s is ignored (full attention, as llama.cpp's llama arch does)",
                        path, cfg["sliding_window"])
        # transformers 5 nests RoPE settings in rope_parameters; older configs have rope_theta and
        # rope_scaling at the top level.
        rope = dict(cfg.get("rope_scaling") or {})
        rope.update(cfg.get("rope_parameters") or {})
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rtype = rope.get("rope_type", rope.get("type"))
        factor = rope.get("factor")
        if rtype in (None, "default"):
            rtype, factor = None, None
        elif rtype == "linear":
            factor = float(factor if factor is not None else 1.0)
        else:
            raise LowbitError(f"{path}: RoPE scaling type {rtype!r} is not supported (only 'default' and "
                              f"'linear')")
        return cls(
            architecture=arch, n_vocab=int(need("vocab_size")), n_embd=n_embd,
            n_layer=int(need("num_hidden_layers")), n_ff=int(need("intermediate_size")), n_head=n_head,
            n_head_kv=n_head_kv, head_dim=head_dim, n_ctx=int(cfg.get("max_position_embeddings") or 2048),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling_type=rtype,
            rope_scaling_factor=factor, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"), name=hf_dir.resolve().name)


# ---- weight files ------------------------------------------------------------------------------------


class Checkpoint:
    """The tensors of a checkpoint directory (single/sharded safetensors, or pytorch_model*.bin), by HF
    name, loaded one at a time as float32."""

    def __init__(self, hf_dir: Path):
        self.dir = hf_dir
        self._where: dict[str, Callable[[], np.ndarray]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        st_index = hf_dir / "model.safetensors.index.json"
        bin_index = hf_dir / "pytorch_model.bin.index.json"
        if st_index.is_file():
            self._add_safetensors(self._index_files(st_index))
        elif (hf_dir / "model.safetensors").is_file():
            self._add_safetensors([hf_dir / "model.safetensors"])
        elif bin_index.is_file():
            self._add_bins(self._index_files(bin_index))
        elif (hf_dir / "pytorch_model.bin").is_file():
            self._add_bins([hf_dir / "pytorch_model.bin"])
        else:
            singles = sorted(hf_dir.glob("*.safetensors"))
            if not singles:
                raise LowbitError(f"{hf_dir}: no weights found (model.safetensors, model.safetensors.index.json, "
                                  f"pytorch_model.bin or pytorch_model.bin.index.json)")
            self._add_safetensors(singles)

    def _index_files(self, index: Path) -> list[Path]:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        files = []
        for fname in weight_map.values():
            p = self.dir / fname
            if p not in files:
                files.append(p)
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise LowbitError(f"{index}: shard files are missing: {', '.join(missing)}")
        return files

    def _add_safetensors(self, files: list[Path]) -> None:
        for path in files:
            st = SafetensorsFile(path)
            for name in st.keys():
                self._where[name] = (lambda st=st, name=name: st.get_f32(name))
                self._shapes[name] = st.shape(name)

    def _add_bins(self, files: list[Path]) -> None:
        import torch  # only pytorch .bin checkpoints need torch

        for path in files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for a bad file
                raise LowbitError(f"{path}: cannot read this pytorch checkpoint ({e})") from None
            for name, t in state.items():
                if not isinstance(t, torch.Tensor):
                    continue
                self._where[name] = (lambda t=t: t.detach().to(torch.float32).numpy())
                self._shapes[name] = tuple(t.shape)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def load(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self._where[name](), dtype=np.float32)


# ---- names and permutation ---------------------------------------------------------------------------

_LAYER_MAP = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Present in some checkpoints, recomputed at run time: skipped.
_SKIP_RE = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def gguf_name(hf_name: str) -> Optional[str]:
    """llama.cpp's name for an HF tensor (spec "Standardized tensor names"), None to skip it."""
    if _SKIP_RE.search(hf_name):
        return None
    if hf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    raise LowbitError(f"tensor {hf_name!r} has no llama GGUF name; this checkpoint has parts a llama model "
                      f"does not (adapters? a different architecture?)")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q_proj/k_proj weight (n_head * head_dim, n_embd) from HF's rotate-half RoPE
    pairs (i, i + head_dim/2) to ggml's adjacent pairs (2i, 2i + 1), per head, like llama.cpp's
    convert_hf_to_gguf.py LlamaModel.permute (reference §1.6)."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


TensorSource = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


def iter_tensors(ckpt: Checkpoint, params: LlamaParams) -> Iterator[TensorSource]:
    """(gguf name, numpy shape, loader) in llama.cpp's order: token_embd, blocks, output_norm, output."""
    items: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}
    for hf in ckpt.names():
        name = gguf_name(hf)
        if name is None:
            continue
        if name == "output.weight" and params.tie_word_embeddings:
            continue
        load = (lambda hf=hf: ckpt.load(hf))
        if name.endswith("attn_q.weight"):
            load = (lambda hf=hf: permute_qk(ckpt.load(hf), params.n_head))
        elif name.endswith("attn_k.weight"):
            load = (lambda hf=hf: permute_qk(ckpt.load(hf), params.n_head_kv))
        items[name] = (ckpt.shape(hf), load)
    if "token_embd.weight" not in items:
        raise LowbitError(f"{ckpt.dir}: model.embed_tokens.weight is missing from the weights")

    def order(name: str) -> tuple:
        if name == "token_embd.weight":
            return (0, 0, "")
        m = re.match(r"blk\.(\d+)\.(.+)$", name)
        if m:
            return (1, int(m.group(1)), list(_LAYER_MAP.values()).index(m.group(2).rsplit(".", 1)[0]))
        return (2, 0 if name.startswith("output_norm") else 1, name)

    for name in sorted(items, key=order):
        shape, load = items[name]
        yield name, shape, load
