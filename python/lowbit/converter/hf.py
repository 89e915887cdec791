"""Hugging Face checkpoints of llama-shaped models (Llama 1-3, Mistral, Qwen2, Qwen3): config.json parsing, weight
files, llama.cpp's tensor names and metadata keys, q/k permutation, Llama 3's RoPE factors."""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .._core import LowbitError
from .metadata import KV
from .safetensors_np import SafetensorsFile

log = logging.getLogger("lowbit.convert")

QUANTIZATION_VERSION = 2  # GGML_QUANT_VERSION (reference §1.3)

# HF architecture -> llama.cpp's general.architecture. All are llama-shaped (same tensors, same config keys);
# qwen2 adds q/k/v biases, qwen3 per-head q/k RMSNorms and an explicit head size, and both keep HF's
# rotate-half q/k layout (llama.cpp's neox RoPE) where llama's rows are permuted to adjacent pairs.
GGUF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ARCHITECTURES = tuple(GGUF_ARCHITECTURES)


@dataclass
class LlamaParams:
    """The hyperparameters the GGUF needs, from config.json."""

    architecture: str
    gguf_arch: str                     # general.architecture: "llama", "qwen2" or "qwen3"
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
    rope_scaling_type: Optional[str]   # None, "linear" or "llama3"
    rope_scaling_factor: Optional[float]
    tie_word_embeddings: bool
    torch_dtype: Optional[str]
    name: str
    explicit_head_dim: bool = False    # config.json has head_dim (llama.cpp then writes attention.key_length)
    rope_low_freq_factor: float = 1.0  # Llama 3 scaling (rope_type "llama3")
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192

    @property
    def interleaved_rope(self) -> bool:
        """llama stores q/k rows as adjacent RoPE pairs (ggml "normal"); qwen2/qwen3 keep HF's halves (neox)."""
        return self.gguf_arch == "llama"

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
        llama3: dict[str, Any] = {}
        if rtype in (None, "default"):
            rtype, factor = None, None
        elif rtype == "linear":
            factor = float(factor if factor is not None else 1.0)
        elif rtype == "llama3":
            # Defaults as llama.cpp's converter (conversion/llama.py generate_extra_tensors) takes them.
            factor = float(factor if factor is not None else 8.0)
            llama3 = dict(rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                          rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                          rope_original_context=int(rope.get("original_max_position_embeddings", 8192)))
        else:
            raise LowbitError(f"{path}: RoPE scaling type {rtype!r} is not supported (only 'default', 'linear' "
                              f"and 'llama3')")
        return cls(
            architecture=arch, gguf_arch=GGUF_ARCHITECTURES[arch], n_vocab=int(need("vocab_size")), n_embd=n_embd,
            n_layer=int(need("num_hidden_layers")), n_ff=int(need("intermediate_size")), n_head=n_head,
            n_head_kv=n_head_kv, head_dim=head_dim, n_ctx=int(cfg.get("max_position_embeddings") or 2048),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling_type=rtype,
            rope_scaling_factor=factor, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"), name=hf_dir.resolve().name,
            explicit_head_dim=cfg.get("head_dim") is not None, **llama3)

    def rope_freq_factors(self) -> np.ndarray:
        """rope_freqs.weight of Llama 3 scaling: per RoPE pair j, the divisor of its frequency (1 for high
        frequencies, factor for low ones, a smooth blend between), as llama.cpp's converter computes it."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float32) / np.float32(self.head_dim)
        freqs = 1.0 / (np.float32(self.rope_theta) ** exponents)
        low_wavelen = self.rope_original_context / self.rope_low_freq_factor
        high_wavelen = self.rope_original_context / self.rope_high_freq_factor
        out = []
        for freq in freqs.astype(np.float32):
            wavelen = 2 * math.pi / float(freq)
            if wavelen < high_wavelen:
                out.append(1.0)
            elif wavelen > low_wavelen:
                out.append(self.rope_scaling_factor)
            else:
                smooth = ((self.rope_original_context / wavelen - self.rope_low_freq_factor)
                          / (self.rope_high_freq_factor - self.rope_low_freq_factor))
                out.append(1.0 / ((1.0 - smooth) / self.rope_scaling_factor + smooth))
        return np.asarray(out, dtype=np.float32)


def model_metadata(p: LlamaParams, file_type: int) -> list[KV]:
    """general.* and {arch}.* keys as llama.cpp's convert_hf_to_gguf.py writes them for this architecture,
    typed as gguf-py types them (reference §1.2, §1.5)."""
    a = p.gguf_arch
    kvs = [
        KV.str("general.architecture", a),
        KV.str("general.name", p.name),
        KV.u32(f"{a}.block_count", p.n_layer),
        KV.u32(f"{a}.context_length", p.n_ctx),
        KV.u32(f"{a}.embedding_length", p.n_embd),
        KV.u32(f"{a}.feed_forward_length", p.n_ff),
        KV.u32(f"{a}.attention.head_count", p.n_head),
        KV.u32(f"{a}.attention.head_count_kv", p.n_head_kv),
    ]
    if p.rope_scaling_type == "linear":
        kvs += [KV.str(f"{a}.rope.scaling.type", "linear"), KV.f32(f"{a}.rope.scaling.factor", p.rope_scaling_factor)]
    kvs += [KV.f32(f"{a}.rope.freq_base", p.rope_theta), KV.f32(f"{a}.attention.layer_norm_rms_epsilon", p.rms_eps)]
    # llama.cpp writes the head size whenever config.json has head_dim; for llama lowbit writes it only where
    # it differs from n_embd / n_head (the value llama.cpp's loader defaults to), as it always has.
    if p.head_dim != p.n_embd // p.n_head or (p.explicit_head_dim and a != "llama"):
        kvs += [KV.u32(f"{a}.attention.key_length", p.head_dim), KV.u32(f"{a}.attention.value_length", p.head_dim)]
    kvs.append(KV.u32("general.file_type", file_type))
    if a == "llama":  # conversion/llama.py: vocabulary size and RoPE dimensions, after the common keys
        kvs += [KV.u32("llama.vocab_size", p.n_vocab), KV.u32("llama.rope.dimension_count", p.head_dim)]
    kvs.append(KV.u32("general.quantization_version", QUANTIZATION_VERSION))
    return kvs


def tensor_shape(p: LlamaParams, name: str) -> Optional[tuple[int, ...]]:
    """The numpy shape config.json implies for a GGUF tensor name, None for names it says nothing about."""
    q_rows, kv_rows = p.n_head * p.head_dim, p.n_head_kv * p.head_dim
    if name.startswith("blk."):
        key = name.split(".", 2)[2]
        return {"attn_norm.weight": (p.n_embd,), "attn_q.weight": (q_rows, p.n_embd),
                "attn_k.weight": (kv_rows, p.n_embd), "attn_v.weight": (kv_rows, p.n_embd),
                "attn_q.bias": (q_rows,), "attn_k.bias": (kv_rows,), "attn_v.bias": (kv_rows,),
                "attn_q_norm.weight": (p.head_dim,), "attn_k_norm.weight": (p.head_dim,),
                "attn_output.weight": (p.n_embd, q_rows), "ffn_norm.weight": (p.n_embd,),
                "ffn_gate.weight": (p.n_ff, p.n_embd), "ffn_up.weight": (p.n_ff, p.n_embd),
                "ffn_down.weight": (p.n_embd, p.n_ff)}.get(key)
    return {"token_embd.weight": (p.n_vocab, p.n_embd), "output.weight": (p.n_vocab, p.n_embd),
            "output_norm.weight": (p.n_embd,), "rope_freqs.weight": (p.head_dim // 2,)}.get(name)


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
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
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
    raise LowbitError(f"tensor {hf_name!r} has no GGUF name; this checkpoint has parts a llama-shaped model "
                      f"does not (adapters? a different architecture?)")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q_proj/k_proj weight (n_head * head_dim, n_embd) from HF's rotate-half RoPE
    pairs (i, i + head_dim/2) to ggml's adjacent pairs (2i, 2i + 1), per head, like llama.cpp's
    convert_hf_to_gguf.py LlamaModel.permute (reference §1.6)."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


TensorSource = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


def iter_tensors(ckpt: Checkpoint, params: LlamaParams) -> Iterator[TensorSource]:
    """(gguf name, numpy shape, loader) in llama.cpp's order: rope_freqs (Llama 3 scaling), token_embd, blocks,
    output_norm, output."""
    items: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}
    if params.rope_scaling_type == "llama3":
        items["rope_freqs.weight"] = ((params.head_dim // 2,), params.rope_freq_factors)
    for hf in ckpt.names():
        name = gguf_name(hf)
        if name is None:
            continue
        if name == "output.weight" and params.tie_word_embeddings:
            continue
        load = (lambda hf=hf: ckpt.load(hf))
        if params.interleaved_rope and name.endswith(("attn_q.weight", "attn_q.bias")):
            load = (lambda hf=hf: permute_qk(ckpt.load(hf), params.n_head))
        elif params.interleaved_rope and name.endswith(("attn_k.weight", "attn_k.bias")):
            load = (lambda hf=hf: permute_qk(ckpt.load(hf), params.n_head_kv))
        items[name] = (ckpt.shape(hf), load)
    if "token_embd.weight" not in items:
        raise LowbitError(f"{ckpt.dir}: model.embed_tokens.weight is missing from the weights")

    def order(name: str) -> tuple:
        if name == "rope_freqs.weight":
            return (-1, 0, 0, "")
        if name == "token_embd.weight":
            return (0, 0, 0, "")
        m = re.match(r"blk\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m:
            return (1, int(m.group(1)), list(_LAYER_MAP.values()).index(m.group(2)), m.group(3) != "weight")
        return (2, 0 if name.startswith("output_norm") else 1, 0, name)

    for name in sorted(items, key=order):
        shape, load = items[name]
        yield name, shape, load
