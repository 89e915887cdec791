"""Test helpers: seeded tiny LLaMA checkpoints (transformers) with a real trained byte-level BPE tokenizer.

    from tiny_models import make_tiny_llama
    hf_dir = make_tiny_llama(tmp_path)                       # f32 safetensors, untied, GQA 4/2 heads
    hf_dir = make_tiny_llama(tmp_path, dtype="bfloat16", fmt="sharded", tied=True)

Everything is built offline in well under a second: the tokenizer is trained once per process on the
text below (`tokenizers`, byte-level BPE, ~400 tokens) and cached; the model is a `LlamaForCausalLM`
with random weights from `torch.manual_seed(seed)`, scaled so that logits are far from flat.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

# Training text for the tiny tokenizer: English, code, numbers, whitespace runs and some non-ASCII, so
# the merges cover a mix of cases. Bytes not seen here still tokenize (byte-level alphabet).
TRAINING_TEXT = """\
Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.
Every morning the fisherman went out in his little boat, and every evening he came home tired.
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
It was the best of times, it was the worst of times, it was the age of wisdom.
What is the capital of France? The capital of France is Paris. Paris is a city in Europe.
How many legs does a spider have? A spider has eight legs, and an insect has six.
I'm sure they'll say we've done it, but you're right: he'd rather not, and it's late.
In 1969, 3 astronauts flew 384400 km to the Moon; the trip took about 76 hours.
Prices: $12.50, 7%, 3.14159, 2**10 = 1024, 0xFF = 255, 1e-5, -42, +7.
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
    if (x != NULL && y == 0) return -1;
import numpy as np
x = np.zeros((3, 4), dtype=np.float32)  # shape (3, 4)
print(f"hello {name}!")
\t\tTabs\tand    spaces     and

newlines


Caf\u00e9, na\u00efve, fa\u00e7ade, \u00fcber, se\u00f1or, \u00c5ngstr\u00f6m, \u0131\u015f\u0131k,
\u017c\u00f3\u0142w.
\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!
\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u03ba\u03cc\u03c3\u03bc\u03b5.
\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd.
\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645.
\u4f60\u597d\uff0c\u4e16\u754c\u3002\u4eca\u65e5\u306f\u3044\u3044\u5929\u6c17\u3067\u3059\u306d\u3002
\uc548\ub155\ud558\uc138\uc694 \uc138\uacc4.
Emoji: \U0001F600 \U0001F44D\U0001F3FD \u2764\ufe0f \U0001F1EB\U0001F1F7 \U0001F468\u200d\U0001F469\u200d\U0001F467.
Math: \u2200x \u2208 \u211d, x\u00b2 \u2265 0; \u03c0 \u2248 3.14; \u221e \u2260 \u2205.
The end. THE END. the end! The End? -- end --
"""

# Special tokens, at ids 0.. in this order (as SmolLM2 lays them out), plus one plain added token.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKEN = "<tool_call>"

# ChatML, the template SmolLM2-Instruct ships.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Pre-tokenizer styles the helper can build; each matches a tokenizer.ggml.pre value llama.cpp knows.
PRETOKENIZERS = ("smollm", "gpt2", "llama3")

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_json(vocab: int = 400, pretok: str = "smollm") -> str:
    """A trained byte-level BPE tokenizer (tokenizer.json text). Cached per process.

    pretok: "smollm" (digits split one by one, then GPT-2 regex: SmolLM2's), "gpt2" (GPT-2 regex) or
    "llama3" (Llama-3's split regex, then byte-level without regex).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if pretok not in PRETOKENIZERS:
        raise ValueError(f"pretok must be one of {PRETOKENIZERS}, not {pretok!r}")
    tok = Tokenizer(models.BPE())
    if pretok == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pretok == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TRAINING_TEXT] * 4, trainer=trainer)
    tok.add_tokens([USER_TOKEN])
    return tok.to_str()


def _tokenizer_files(out: Path, vocab: int, pretok: str, add_bos: bool) -> int:
    """Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja via
    transformers (so the files look like a real checkpoint's). Returns the vocabulary size."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(tiny_tokenizer_json(vocab, pretok))
    if add_bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B",
            special_tokens=[("<|im_start|>", tok.token_to_id("<|im_start|>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["add_bos_token"] = add_bos
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return tok.get_vocab_size(with_added_tokens=True)


def make_tiny_llama(tmp_path: Path, seed: int = 0, tied: bool = False, n_kv_heads: int = 2,
                    dtype: str = "float32", fmt: str = "safetensors", vocab: int = 400, n_layers: int = 2,
                    head_dim: Optional[int] = None, intermediate: int = 128, pretok: str = "smollm",
                    add_bos: bool = False, architecture: str = "LlamaForCausalLM",
                    config_overrides: Optional[dict[str, Any]] = None, name: Optional[str] = None) -> Path:
    """Build and save a seeded tiny Llama checkpoint directory; returns its path.

    hidden 64, heads 4 (n_kv_heads for K/V; 4 = no GQA), intermediate 128, max_position 256, vocab ~400.
    dtype: "float32" | "float16" | "bfloat16" (weights as saved; config torch_dtype set accordingly).
    fmt: "safetensors" (one model.safetensors), "sharded" (several safetensors + index json), "bin"
    (pytorch_model.bin) or "sharded_bin" (pytorch_model-0000x-of-0000n.bin + index json).
    head_dim: explicit attention head size (None: 64 / 4 = 16).
    config_overrides: extra keys written into config.json after saving, e.g. the transformers-4 style
    {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}; a value None deletes a key.
    architecture: written to config.json "architectures" (e.g. "MistralForCausalLM").
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if fmt not in ("safetensors", "sharded", "bin", "sharded_bin"):
        raise ValueError(f"unknown fmt {fmt!r}")
    out = Path(tmp_path) / (name or f"tiny-llama-{fmt}-{dtype}-{'tied' if tied else 'untied'}-s{seed}")
    out.mkdir(parents=True, exist_ok=True)
    n_vocab = _tokenizer_files(out, vocab, pretok, add_bos)

    kwargs: dict[str, Any] = {}
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    config = LlamaConfig(vocab_size=n_vocab, hidden_size=64, intermediate_size=intermediate,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=n_kv_heads,
                         max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, **kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Default init (std 0.02) gives near-uniform logits; rescale so the model has opinions.
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.0 / p.shape[-1] ** 0.5) * (4.0 if "embed" in pname else 1.0))
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    model = model.to(torch_dtype)

    if fmt in ("safetensors", "sharded"):
        model.save_pretrained(out, max_shard_size="60KB" if fmt == "sharded" else "50GB")
    else:
        model.config.save_pretrained(out)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if tied:
            state.pop("lm_head.weight", None)
        if fmt == "bin":
            torch.save(state, out / "pytorch_model.bin")
        else:
            names = list(state)
            halves = [names[: len(names) // 2], names[len(names) // 2:]]
            weight_map = {}
            for i, part in enumerate(halves):
                fname = f"pytorch_model-{i + 1:05d}-of-{len(halves):05d}.bin"
                torch.save({k: state[k] for k in part}, out / fname)
                weight_map.update({k: fname for k in part})
            (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = [architecture]
    cfg["torch_dtype"] = dtype
    for k, v in (config_overrides or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


def load_hf_state(hf_dir: Path) -> dict:
    """The checkpoint's tensors as float32 numpy arrays, keyed by HF name (reads via transformers)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


# Strings for tokenizer equality tests: unicode, emoji, CJK, code, whitespace runs, special tokens.
def tokenizer_test_strings() -> list[str]:
    base = [
        "", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", " \t\n ", "a", "A", "Hello", " Hello", "Hello world",
        "Hello, world!", "hello   world", "hello\n\nworld", "  leading", "trailing  ", "mixed \t tabs",
        "I'm", "I'M", "we've", "they'll", "don't", "it's", "'s", "''", "\"quoted\"", "1", "12", "123", "1234",
        "12345678901234567890", "3.14159", "-42", "1e-5", "$12.50", "100%", "2**10", "0xFF", "v1.2.3",
        "caf\u00e9", "na\u00efve", "\u00fcber", "\u0131\u015f\u0131k", "\u00c5ngstr\u00f6m",
        "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!", "\u0393\u03b5\u03b9\u03ac",
        "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627", "\u4f60\u597d\uff0c\u4e16\u754c",
        "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", "\ud55c\uad6d\uc5b4", 
        "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
        "\U0001F600", "\U0001F44D\U0001F3FD", "\u2764\ufe0f", "\U0001F1EB\U0001F1F7",
        "\U0001F468\u200d\U0001F469\u200d\U0001F467", "emoji \U0001F600 in text", "\u2200x \u2208 \u211d",
        "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {}", "if (a != b && c == d)",
        "    indented", "\t\ttabs", "x = np.zeros((3, 4))", "print(f\"{x!r}\")", "#include <stdio.h>",
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nHi<|im_end|>\n",
        "<|im_start|>assistant\n", "text<|im_end|>more", "<|im_start|><|im_end|>", "< |im_start| >",
        "<tool_call>", "call <tool_call> now", "<tool_call><tool_call>", "<|im_start", "im_end|>",
        "\u00a0nbsp", "zero\u200bwidth", "\u3000ideographic space", "a\r\nb", "\r\n\r\n", "trailing\n",
        "ALL CAPS SENTENCE", "MiXeD CaSe", "snake_case_name", "camelCaseName", "kebab-case-name",
        "https://example.com/path?q=1&r=2", "user@example.com", "C:\\Windows\\path", "a" * 50, " " * 17,
        "\n" * 9, "ab" * 30, "\u00e9" * 10, "\U0001F600" * 5, "The quick brown fox jumps over the lazy dog.",
    ]
    words = ["the", "sea", "fisherman", "Paris", "\u4e16\u754c", "\U0001F44D", "1969", "fibonacci", "  ", "\n",
             "<|im_end|>", "caf\u00e9", "don't", "x=1;", "\t", "\u041f\u0440\u0438\u0432\u0435\u0442"]
    import random

    rng = random.Random(1234)
    extra = []
    while len(base) + len(extra) < 220:
        n = rng.randint(1, 8)
        extra.append("".join(rng.choice(words) + rng.choice(["", " ", "  ", ",", ".", "\n"]) for _ in range(n)))
    return base + extra


# Architectures make_tiny_model builds: name -> (transformers config class, model class).
TINY_ARCHITECTURES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}

# Gemma 3's tiny shape: 6 blocks, the last global (llama.cpp's default pattern), the others sliding over
# GEMMA3_WINDOW positions, so prompts of a few dozen tokens run far past the window.
GEMMA3_WINDOW = 8

# Llama 3's RoPE scaling with a short original context, so that with head_dim 16 and base 1e4 the 8 pair
# frequencies fall in all three regimes: wavelength < 16 kept, 16..64 blended, > 64 divided by the factor.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _redraw(model, arch: str) -> None:
    """Every parameter of a tiny model redrawn from seeded normals, so that logits are far from flat and a
    dropped or misplaced norm or bias shows."""
    import torch

    # Gemma scales the embedding by sqrt(hidden) and ties the head to it: with the 4x embedding of the others
    # every position would predict its own input token by a wide margin (quantization could not move the
    # logits), so its embedding rows get rms 0.5 after the scaling and its final norm a larger weight; its
    # other norms stay near HF's scale of 1 (w near 0 in x * (1 + w)), or sharp attention over q/k-normed
    # heads makes the logits swing on rounding.
    embed_gain = 0.5 if arch == "gemma3" else 4.0
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif arch == "gemma3" and pname in ("model.norm.weight", "model.language_model.norm.weight"):
                p.copy_(6.0 + 0.2 * torch.randn_like(p))
            elif arch == "gemma3" and p.ndim == 1:  # Gemma's norms scale by 1 + w
                p.copy_(0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.0 / p.shape[-1] ** 0.5) * (embed_gain if "embed" in pname else 1.0))


def make_tiny_model(tmp_path: Path, arch: str, seed: int = 0, tied: bool = False, n_kv_heads: int = 2,
                    head_dim: Optional[int] = None, n_layers: int = 2, vocab: int = 400,
                    layer_types: Optional[list[str]] = None, name: Optional[str] = None, hidden: int = 64,
                    intermediate: int = 128, rope_parameters: Optional[dict[str, Any]] = None) -> Path:
    """A seeded tiny checkpoint of another architecture (TINY_ARCHITECTURES), f32 safetensors; returns its path.

    hidden 64, 4 heads (n_kv_heads for K/V), intermediate 128 (hidden 256 / intermediate 512 give rows that
    K-quant superblocks fit), max_position 256. "llama3": LlamaForCausalLM
    with LLAMA3_ROPE scaling; "qwen2": q/k/v biases; "qwen3": per-head q/k norms (head_dim 24 unless given,
    so the head size differs from hidden / heads); "gemma3": head_dim 32 (heads * head_dim != hidden), 6 blocks
    unless n_layers is given, sliding window GEMMA3_WINDOW, layer_types (default: every 6th global, as llama.cpp
    assumes), global RoPE base 1e6 and sliding 1e4. Every parameter is redrawn (the 1-D ones -- norms, biases
    -- too, so a norm or bias that is dropped or misplaced shows in the logits).
    """
    import torch
    import transformers

    cfg_name, model_name = TINY_ARCHITECTURES[arch]
    out = Path(tmp_path) / (name or f"tiny-{arch}-{'tied' if tied else 'untied'}-s{seed}")
    out.mkdir(parents=True, exist_ok=True)
    n_vocab = _tokenizer_files(out, vocab, "smollm", False)
    kwargs: dict[str, Any] = {}
    if arch == "qwen3":
        kwargs["head_dim"] = head_dim or 24
    elif head_dim is not None:
        kwargs["head_dim"] = head_dim
    if arch == "llama3":
        kwargs["rope_parameters"] = dict(LLAMA3_ROPE)
    elif arch == "gemma3":
        n_layers = n_layers if n_layers != 2 else 6
        kwargs.update(head_dim=head_dim or 32, sliding_window=GEMMA3_WINDOW, query_pre_attn_scalar=head_dim or 32,
                      layer_types=layer_types or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                                  for i in range(n_layers)],
                      rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                      hidden_activation="gelu_pytorch_tanh")
    else:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6 if arch == "qwen3" else 1e5}
    if rope_parameters is not None:
        kwargs["rope_parameters"] = dict(rope_parameters)
    config = getattr(transformers, cfg_name)(
        vocab_size=n_vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    _redraw(model, arch)
    model.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


def make_tiny_gemma3_multimodal(tmp_path: Path, seed: int = 0) -> Path:
    """A seeded tiny Gemma3ForConditionalGeneration (a one-layer SigLIP vision tower and projector around
    make_tiny_model's gemma3 text shape), f32 safetensors; returns its path."""
    import torch
    import transformers

    out = Path(tmp_path) / f"tiny-gemma3-multimodal-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    n_vocab = _tokenizer_files(out, 400, "smollm", False)
    text = transformers.Gemma3TextConfig(
        vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
        sliding_window=GEMMA3_WINDOW, query_pre_attn_scalar=32, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=n_vocab - 1, boi_token_index=n_vocab - 2,
                                       eoi_token_index=n_vocab - 3)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    _redraw(model, "gemma3")
    model.save_pretrained(out)
    return out


def load_hf_model(hf_dir: Path):
    """The checkpoint as its transformers class (from config.json's architectures), fp32, eval mode."""
    import torch
    import transformers

    arch = json.loads((Path(hf_dir) / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(hf_dir, dtype=torch.float32).eval()
