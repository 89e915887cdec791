"""Hugging Face checkpoints of llama-shaped models (Llama 1-3, Mistral, Qwen2, Qwen3, Gemma 3): config.json parsing,
weight files, llama.cpp's tensor names and metadata keys, q/k permutation, Llama 3's RoPE factors, Gemma's norm
shift."""
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
from .metadata import KV, VT
from .prequant import PackedLinear, PrequantConfig, packed_linears
from .safetensors_np import SafetensorsFile

log = logging.getLogger("lowbit.convert")

QUANTIZATION_VERSION = 2  # GGML_QUANT_VERSION (reference §1.3)

# HF architecture -> llama.cpp's general.architecture. All are llama-shaped (same tensors, same config keys);
# qwen2 adds q/k/v biases, qwen3 per-head q/k RMSNorms and an explicit head size, and both keep HF's
# rotate-half q/k layout (llama.cpp's neox RoPE) where llama's rows are permuted to adjacent pairs. gemma3
# adds norms after attention and feed-forward, RMSNorms computed as x * (1 + w) (written as 1 + w, as
# llama.cpp's converter does), sliding-window blocks, and GELU; its multimodal checkpoints
# (Gemma3ForConditionalGeneration) convert to their text part.
GGUF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
}

# Gemma3TextConfig's defaults (transformers), for the keys a Gemma 3 config.json may leave out (the text_config
# of the multimodal checkpoints lists only what differs).
GEMMA3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window": 4096,
    "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "final_logit_softcapping": None,
    "tie_word_embeddings": True,
}
GEMMA3_SWA_PATTERN = 6        # llama.cpp's default for gemma3 files without attention.sliding_window_pattern
GEMMA3_SWA_ROPE_BASE = 10000.0  # ... and without rope.freq_base_swa
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
    rope_scaling_type: Optional[str]   # None, "linear", "yarn" or "llama3"
    rope_scaling_factor: Optional[float]
    tie_word_embeddings: bool
    torch_dtype: Optional[str]
    name: str
    explicit_head_dim: bool = False    # config.json has head_dim (llama.cpp then writes attention.key_length)
    rope_low_freq_factor: float = 1.0  # Llama 3 scaling (rope_type "llama3")
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    rope_yarn_beta_fast: Optional[float] = None  # YaRN (rope_type "yarn"), where config.json sets them
    rope_yarn_beta_slow: Optional[float] = None
    # Gemma 3
    norm_shift: float = 0.0            # added to every norm weight (HF's x * (1 + w) stored as 1 + w)
    sliding_window: int = 0            # positions a sliding block attends to; 0: every block is global
    sliding_layers: Optional[list[bool]] = None  # per block, True = sliding
    rope_theta_swa: Optional[float] = None       # RoPE base of the sliding blocks
    query_pre_attn_scalar: Optional[float] = None  # queries scaled by its ^-0.5 (None: head_dim)
    final_logit_softcapping: Optional[float] = None
    # GPTQ / AWQ checkpoints: how their packed linears are stored (converter/prequant.py); None: unquantized
    prequant: Optional[PrequantConfig] = None

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
        prequant = PrequantConfig.from_hf_dir(hf_dir, cfg)
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise LowbitError(f"{path}: architecture {arch!r} (model_type {cfg.get('model_type')!r}) is not "
                              f"supported; lowbit converts {', '.join(SUPPORTED_ARCHITECTURES)}")
        gemma3: dict[str, Any] = {}
        if GGUF_ARCHITECTURES[arch] == "gemma3":
            cfg, gemma3 = _gemma3_config(cfg, arch, path)

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
        if isinstance(rope.get("full_attention"), dict):  # per layer kind (Gemma 3); scaling is the global blocks'
            rope = dict(rope["full_attention"])
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rtype = rope.get("rope_type", rope.get("type"))
        factor = rope.get("factor")
        scaling_extra: dict[str, Any] = {}
        if rtype in (None, "default"):
            rtype, factor = None, None
        elif rtype == "linear":
            factor = float(factor if factor is not None else 1.0)
        elif rtype == "llama3":
            # Defaults as llama.cpp's converter (conversion/llama.py generate_extra_tensors) takes them.
            factor = float(factor if factor is not None else 8.0)
            scaling_extra = dict(rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                                 rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                                 rope_original_context=int(rope.get("original_max_position_embeddings", 8192)))
        elif rtype == "yarn":
            # As llama.cpp's converter: the factor, the original context (HF's default: max_position_embeddings),
            # beta_fast/beta_slow only where the config has them. The attention factor is derived from the factor
            # (0.1 ln factor + 1) by both runtimes; an explicit one, or DeepSeek's mscale, is not carried.
            if rope.get("attention_factor") is not None or rope.get("mscale_all_dim"):
                raise LowbitError(f"{path}: YaRN with an explicit attention_factor or mscale_all_dim is not "
                                  f"supported")
            orig = rope.get("original_max_position_embeddings")
            if factor is None and orig:
                factor = float(cfg.get("max_position_embeddings") or orig) / float(orig)
            factor = float(factor if factor is not None else 1.0)
            scaling_extra = dict(rope_original_context=int(orig or cfg.get("max_position_embeddings") or 2048),
                                 rope_yarn_beta_fast=rope.get("beta_fast"), rope_yarn_beta_slow=rope.get("beta_slow"))
        else:
            raise LowbitError(f"{path}: RoPE scaling type {rtype!r} is not supported (only 'default', 'linear', "
                              f"'yarn' and 'llama3')")
        return cls(
            architecture=arch, gguf_arch=GGUF_ARCHITECTURES[arch], n_vocab=int(need("vocab_size")), n_embd=n_embd,
            n_layer=int(need("num_hidden_layers")), n_ff=int(need("intermediate_size")), n_head=n_head,
            n_head_kv=n_head_kv, head_dim=head_dim, n_ctx=int(cfg.get("max_position_embeddings") or 2048),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling_type=rtype,
            rope_scaling_factor=factor, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"), name=hf_dir.resolve().name,
            explicit_head_dim=cfg.get("head_dim") is not None, prequant=prequant, **scaling_extra, **gemma3)

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


def _gemma3_config(cfg: dict, arch: str, path: Path) -> tuple[dict, dict[str, Any]]:
    """A Gemma 3 config.json (or its text_config) with Gemma3TextConfig's defaults filled in, and the
    LlamaParams fields only Gemma has."""
    text = cfg.get("text_config") if arch == "Gemma3ForConditionalGeneration" else cfg
    if not isinstance(text, dict):
        raise LowbitError(f"{path}: {arch} without a text_config")
    full = dict(GEMMA3_DEFAULTS)
    full.update({k: v for k, v in text.items() if v is not None or k == "final_logit_softcapping"})
    if "tie_word_embeddings" in cfg and "tie_word_embeddings" not in text:
        full["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    if full.get("attn_logit_softcapping") is not None:
        raise LowbitError(f"{path}: attn_logit_softcapping is set, which Gemma 3 does not use (Gemma 2?); "
                          f"not supported")
    n_layer = int(full["num_hidden_layers"])
    layer_types = full.get("layer_types")
    if layer_types:
        if len(layer_types) != n_layer or not set(layer_types) <= {"sliding_attention", "full_attention"}:
            raise LowbitError(f"{path}: layer_types must name sliding_attention or full_attention for each of the "
                              f"{n_layer} layers")
        sliding = [t == "sliding_attention" for t in layer_types]
    else:
        pattern = int(full.get("sliding_window_pattern") or GEMMA3_SWA_PATTERN)
        sliding = [(i + 1) % pattern != 0 for i in range(n_layer)]
    window = int(full.get("sliding_window") or 0)
    if window <= 0 or not any(sliding):
        window, sliding = 0, [False] * n_layer
    rope = full.get("rope_parameters") or {}
    swa_theta = (rope.get("sliding_attention") or {}).get("rope_theta") if isinstance(rope, dict) else None
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        full["rope_theta"] = rope["full_attention"].get("rope_theta", full["rope_theta"])
    extra = dict(norm_shift=1.0, sliding_window=window, sliding_layers=sliding,
                 rope_theta_swa=float(swa_theta if swa_theta is not None else full["rope_local_base_freq"]),
                 query_pre_attn_scalar=float(full["query_pre_attn_scalar"]),
                 final_logit_softcapping=(float(full["final_logit_softcapping"])
                                          if full.get("final_logit_softcapping") else None))
    return full, extra


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
    elif p.rope_scaling_type == "yarn":
        kvs += [KV.str(f"{a}.rope.scaling.type", "yarn"), KV.f32(f"{a}.rope.scaling.factor", p.rope_scaling_factor),
                KV.u32(f"{a}.rope.scaling.original_context_length", p.rope_original_context)]
        if p.rope_yarn_beta_fast is not None:
            kvs.append(KV.f32(f"{a}.rope.scaling.yarn_beta_fast", p.rope_yarn_beta_fast))
        if p.rope_yarn_beta_slow is not None:
            kvs.append(KV.f32(f"{a}.rope.scaling.yarn_beta_slow", p.rope_yarn_beta_slow))
    kvs += [KV.f32(f"{a}.rope.freq_base", p.rope_theta), KV.f32(f"{a}.attention.layer_norm_rms_epsilon", p.rms_eps)]
    # llama.cpp writes the head size whenever config.json has head_dim; for llama lowbit writes it only where
    # it differs from n_embd / n_head (the value llama.cpp's loader defaults to), as it always has.
    if p.head_dim != p.n_embd // p.n_head or (p.explicit_head_dim and a != "llama"):
        kvs += [KV.u32(f"{a}.attention.key_length", p.head_dim), KV.u32(f"{a}.attention.value_length", p.head_dim)]
    if a == "gemma3":
        kvs += _gemma3_metadata(p)
    kvs.append(KV.u32("general.file_type", file_type))
    if a == "llama":  # conversion/llama.py: vocabulary size and RoPE dimensions, after the common keys
        kvs += [KV.u32("llama.vocab_size", p.n_vocab), KV.u32("llama.rope.dimension_count", p.head_dim)]
    kvs.append(KV.u32("general.quantization_version", QUANTIZATION_VERSION))
    return kvs


def _gemma3_metadata(p: LlamaParams) -> list[KV]:
    """gemma3.* keys beyond the common ones: the window, and what llama.cpp would otherwise assume (a global
    block every 6, sliding blocks' RoPE base 10000, queries scaled by head_dim^-0.5 or, at 62 blocks,
    (n_embd / n_head)^-0.5) only where this checkpoint differs."""
    kvs = []
    if p.sliding_window > 0:
        kvs.append(KV.u32("gemma3.attention.sliding_window", p.sliding_window))
        default = [(i % GEMMA3_SWA_PATTERN) < GEMMA3_SWA_PATTERN - 1 for i in range(p.n_layer)]
        if p.sliding_layers != default:
            kvs.append(KV.arr("gemma3.attention.sliding_window_pattern", p.sliding_layers, VT.BOOL))
        if p.rope_theta_swa is not None and p.rope_theta_swa != GEMMA3_SWA_ROPE_BASE:
            kvs.append(KV.f32("gemma3.rope.freq_base_swa", p.rope_theta_swa))
    if p.final_logit_softcapping:
        kvs.append(KV.f32("gemma3.final_logit_softcapping", p.final_logit_softcapping))
    scalar = p.query_pre_attn_scalar or p.head_dim
    assumed = p.n_embd // p.n_head if p.n_layer == 62 else p.head_dim
    if scalar != assumed:
        log.warning("query_pre_attn_scalar %s differs from what llama.cpp assumes for this shape (%s); lowbit reads "
                    "gemma3.attention.scale, llama.cpp ignores it", scalar, assumed)
        kvs.append(KV.f32("gemma3.attention.scale", scalar ** -0.5))
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
                "ffn_down.weight": (p.n_embd, p.n_ff), "post_attention_norm.weight": (p.n_embd,),
                "post_ffw_norm.weight": (p.n_embd,)}.get(key)
    return {"token_embd.weight": (p.n_vocab, p.n_embd), "output.weight": (p.n_vocab, p.n_embd),
            "output_norm.weight": (p.n_embd,), "rope_freqs.weight": (p.head_dim // 2,)}.get(name)


# ---- weight files ------------------------------------------------------------------------------------


class Checkpoint:
    """The tensors of a checkpoint directory (single/sharded safetensors, or pytorch_model*.bin), by HF
    name, loaded one at a time as float32 (load) or as stored (load_raw: the int32 words of GPTQ/AWQ)."""

    def __init__(self, hf_dir: Path):
        self.dir = hf_dir
        self._where: dict[str, Callable[[], np.ndarray]] = {}
        self._raw: dict[str, Callable[[], np.ndarray]] = {}
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
                self._raw[name] = (lambda st=st, name=name: st.read(name))
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
                self._raw[name] = (lambda t=t: t.detach().contiguous().numpy())
                self._shapes[name] = tuple(t.shape)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def load(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self._where[name](), dtype=np.float32)

    def load_raw(self, name: str) -> np.ndarray:
        """The stored values in their own dtype (safetensors BF16 as uint16 bits)."""
        return np.ascontiguousarray(self._raw[name]())


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
# Gemma 3 names its four norms by place: before and after attention, before and after the feed-forward.
_GEMMA3_LAYER_MAP = {
    **_LAYER_MAP,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# llama.cpp's order of a block's tensors.
_BLOCK_ORDER = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm", "attn_output",
                "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm"]
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Present in some checkpoints, recomputed at run time: skipped.
_SKIP_RE = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")
# The text model inside a multimodal checkpoint (Gemma3ForConditionalGeneration, transformers >= 4.52 and older
# layouts) and the parts of it that are not text: the vision tower and its projector are skipped.
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_NOT_TEXT_RE = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")


def gguf_name(hf_name: str, arch: str = "llama") -> Optional[str]:
    """llama.cpp's name for an HF tensor of a general.architecture (spec "Standardized tensor names"), None
    to skip it."""
    if _SKIP_RE.search(hf_name) or _NOT_TEXT_RE.match(hf_name):
        return None
    for prefix, plain in _TEXT_PREFIXES:
        if hf_name.startswith(prefix):
            hf_name = plain + hf_name[len(prefix):]
            break
    if hf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[hf_name]
    layer_map = _GEMMA3_LAYER_MAP if arch == "gemma3" else _LAYER_MAP
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in layer_map:
        return f"blk.{m.group(1)}.{layer_map[m.group(2)]}.{m.group(3)}"
    raise LowbitError(f"tensor {hf_name!r} has no GGUF name; this checkpoint has parts a llama-shaped model "
                      f"does not (adapters? a different architecture?)")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q_proj/k_proj weight (n_head * head_dim, n_embd) from HF's rotate-half RoPE
    pairs (i, i + head_dim/2) to ggml's adjacent pairs (2i, 2i + 1), per head, like llama.cpp's
    convert_hf_to_gguf.py LlamaModel.permute (reference §1.6)."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


TensorSource = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


def _packed(ckpt: Checkpoint, params: LlamaParams) -> dict[str, PackedLinear]:
    """The checkpoint's GPTQ/AWQ linears (converter/prequant.py), by HF name without ".qweight"."""
    if params.prequant is None:
        if any(n.endswith(".qweight") for n in ckpt.names()):
            raise LowbitError(f"{ckpt.dir}: the weights hold packed .qweight tensors (GPTQ or AWQ), but config.json "
                              f"has no quantization_config saying how they are packed")
        return {}
    packed = packed_linears(ckpt, params.prequant)
    log.info("%s: %s checkpoint, %d packed linears", ckpt.dir, params.prequant.label, len(packed))
    return packed


def iter_tensors(ckpt: Checkpoint, params: LlamaParams) -> Iterator[TensorSource]:
    """(gguf name, numpy shape, loader) in llama.cpp's order: rope_freqs (Llama 3 scaling), token_embd, blocks,
    output_norm, output."""
    items: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}
    if params.rope_scaling_type == "llama3":
        items["rope_freqs.weight"] = ((params.head_dim // 2,), params.rope_freq_factors)
    packed = _packed(ckpt, params)
    consumed = {n for lin in packed.values() for n in lin.tensor_names}
    for hf in ckpt.names():
        if hf in consumed:
            continue
        name = gguf_name(hf, params.gguf_arch)
        if name is None:
            continue
        if name == "output.weight" and params.tie_word_embeddings:
            continue
        load = (lambda hf=hf: ckpt.load(hf))
        if params.norm_shift and name.endswith("norm.weight"):
            load = (lambda hf=hf: ckpt.load(hf) + np.float32(params.norm_shift))
        if params.interleaved_rope and name.endswith(("attn_q.weight", "attn_q.bias")):
            load = (lambda hf=hf: permute_qk(ckpt.load(hf), params.n_head))
        elif params.interleaved_rope and name.endswith(("attn_k.weight", "attn_k.bias")):
            load = (lambda hf=hf: permute_qk(ckpt.load(hf), params.n_head_kv))
        items[name] = (ckpt.shape(hf), load)
    for base, lin in packed.items():
        name = gguf_name(base + ".weight", params.gguf_arch)
        if name is None or (name == "output.weight" and params.tie_word_embeddings):
            continue
        if name in items:
            raise LowbitError(f"{ckpt.dir}: {base} is stored both packed (.qweight) and as .weight")
        # llama's q/k row permutation moves whole output rows, so the packed blocks move unchanged.
        if params.interleaved_rope and name.endswith("attn_q.weight"):
            lin = lin.with_row_order(permute_qk(np.arange(lin.shape[0]), params.n_head))
        elif params.interleaved_rope and name.endswith("attn_k.weight"):
            lin = lin.with_row_order(permute_qk(np.arange(lin.shape[0]), params.n_head_kv))
        items[name] = (lin.shape, lin)
    if "token_embd.weight" not in items:
        raise LowbitError(f"{ckpt.dir}: model.embed_tokens.weight is missing from the weights")

    def order(name: str) -> tuple:
        if name == "rope_freqs.weight":
            return (-1, 0, 0, "")
        if name == "token_embd.weight":
            return (0, 0, 0, "")
        m = re.match(r"blk\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m:
            return (1, int(m.group(1)), _BLOCK_ORDER.index(m.group(2)), m.group(3) != "weight")
        return (2, 0 if name.startswith("output_norm") else 1, 0, name)

    for name in sorted(items, key=order):
        shape, load = items[name]
        yield name, shape, load
