"""Writes a tiny random F32 llama GGUF and transformers' logits for it, the oracle of tests/cpp/test_model_forward.cpp:

    python tests/cpp/make_forward_reference.py OUT_DIR      # -> OUT_DIR/tiny-f32.gguf, OUT_DIR/tiny-f32.logits

The GGUF is written with llama.cpp's own `gguf` package (not lowbit's writer), with llama.cpp's q/k row
permutation applied, so the C++ forward pass is compared with an implementation that shares no code with it.
Logits file: b"LBFWD001", int32 n_tokens, int32 n_vocab, int32 tokens[n], float32 logits[n, n_vocab], little-endian.
"""
from __future__ import annotations

import argparse
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("make_forward_reference")


@dataclass(frozen=True)
class TinyConfig:
    vocab: int = 96
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    context: int = 64
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    seed: int = 0


def permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> GGUF's interleaved pairs (llama.cpp convert_hf_to_gguf's permutation):
    within each head, row pairs (i, i + head_dim/2) become adjacent rows (2i, 2i + 1)."""
    out_dim = w.shape[0]
    return w.reshape(n_head, 2, out_dim // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build(out: Path, cfg: TinyConfig, tokens: list[int]) -> tuple[Path, Path]:
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.context,
                         rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False)
    model = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        # Weights large enough that the logits are far from flat (random init at std 0.02 is nearly uniform).
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
        logits = model(torch.tensor([tokens])).logits[0].float().numpy()  # (n_tokens, vocab)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    path = out / "tiny-f32.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.context_length", cfg.context)
    w.add_uint32("llama.embedding_length", cfg.hidden)
    w.add_uint32("llama.block_count", cfg.layers)
    w.add_uint32("llama.feed_forward_length", cfg.intermediate)
    w.add_uint32("llama.attention.head_count", cfg.heads)
    w.add_uint32("llama.attention.head_count_kv", cfg.kv_heads)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.rms_eps)
    w.add_float32("llama.rope.freq_base", cfg.rope_theta)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for layer in range(cfg.layers):
        for hf, gg in names.items():
            t = np.ascontiguousarray(sd[f"model.layers.{layer}.{hf}.weight"])
            if gg == "attn_q":
                t = permute_for_rope(t, cfg.heads)
            elif gg == "attn_k":
                t = permute_for_rope(t, cfg.kv_heads)
            w.add_tensor(f"blk.{layer}.{gg}.weight", np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ref = out / "tiny-f32.logits"
    with open(ref, "wb") as f:
        f.write(b"LBFWD001" + struct.pack("<ii", len(tokens), cfg.vocab))
        f.write(np.asarray(tokens, dtype="<i4").tobytes())
        f.write(np.ascontiguousarray(logits, dtype="<f4").tobytes())
    return path, ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    tokens = [1, 17, 42, 5, 95, 0, 63, 8, 30, 77, 12, 50]
    model, ref = build(args.out, TinyConfig(), tokens)
    log.info("wrote %s and %s", model, ref)


if __name__ == "__main__":
    main()
