"""The real model: SmolLM2-135M-Instruct as llama.cpp quantized it (Q4_1, Q8_0 embedding), fetched once by
lowbit.hub.fetch_smollm2. Greedy text must be right, and logits must agree with transformers running the same
file's weights dequantized to fp32 (the only difference left is our int8 activations)."""
from __future__ import annotations

import numpy as np
import pytest

import lowbit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_path():
    from lowbit.hub import fetch_smollm2

    try:
        return fetch_smollm2()
    except lowbit.LowbitError as e:
        pytest.skip(f"SmolLM2 file not available: {e}")


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    m = lowbit.load(smollm2_path, n_ctx=512, n_threads=2)
    yield m
    m.close()


def test_config(smollm2):
    c = smollm2.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.n_vocab) == (30, 576, 9, 3, 49152)
    assert c.tied_embeddings


def test_greedy_continuation_knows_paris(smollm2):
    text = smollm2.generate("The capital of France is", max_new_tokens=16, temperature=0.0)
    assert " Paris" in text


def test_chat_answer_is_coherent(smollm2):
    # A question whose greedy answer is not decided by rounding. With the bare question this Q4_1 file answers
    # "L'Étoile, la Cité, ..." under the template's default system prompt (llama.cpp too), and under the system
    # prompt below its first token led "The" over "La" by only 0.26 logits: changing the order of the float
    # additions in the attention scores moves this file's logits by up to 0.9 (each matmul re-rounds its
    # activations to 8 bits, which amplifies the last bits), enough to flip it. Asking for one sentence, every
    # greedy step up to "Paris" and "Berlin" leads by at least 1.2 logits.
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    reply = smollm2.chat(messages, max_new_tokens=40, temperature=0.0)
    assert "Paris" in reply
    # The second turn reuses the first turn's tokens from the cache.
    first = smollm2.last_timings["prompt_tokens"] + smollm2.last_timings["reused_tokens"]
    turn2 = messages + [{"role": "assistant", "content": reply},
                        {"role": "user", "content": "And what is the capital of Germany?"}]
    assert "Berlin" in smollm2.chat(turn2, max_new_tokens=40, temperature=0.0)
    assert smollm2.last_timings["reused_tokens"] >= first


def test_logits_agree_with_transformers_on_the_same_weights(smollm2, smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                     dtype=torch.float32).eval()
    ids = smollm2.tokenize("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and "
                           "Berlin is the capital of Germany.", add_bos=True)
    ours = smollm2.logits(ids)
    with torch.no_grad():
        ref = ref_model(torch.as_tensor([ids])).logits[0].float().numpy()
    lp = ref - ref.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = ours - ours.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == ours.argmax(-1)).mean())
    # Same weights on both sides: only activation quantization (int8, block 32) separates them.
    assert kl < 0.02 and top1 >= 0.85, (kl, top1)
