"""Several sequences in one forward pass (Model.eval_batch, the core of continuous batching): every row attends
to its own sequence's cache, so each sequence's logits equal those of the same tokens evaluated alone, whatever
the other sequences, the chunking (n_batch) and the mix of prompt and decode rows.

Oracle: the same file, one sequence at a time (Model.eval, itself tested against transformers and llama.cpp in
test_model.py / test_architectures.py). Batching changes only which rows share a matmul call; the kernels
quantize activations row by row, so the results agree to float rounding (1e-4 of the logit scale).
"""
from __future__ import annotations

import numpy as np
import pytest

import lowbit
from lowbit import _core
from model_helpers import N_THREADS, random_ids
from test_architectures import tiny_gguf

ARCHS = ["llama3", "gemma3"]  # gemma3: sliding-window blocks of 8 positions (rings per sequence)


def _alone(path, prompts, steps, n_batch):
    """Per sequence: logits of its prompt's last token, then of each decode token, evaluated alone."""
    out = []
    for prompt, toks in zip(prompts, steps):
        m = _core.Model(str(path), n_ctx=128, n_threads=N_THREADS, n_batch=n_batch)
        rows = [m.eval(prompt)]
        rows += [m.eval(np.asarray([t], dtype=np.int32)) for t in toks]
        out.append(np.stack(rows))
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_batch", [7, 64])
def test_batched_sequences_equal_each_alone(arch, n_batch):
    path = tiny_gguf(arch, "f32")
    prompts = [random_ids(n, 400, seed=10 + n) for n in (5, 23, 12)]
    steps = [random_ids(6, 400, seed=40 + k) for k in range(3)]
    want = _alone(path, prompts, steps, n_batch)
    m = _core.Model(str(path), n_ctx=128, n_threads=N_THREADS, n_batch=n_batch, n_seq=4)
    assert m.n_seq == 4
    got = [[] for _ in prompts]
    # Sequence 2's prompt arrives late: it is processed while 0 and 1 decode (chunked prefill beside decode).
    first = m.eval_batch([(0, prompts[0]), (1, prompts[1])])
    got[0].append(first[0])
    got[1].append(first[1])
    for step in range(6):
        inputs = [(0, steps[0][step:step + 1]), (1, steps[1][step:step + 1])]
        if step == 2:
            inputs.insert(1, (2, prompts[2]))
        elif step > 2:
            inputs.append((2, steps[2][step - 3:step - 2]))
        logits = m.eval_batch(inputs)
        for (seq, _), row in zip(inputs, logits):
            got[seq].append(row)
    for seq in range(3):
        ours = np.stack(got[seq])
        ref = want[seq][: len(ours)]
        assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), (arch, n_batch, seq)
        assert m.seq_tokens(seq).tolist() == np.concatenate(
            [prompts[seq], steps[seq][: len(ours) - 1]]).tolist()
    assert m.seq_tokens(3).size == 0


def test_sequences_truncate_and_reuse_independently():
    path = tiny_gguf("gemma3", "f32")
    a, b = random_ids(40, 400, seed=1), random_ids(20, 400, seed=2)
    m = _core.Model(str(path), n_ctx=64, n_threads=N_THREADS, n_batch=16, n_seq=2)
    m.eval_batch([(0, a), (1, b)])
    m.truncate(18, seq=1)  # within the sliding blocks' ring: reusable
    assert m.reusable_prefix(18, seq=1) == 18 and m.seq_tokens(0).size == 40
    got = m.eval_batch([(1, b[18:])])[0]
    ref = _core.Model(str(path), n_ctx=64, n_threads=N_THREADS, n_batch=16).eval(b)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert m.reusable_prefix(2, seq=0) == 0  # 40 positions went through its ring of 8 + 16 - 1 rows


def test_truncated_positions_still_took_their_ring_rows():
    """A sliding block's ring row is taken by every position written, whether kept or truncated later. Gemma 3's
    tiny model has windows of 8 and, with n_batch 16, rings of 8 + 16 - 1 = 23 rows. After 31 positions,
    keeping 25 is fine (the next token reads 18..24), but going on to keep 10 needs positions 3..9, whose rows
    positions 26..30 took: refused, although only 25 positions are cached. Reusing them would attend to other
    positions' keys; the logits of the refused-then-recomputed path equal a fresh evaluation."""
    path = tiny_gguf("gemma3", "f32")
    ids = random_ids(31, 400, seed=4)
    m = _core.Model(str(path), n_ctx=64, n_threads=N_THREADS, n_batch=16)
    m.eval(ids)
    assert m.reusable_prefix(25) == 25
    m.truncate(25)
    assert m.reusable_prefix(10) == 0
    with pytest.raises(lowbit.LowbitError, match="no longer hold"):
        m.truncate(10)
    m.eval(ids[25:27])  # positions 25, 26 written again: 27..30's rows still hold the dropped positions
    assert m.reusable_prefix(10) == 0
    m.truncate(0)  # an empty cache protects nothing
    m.eval(ids[:10])
    assert m.reusable_prefix(10) == 10
    ref = _core.Model(str(path), n_ctx=64, n_threads=N_THREADS, n_batch=16).eval(ids[:12])
    got = m.eval(ids[10:12])
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_bad_batches_change_nothing():
    path = tiny_gguf("llama3", "f32")
    m = _core.Model(str(path), n_ctx=16, n_threads=N_THREADS, n_batch=8, n_seq=2)
    m.eval_batch([(0, random_ids(4, 400, seed=1))])
    bad = [
        ([(2, random_ids(2, 400))], "sequence 2 does not exist"),
        ([(0, random_ids(2, 400)), (0, random_ids(2, 400))], "appears twice"),
        ([(1, np.asarray([100000], dtype=np.int32))], "out of range"),
        ([(1, random_ids(3, 400)), (0, random_ids(13, 400))], "context of sequence 0 is full"),
        ([], "at least one input"),
    ]
    for inputs, message in bad:
        with pytest.raises(lowbit.LowbitError, match=message):
            m.eval_batch(inputs)
        assert m.seq_tokens(0).size == 4 and m.seq_tokens(1).size == 0
    with pytest.raises(lowbit.LowbitError, match="sequence 5 does not exist"):
        m.truncate(0, seq=5)
    with pytest.raises(lowbit.LowbitError, match="n_seq"):
        _core.Model(str(path), n_seq=0)
    with pytest.raises(lowbit.LowbitError, match="run on the CPU only"):
        _core.Model(str(path), n_seq=2, n_gpu_layers=1)


# ---- the Python batch engine ---------------------------------------------------------------------------


def _engine(arch: str = "llama3", **kw):
    return lowbit.BatchEngine(tiny_gguf(arch, "f32"), n_ctx=128, n_threads=N_THREADS, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_requests_equal_generate_alone(arch):
    """Six requests on three sequences (three wait in the queue), prompts read 5 tokens per step beside the
    others' decoding: each request's tokens equal Model.generate_tokens on the prompt alone, greedy and
    sampled with its seed."""
    prompts = [random_ids(n, 400, seed=n) for n in (3, 17, 9, 30, 5, 12)]
    kinds = [dict(temperature=0.0), dict(temperature=0.8, seed=7)] * 3
    with _engine(arch, n_seq=3, prefill_chunk=5) as eng:
        reqs = [eng.submit(p, max_new_tokens=6 + i, stop_at_eos=False, **k)
                for i, (p, k) in enumerate(zip(prompts, kinds))]
        assert eng.queued == 6
        eng.step()
        assert eng.running == 3 and eng.queued == 3
        eng.run()
    with lowbit.load(tiny_gguf(arch, "f32"), n_ctx=128, n_threads=N_THREADS) as m:
        for i, (p, k, r) in enumerate(zip(prompts, kinds, reqs)):
            assert r.finish_reason == "length" and len(r.tokens) == 6 + i
            assert r.tokens == m.generate_tokens(p, max_new_tokens=6 + i, stop_at_eos=False, **k), i


def test_engine_cancel_and_prefix_reuse():
    a = random_ids(20, 400, seed=3)
    with _engine(n_seq=2, prefill_chunk=64) as eng:
        first = eng.submit(a, max_new_tokens=5, temperature=0.0, stop_at_eos=False)
        other = eng.submit(random_ids(8, 400, seed=4), max_new_tokens=50, temperature=0.0, stop_at_eos=False)
        eng.run([first])
        eng.cancel(other)
        assert other.finish_reason == "cancelled" and eng.running == 0
        # A follow-up turn: the first request's prompt and reply plus new tokens reuse its cached tokens.
        turn2 = np.concatenate([a, np.asarray(first.tokens, dtype=np.int32), random_ids(4, 400, seed=5)])
        second = eng.submit(turn2, max_new_tokens=6, temperature=0.0, stop_at_eos=False)
        eng.run()
        assert second.reused_tokens == a.size + len(first.tokens) - 1  # the last one was never evaluated
    with lowbit.load(tiny_gguf("llama3", "f32"), n_ctx=128, n_threads=N_THREADS) as m:
        assert second.tokens == m.generate_tokens(turn2, max_new_tokens=6, temperature=0.0, stop_at_eos=False)


def test_engine_bad_requests():
    with _engine(n_seq=2) as eng:
        with pytest.raises(lowbit.LowbitError, match="more than the context"):
            eng.submit(random_ids(200, 400), max_new_tokens=4)
        with pytest.raises(lowbit.LowbitError, match="max_new_tokens must be >= 0, or -1"):
            eng.submit([1, 2], max_new_tokens=-2)
        assert not eng.busy
        full = eng.submit(random_ids(125, 400), max_new_tokens=50, temperature=0.0, stop_at_eos=False)
        unlimited = eng.submit(random_ids(125, 400), max_new_tokens=-1, temperature=0.0, stop_at_eos=False)
        eng.run()
        assert full.finish_reason == "length" and len(full.tokens) == 128 - 125 + 1
        assert unlimited.finish_reason == "length" and unlimited.tokens == full.tokens  # -1: until the context


def test_engine_embeds_in_a_free_sequence():
    """BatchEngine.embed runs in a sequence no request uses, between steps, and gives Model.embed's vectors; the
    requests running beside it are not disturbed; with every sequence busy it refuses."""
    texts = ["the sea at dawn", "a fisherman's village"]
    with lowbit.load(tiny_gguf("llama3", "f32"), n_ctx=128, n_threads=N_THREADS) as m:
        want = m.embed(texts, pooling="last")
        alone = m.generate_tokens([5, 6, 7], max_new_tokens=10, temperature=0.0, stop_at_eos=False)
    with _engine(n_seq=2) as eng:
        req = eng.submit([5, 6, 7], max_new_tokens=10, temperature=0.0, stop_at_eos=False)
        eng.step()
        got = eng.embed(texts, pooling="last")
        assert np.allclose(got, want, rtol=0, atol=1e-6) and eng.last_embed_tokens == sum(
            len(eng.model.tokenize(t)) for t in texts)
        other = eng.submit([8, 9], max_new_tokens=10, temperature=0.0)
        eng.step()
        with pytest.raises(lowbit.LowbitError, match="every sequence is busy"):
            eng.embed("x")
        eng.run()
        assert req.tokens == alone and other.done


def test_a_failing_constraint_ends_only_its_own_request():
    class DeadEnd:
        def mask(self, logits):
            raise lowbit.LowbitError("the grammar allows no next token: dead end")

    with lowbit.load(tiny_gguf("llama3", "f32"), n_ctx=128, n_threads=N_THREADS) as m:
        alone = m.generate_tokens([5, 6, 7], max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    with _engine(n_seq=2) as eng:
        bad = eng.submit([9, 10], max_new_tokens=6, temperature=0.0)
        bad._constraint = DeadEnd()
        good = eng.submit([5, 6, 7], max_new_tokens=6, temperature=0.0, stop_at_eos=False)
        eng.run()
        assert bad.finish_reason == "stop" and bad.tokens == []
        assert good.tokens == alone and good.finish_reason == "length"
