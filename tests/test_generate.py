"""Sampling and the generate/chat API: the sampler against a numpy oracle of llama.cpp's chain, seeded
determinism, streaming (UTF-8 safe, stop strings held back), chat templates vs transformers, cache reuse across
chat turns, Ctrl-C and two threads on one model."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import lowbit
from lowbit import _core
from lowbit.chat import FALLBACK_TEMPLATE, render_chat
from model_helpers import N_THREADS, random_ids, tiny_gguf, tiny_hf

# ---- the sampler against a numpy oracle -------------------------------------------------------------


def oracle_candidates(logits, history, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n):
    """llama.cpp's chain, written independently: penalties -> top_k -> top_p -> min_p -> temperature.
    Returns the surviving (ids, logits), sorted by id."""
    l = np.asarray(logits, dtype=np.float32).copy()
    if repeat_penalty != 1.0 and repeat_last_n != 0:
        recent = history if repeat_last_n < 0 else history[-repeat_last_n:]
        for t in set(int(t) for t in recent):
            l[t] = l[t] * np.float32(repeat_penalty) if l[t] <= 0 else l[t] / np.float32(repeat_penalty)
    if temperature <= 0:
        i = int(np.argmax(l))
        return np.array([i]), l[[i]]
    ids = np.lexsort((np.arange(len(l)), -l))  # logit descending, then id ascending
    vals = l[ids]
    if 0 < top_k < len(l):
        ids, vals = ids[:top_k], vals[:top_k]
    if top_p < 1.0:
        p = np.exp(vals - vals[0]).astype(np.float64)
        cum = np.cumsum(p / p.sum())
        hit = np.nonzero(cum >= top_p)[0]
        keep = int(hit[0]) + 1 if len(hit) else len(vals)
        ids, vals = ids[:keep], vals[:keep]
    if min_p > 0:
        mask = vals >= vals.max() + np.log(np.float32(min_p))
        ids, vals = ids[mask], vals[mask]
    vals = vals / np.float32(temperature)
    order = np.argsort(ids)
    return ids[order], vals[order]


SAMPLER_CASES = [
    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, repeat_last_n=64),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, repeat_last_n=64),
    dict(temperature=0.7, top_k=5, top_p=1.0, min_p=0.0, repeat_penalty=1.3, repeat_last_n=16),
    dict(temperature=1.3, top_k=0, top_p=0.5, min_p=0.0, repeat_penalty=1.1, repeat_last_n=-1),
    dict(temperature=0.5, top_k=100, top_p=0.9, min_p=0.2, repeat_penalty=0.8, repeat_last_n=8),
    dict(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.5, repeat_last_n=32),
    dict(temperature=1.0, top_k=3, top_p=0.0, min_p=0.0, repeat_penalty=1.0, repeat_last_n=0),
]


@pytest.mark.parametrize("case", SAMPLER_CASES, ids=[str(i) for i in range(len(SAMPLER_CASES))])
@pytest.mark.parametrize("trial", range(3))
def test_sampler_candidates_match_oracle(case, trial):
    rng = np.random.default_rng(100 + trial)
    logits = (rng.standard_normal(500) * 3).astype(np.float32)
    history = rng.integers(0, 500, size=60).astype(np.int32)
    logits[history[-5:]] = np.abs(logits[history[-5:]]) + 8  # penalized tokens that matter for the top
    logits[history[-10:-5]] = -np.abs(logits[history[-10:-5]])  # and negative ones
    s = _core.Sampler(seed=1, **case)
    ids, vals = s.candidates(logits, history)
    order = np.argsort(ids)
    want_ids, want_vals = oracle_candidates(logits, history, **case)
    np.testing.assert_array_equal(ids[order], want_ids)
    np.testing.assert_allclose(vals[order], want_vals, rtol=1e-6, atol=0)


def test_sampler_draws_follow_softmax():
    logits = np.array([1.0, 2.0, 0.5, -1.0, 1.5], dtype=np.float32)
    s = _core.Sampler(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=123)
    n = 40000
    counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=5) / n
    p = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum()
    assert np.abs(counts - p).max() < 0.012  # 4+ standard deviations of a frequency over 40000 draws


def test_sampler_seeded_determinism():
    logits = np.random.default_rng(0).standard_normal(300).astype(np.float32)

    def draws(seed: int) -> list[int]:
        s = _core.Sampler(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        return [s.sample(logits) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_k_1_is_greedy():
    rng = np.random.default_rng(5)
    for _ in range(20):
        logits = rng.standard_normal(1000).astype(np.float32)
        s = _core.Sampler(temperature=1.7, top_k=1, top_p=1.0, min_p=0.0, seed=int(rng.integers(1 << 30)))
        assert s.sample(logits) == int(np.argmax(logits))
        assert _core.Sampler(temperature=0.0).sample(logits) == int(np.argmax(logits))


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=1.5),
                                 dict(top_p=-0.1), dict(min_p=2.0), dict(top_k=-3), dict(repeat_penalty=0.0),
                                 dict(repeat_last_n=-5)])
def test_sampler_rejects_bad_values(bad):
    with pytest.raises(lowbit.LowbitError):
        _core.Sampler(**bad)


# ---- generate on the tiny model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    m = lowbit.load(tiny_gguf("q8_0"), n_threads=N_THREADS, n_ctx=256)
    yield m
    m.close()


def test_generate_seed_determinism(model):
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = model.generate_tokens("Once upon a time", seed=11, **kw)
    b = model.generate_tokens("Once upon a time", seed=11, **kw)
    c = model.generate_tokens("Once upon a time", seed=12, **kw)
    assert a == b and a != c
    # Load-time seeds make the whole sequence of unseeded calls reproducible.
    with lowbit.load(tiny_gguf("q8_0"), n_threads=N_THREADS, seed=5) as m1, \
            lowbit.load(tiny_gguf("q8_0"), n_threads=N_THREADS, seed=5) as m2:
        assert [m1.generate("The", max_new_tokens=8, temperature=1.0) for _ in range(2)] == \
            [m2.generate("The", max_new_tokens=8, temperature=1.0) for _ in range(2)]


def test_end_of_generation_ids_from_the_core_match_the_tokenizer():
    """Generation from token ids takes its end-of-generation ids from the core and never builds the tokenizer
    (its vocabulary objects are tens of MiB); those ids follow the same rule as the Python tokenizer's."""
    with lowbit.load(tiny_gguf("q8_0"), n_threads=N_THREADS, n_ctx=64) as m:
        m.generate_tokens([1, 2, 3], max_new_tokens=4, temperature=0.0)
        assert m._tokenizer is None
        core_ids = m._core.eog_ids
        tok = m.tokenizer
        assert core_ids == sorted(tok.eot_ids)
        # The file's eos (<|im_end|>) and the control token <|endoftext|>, not the other special token.
        assert {tok.tokens[i] for i in core_ids} == {"<|im_end|>", "<|endoftext|>"}


def test_interrupted_tokenizer_build_can_be_retried(monkeypatch):
    """The tokenizer keys leave the core when the tokenizer is built; a build cut short by Ctrl-C must not lose
    them, and a vocabulary that cannot be built gives the same error on every call."""
    from lowbit import tokenizer as tokmod

    real = tokmod.Tokenizer.from_metadata
    calls = []

    def flaky(md, *a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(md, *a, **kw)

    with lowbit.load(tiny_gguf("q8_0"), n_threads=N_THREADS, n_ctx=64) as m:
        monkeypatch.setattr(tokmod.Tokenizer, "from_metadata", staticmethod(flaky))
        with pytest.raises(KeyboardInterrupt):
            m.tokenize("Hello")
        assert m.detokenize(m.tokenize("Hello there")) == "Hello there"

    def broken(md, *a, **kw):
        raise lowbit.LowbitError("unsupported vocabulary")

    with lowbit.load(tiny_gguf("q8_0"), n_threads=N_THREADS, n_ctx=64) as m:
        monkeypatch.setattr(tokmod.Tokenizer, "from_metadata", staticmethod(broken))
        for _ in range(2):
            with pytest.raises(lowbit.LowbitError, match="unsupported vocabulary"):
                m.tokenize("Hello")


def test_generation_stops_at_every_end_of_generation_token(model):
    """Generation ends at the first token of the end-of-generation set, whichever it is: the tiny file has two
    (<|endoftext|> and <|im_end|>, like SmolLM2), and stopping only on one of them (say the lowest id) must fail
    here. Sampled hot with seeded draws until each id has been the first end token of some generation."""
    eog = set(model._core.eog_ids)
    assert len(eog) == 2
    kw = dict(max_new_tokens=120, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    covered = set()
    for seed in range(400):
        full = model.generate_tokens([5, 6, 7], seed=seed, stop_at_eos=False, **kw)
        hits = [i for i, t in enumerate(full) if t in eog]
        if hits and full[hits[0]] not in covered:
            assert model.generate_tokens([5, 6, 7], seed=seed, **kw) == full[:hits[0]]
            text = model.generate([5, 6, 7], seed=seed, **kw)
            assert text == model.detokenize(full[:hits[0]])
            covered.add(full[hits[0]])
            if covered == eog:
                return
    pytest.fail(f"only {sorted(covered)} of the end-of-generation ids {sorted(eog)} came first in 400 seeds")


def test_core_metadata_matches_the_file():
    """The tokenizer is built from the metadata the core kept at load; it must be the file's, key for key. Building
    it moves the tokenizer keys out of the core; the others stay."""
    from lowbit.gguf import GGUFFile

    path = tiny_gguf("q8_0")
    with GGUFFile(path) as g:
        want = {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}
        every = dict(g.metadata)
    with lowbit.load(path, n_threads=N_THREADS, n_ctx=64) as m:
        assert len(want) >= 5 and m._core.metadata("tokenizer.") == want
        assert m._core.metadata() == every
        assert m.tokenize("Hello") == m.tokenizer.encode("Hello")
        assert m._core.metadata() == {k: v for k, v in every.items() if k not in want}
        assert m.detokenize(m.tokenize("Hello there")) == "Hello there"  # the same tokenizer object, built once


def test_generate_text_is_detokenized_tokens(model):
    ids = model.generate_tokens("The quick brown", max_new_tokens=20, temperature=0.0, stop_at_eos=True)
    text = model.generate("The quick brown", max_new_tokens=20, temperature=0.0)
    assert text == model.tokenizer.decode(ids)
    assert "".join(model.generate("The quick brown", max_new_tokens=20, temperature=0.0, stream=True)) == text
    assert model.generate("The quick brown", max_new_tokens=0) == ""


def test_generate_stop_string(model):
    full = model.generate("The sea", max_new_tokens=40, temperature=1.0, seed=3)
    assert len(full) > 6
    stop = full[3:6]
    cut = full.find(stop)
    assert model.generate("The sea", max_new_tokens=40, temperature=1.0, seed=3, stop=stop) == full[:cut]
    assert "".join(model.generate("The sea", max_new_tokens=40, temperature=1.0, seed=3, stop=[stop, "\x00"],
                                  stream=True)) == full[:cut]


def test_finish_reason_and_unlimited_tokens():
    """max_new_tokens=-1 runs until an end token or a full context; last_finish_reason says which ended it
    ("stop": end token or stop string; "length": max_new_tokens or the context)."""
    with lowbit.load(tiny_gguf("q8_0"), n_threads=N_THREADS, n_ctx=48) as m:
        prompt = [5, 6, 7, 8]
        out = m.generate_tokens(prompt, max_new_tokens=-1, temperature=0.0, stop_at_eos=False)
        # The last token is sampled when the cache is full, not evaluated.
        assert len(out) == 48 - len(prompt) + 1 and m.last_finish_reason == "length"
        assert out == m.generate_tokens(prompt, max_new_tokens=10_000, temperature=0.0, stop_at_eos=False)
        assert m.generate_tokens(prompt, max_new_tokens=5, temperature=0.0, stop_at_eos=False) == out[:5]
        assert m.last_finish_reason == "length"
        text = m.generate(prompt, max_new_tokens=-1, temperature=0.0)  # stops at an end token or the context
        assert m.last_finish_reason in ("stop", "length")
        text = m.generate(prompt, max_new_tokens=30, temperature=1.0, seed=4)
        if len(text) > 4:
            m.generate(prompt, max_new_tokens=30, temperature=1.0, seed=4, stop=text[2:4])
            assert m.last_finish_reason == "stop"
        for bad in (-2, 1.5, "3", True):
            with pytest.raises(lowbit.LowbitError, match="max_new_tokens"):
                m.generate("hi", max_new_tokens=bad)
        for bad in (5, [1, "a"], {"a": 1}):
            with pytest.raises(lowbit.LowbitError, match="stop must be a string or a list of strings"):
                m.generate("hi", max_new_tokens=2, stop=bad)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_are_log_softmax_of_the_logits(temperature):
    """generate(logprobs=n): each generated token's logprob and its n most likely alternatives are log-softmax
    of logits() (a fresh teacher-forced evaluation) at the same position; the batch engine records the same."""
    path = tiny_gguf("f32")
    with lowbit.load(path, n_threads=N_THREADS, n_ctx=64) as m:
        prompt = [3, 14, 15, 92, 65]
        out = m.generate_tokens(prompt, max_new_tokens=12, temperature=temperature, seed=2, logprobs=4,
                                stop_at_eos=False)
        lps = m.last_logprobs
        assert len(lps) == len(out) == 12
        lg = m.logits(prompt + out).astype(np.float64)
        for i, (tok, lp) in enumerate(zip(out, lps)):
            row = lg[len(prompt) - 1 + i]
            ref = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
            assert lp.token == tok and lp.logprob == pytest.approx(ref[tok], abs=1e-4)
            order = sorted(range(len(ref)), key=lambda j: (-ref[j], j))[:4]
            assert [t for t, _ in lp.top] == order
            assert [v for _, v in lp.top] == pytest.approx([ref[j] for j in order], abs=1e-4)
        m.generate(prompt, max_new_tokens=5, temperature=0.0, logprobs=0)
        assert len(m.last_logprobs) == m.last_timings["generated_tokens"] > 0
        assert all(lp.top == () for lp in m.last_logprobs)
        m.generate(prompt, max_new_tokens=3)
        assert m.last_logprobs is None
        for bad in (-1, 21, 2.0, True):
            with pytest.raises(lowbit.LowbitError, match="logprobs"):
                m.generate(prompt, max_new_tokens=3, logprobs=bad)
    with lowbit.BatchEngine(path, n_seq=2, n_ctx=64, n_threads=N_THREADS) as eng:
        req = eng.submit(prompt, max_new_tokens=12, temperature=temperature, seed=2, logprobs=4, stop_at_eos=False)
        other = eng.submit([7, 8, 9], max_new_tokens=12, temperature=0.0)  # sharing the steps
        eng.run()
        assert req.tokens == out and other.logprobs is None
        for a, b in zip(req.logprobs, lps):
            assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_context_shift_continues_as_a_fresh_evaluation_of_the_kept_tokens():
    """With context_shift a full cache keeps its first n_keep tokens (and BOS) and the newer half of the rest;
    the next greedy token must be the one a fresh evaluation of exactly those tokens gives."""
    path = tiny_gguf("f32")
    with lowbit.load(path, n_threads=N_THREADS, n_ctx=40) as m, \
            lowbit.load(path, n_threads=N_THREADS, n_ctx=40) as oracle:
        prompt = [9, 10, 11, 12, 13, 14]
        n_keep = 3
        out = m.generate_tokens(prompt, max_new_tokens=100, temperature=0.0, stop_at_eos=False,
                                context_shift=True, n_keep=n_keep)
        assert len(out) == 100 and m.last_timings["context_shifts"] >= 2
        # Replay the cache: when it is full, the token just sampled is not in it yet.
        cache = list(prompt)
        for i, tok in enumerate(out[:-1]):
            if len(cache) == 40:
                n_discard = (40 - n_keep) // 2
                cache = cache[:n_keep] + cache[n_keep + n_discard:]
            cache.append(tok)
            want = int(np.argmax(oracle.logits(cache)[-1]))
            assert out[i + 1] == want, f"token {i + 1} after {len(cache)} cached"
        with pytest.raises(lowbit.LowbitError, match="n_keep"):
            m.generate_tokens(prompt, max_new_tokens=2, context_shift=True, n_keep=-2)
        with pytest.raises(lowbit.LowbitError, match="n_keep"):
            m.generate_tokens(prompt, max_new_tokens=2, context_shift=True, n_keep=39)


def test_n_ctx_above_training_more_threads_than_cpus_and_missing_template_warn(caplog, tmp_path):
    import logging
    import os

    with caplog.at_level(logging.WARNING, logger="lowbit"):
        with lowbit.load(tiny_gguf("q8_0"), n_threads=N_THREADS, n_ctx=512) as m:  # trained on 256
            assert any("above the 256 positions" in r.getMessage() for r in caplog.records)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        caplog.clear()
        with lowbit.load(tiny_gguf("q8_0"), n_threads=cpus + 2, n_ctx=64):
            assert any(f"more than the {cpus} CPUs" in r.getMessage() for r in caplog.records)
        caplog.clear()
        with lowbit.load(tiny_gguf("q8_0"), n_threads=1, n_ctx=64):
            assert not any("CPUs" in r.getMessage() for r in caplog.records)
    import json
    import shutil

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        with lowbit.load(tiny_gguf("q8_0"), n_threads=N_THREADS, n_ctx=64) as m:  # has a template
            m.chat_ids([{"role": "user", "content": "hi"}])
        assert not any("chat_template" in r.getMessage() for r in caplog.records)
        hf = tmp_path / "hf"
        shutil.copytree(tiny_hf(), hf)
        cfg = json.loads((hf / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
        (hf / "chat_template.jinja").unlink(missing_ok=True)  # where newer transformers save it
        lowbit.convert(hf, tmp_path / "plain.gguf", outtype="f32", progress=False)
        with lowbit.load(tmp_path / "plain.gguf", n_threads=N_THREADS, n_ctx=64) as m:
            for _ in range(2):
                m.chat_ids([{"role": "user", "content": "hi"}])
        assert sum("no tokenizer.chat_template" in r.getMessage() for r in caplog.records) == 1


def _fake_tokens(model, ids):
    def fake(prompt, max_new_tokens, sampler, window, stop_at_eos=True, shift_keep=None, logprobs=None,
             constraint=None):
        yield from ids
    return fake


def test_stream_is_utf8_safe_and_holds_back_stop_prefixes(model, monkeypatch):
    text = "Caf\u00e9 \U0001F600 \u4f60\u597d <|im_x"
    ids = model.tokenize(text, add_bos=False)
    # Force the byte-level path: one token per byte, so multi-byte characters arrive in pieces.
    byte_ids = []
    for i in ids:
        piece = model.tokenizer.token_to_piece(i)
        for b in piece:
            single = [j for j in range(model.n_vocab) if model.tokenizer.token_to_piece(j) == bytes([b])]
            byte_ids.append(single[0])
    monkeypatch.setattr(model, "_tokens", _fake_tokens(model, byte_ids))
    prompt = [5]
    pieces = list(model.generate(prompt, stream=True, max_new_tokens=len(byte_ids)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5
    # A stop string that never completes is held back only while it might, then released.
    pieces = list(model.generate(prompt, stream=True, stop="<|im_xyz", max_new_tokens=len(byte_ids)))
    assert "".join(pieces) == text
    assert all(not p.endswith("<|") for p in pieces[:-1])
    # A stop string that completes cuts the text before it.
    assert model.generate(prompt, stop="\u4f60", max_new_tokens=len(byte_ids)) == "Caf\u00e9 \U0001F600 "


# ---- chat -------------------------------------------------------------------------------------------


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]


def test_chat_prompt_matches_transformers(model):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tiny_hf(0, False))
    for messages in (CONVERSATION, CONVERSATION[1:]):
        want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        got = render_chat(messages, model.tokenizer.chat_template)
        assert got == want
        want_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(want_ids, "keys"):  # transformers 5 returns a BatchEncoding
            want_ids = want_ids["input_ids"]
        assert model.tokenize(got, add_bos=True) == list(want_ids)


def test_chat_generates_and_reuses_the_previous_turn(model):
    reply = model.chat(CONVERSATION, max_new_tokens=12, temperature=0.0)
    first_prompt = model.last_timings["prompt_tokens"] + model.last_timings["reused_tokens"]
    assert reply == "".join(model.chat(CONVERSATION, max_new_tokens=12, temperature=0.0, stream=True))
    turn2 = CONVERSATION + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And why?"}]
    model.chat(turn2, max_new_tokens=4, temperature=0.0)
    assert model.last_timings["reused_tokens"] >= first_prompt


def test_chat_fallback_template():
    msgs = [{"role": "user", "content": "Hi"}]
    assert render_chat(msgs, None) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(msgs, "") == render_chat(msgs, FALLBACK_TEMPLATE)


def test_chat_template_raise_exception():
    tmpl = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    with pytest.raises(lowbit.LowbitError, match="user first"):
        render_chat([{"role": "system", "content": "x"}], tmpl)


# ---- robustness: Ctrl-C, threads --------------------------------------------------------------------


class _InterruptingCore:
    """Delegates to the real core model; raises KeyboardInterrupt right after the n-th eval returns (the
    worst moment: the cache has grown and Python has not seen the result yet)."""

    def __init__(self, core, after: int):
        self._core, self._left = core, after

    def __getattr__(self, name):
        return getattr(self._core, name)

    def eval(self, *args, **kwargs):
        out = self._core.eval(*args, **kwargs)
        self._left -= 1
        if self._left == 0:
            raise KeyboardInterrupt
        return out


def test_keyboard_interrupt_leaves_model_usable():
    prompt = random_ids(10, 400, seed=12)
    with lowbit.load(tiny_gguf("q8_0"), n_threads=N_THREADS) as m, \
            lowbit.load(tiny_gguf("q8_0"), n_threads=N_THREADS) as fresh:
        want = fresh.generate_tokens(prompt, max_new_tokens=16, temperature=0.0, stop_at_eos=False)
        real = m._core
        m._core = _InterruptingCore(real, after=5)
        with pytest.raises(KeyboardInterrupt):
            m.generate(prompt, max_new_tokens=16, temperature=0.0)
        m._core = real
        assert m.n_past == len(m.cached_tokens) == 10 + 4  # prompt + the 4 evaluated generated tokens
        assert m.generate_tokens(prompt, max_new_tokens=16, temperature=0.0, stop_at_eos=False) == want
        assert m.last_timings["reused_tokens"] == 9


def test_two_threads_generate_on_one_model():
    prompts = [random_ids(12, 400, seed=s) for s in (20, 21)]
    with lowbit.load(tiny_gguf("q8_0"), n_threads=N_THREADS) as m:
        want = [m.generate_tokens(p, max_new_tokens=20, temperature=0.0, stop_at_eos=False) for p in prompts]
        results: dict[int, list] = {}
        errors: list[BaseException] = []

        def work(k):
            try:
                for _ in range(3):
                    got = m.generate_tokens(prompts[k], max_new_tokens=20, temperature=0.0, stop_at_eos=False)
                    results.setdefault(k, []).append(got)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for k in (0, 1):
            assert results[k] == [want[k]] * 3


def test_open_stream_in_same_thread_is_a_clear_error(model):
    it = model.generate("Once", max_new_tokens=8, temperature=0.0, stream=True)
    next(it)
    with pytest.raises(lowbit.LowbitError, match="unfinished stream"):
        model.generate("Once", max_new_tokens=2)
    it.close()
    assert isinstance(model.generate("Once", max_new_tokens=2, temperature=0.0), str)
