"""Model.save_state / load_state: a saved KV cache continues exactly as the cache it was taken from, in another
Model of the same file; a state from another or a changed file, another KV type, a context too small for it, or
a damaged state file is refused with the reason and the cache left as it was."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import lowbit
from model_helpers import N_THREADS
from model_helpers import tiny_gguf as tiny_llama
from test_architectures import tiny_gguf

PROMPT = [5, 17, 23, 42, 8, 99, 3, 64, 71, 12, 33, 250, 7, 18, 44, 91, 2, 150, 61, 9]


def _continue(m, prompt, n=12, seed=None):
    """Tokens and their logprobs generated after the prompt (temperature 1 with a seed, or greedy)."""
    kw = dict(temperature=1.0, seed=seed) if seed is not None else dict(temperature=0.0)
    out = m.generate_tokens(prompt, max_new_tokens=n, stop_at_eos=False, logprobs=2, **kw)
    return out, [(lp.token, lp.logprob, lp.top) for lp in m.last_logprobs], m.last_timings["reused_tokens"]


@pytest.mark.parametrize("arch, kv_f16", [("llama3", False), ("llama3", True), ("gemma3", False)])
def test_saved_state_continues_exactly(tmp_path, arch, kv_f16):
    """Gemma 3's sliding-window blocks keep a ring of their last positions: the prompt here is longer than the
    window (8), so the ring has wrapped when the state is saved."""
    path = tiny_gguf(arch, "f32")
    state = tmp_path / "prompt.state"
    with lowbit.load(path, n_threads=N_THREADS, n_ctx=128, kv_f16=kv_f16, n_batch=16) as a:
        a.generate_tokens(PROMPT, max_new_tokens=0)  # evaluate the prompt only
        a.save_state(state)
        ref = [_continue(a, PROMPT), _continue(a, PROMPT, seed=11)]  # each reuses the cached prompt
        # Mid-generation: the prompt and 5 generated tokens in the cache.
        first, _, _ = _continue(a, PROMPT, n=6)
        a.generate_tokens(PROMPT + first[:5], max_new_tokens=0)
        a.save_state(tmp_path / "mid.state")
        allowed_a = [a._core.reusable_prefix(k) for k in range(1, len(PROMPT) + 6)]
        mid = _continue(a, PROMPT + first[:6], seed=3)
    with lowbit.load(path, n_threads=N_THREADS, n_ctx=128, kv_f16=kv_f16, n_batch=16) as b:
        assert b.load_state(state) == len(PROMPT) and b.cached_tokens == PROMPT
        got = _continue(b, PROMPT)
        assert got[2] == len(PROMPT) - 1  # the saved cache was used, not evaluated again
        assert got == ref[0]
        b.load_state(state)
        assert _continue(b, PROMPT, seed=11) == ref[1]
        assert b.load_state(tmp_path / "mid.state") == len(PROMPT) + 5
        # The loaded cache is never more willing to be cut back than the one it was saved from (a sliding
        # ring restores only the positions it still held).
        allowed_b = [b._core.reusable_prefix(k) for k in range(1, len(PROMPT) + 6)]
        assert all(x == 0 or x == k for k, x in zip(range(1, len(PROMPT) + 6), allowed_b))
        assert all(x <= y for x, y in zip(allowed_b, allowed_a))
        assert _continue(b, PROMPT + first[:6], seed=3) == mid


def test_bad_states_are_refused_and_change_nothing(tmp_path):
    path = tiny_gguf("llama3", "f32")
    state = tmp_path / "s.state"
    with lowbit.load(path, n_threads=N_THREADS, n_ctx=128) as m:
        m.generate_tokens(PROMPT, max_new_tokens=0)
        m.save_state(state)

    def refused(model, file, words):
        before = model.cached_tokens
        with pytest.raises(lowbit.LowbitError, match=words):
            model.load_state(file)
        assert model.cached_tokens == before

    other = tiny_llama("f32")  # another architecture's file, same vocabulary
    with lowbit.load(other, n_threads=N_THREADS, n_ctx=128) as m:
        m.generate_tokens([1, 2, 3], max_new_tokens=0)
        refused(m, state, "another model file")
    changed = tmp_path / "changed.gguf"
    shutil.copy(path, changed)
    with open(changed, "r+b") as f:  # one weight byte in the middle of the file
        f.seek(changed.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    renamed = tmp_path / path.name
    shutil.copy(changed, renamed)  # same name and size as the original, other bytes
    with lowbit.load(renamed, n_threads=N_THREADS, n_ctx=128) as m:
        refused(m, state, "earlier version of this one|another model file")
    same = tmp_path / "copy" / path.name
    same.parent.mkdir()
    shutil.copy(path, same)  # an identical copy elsewhere is the same model
    with lowbit.load(same, n_threads=N_THREADS, n_ctx=128) as m:
        assert m.load_state(state) == len(PROMPT)
    with lowbit.load(path, n_threads=N_THREADS, n_ctx=128, kv_f16=True) as m:
        refused(m, state, "KV cache is f32.*same kv type")
    with lowbit.load(path, n_threads=N_THREADS, n_ctx=16) as m:
        refused(m, state, "more than this model's context of 16")
    raw = state.read_bytes()
    (tmp_path / "short.state").write_bytes(raw[:-100])
    (tmp_path / "junk.state").write_bytes(b"not a state at all" * 10)
    with lowbit.load(path, n_threads=N_THREADS, n_ctx=128) as m:
        m.generate_tokens([4, 5, 6], max_new_tokens=0)
        refused(m, tmp_path / "short.state", "truncated")
        refused(m, tmp_path / "junk.state", "not a lowbit saved state")
        refused(m, tmp_path / "missing.state", "cannot read")
        # A damaged cache blob is caught by the core's own checks, before the sequence changes.
        with pytest.raises(lowbit.LowbitError, match="saved state"):
            m._core.set_state(np.asarray(PROMPT, dtype=np.int32), b"LBST" + bytes(60))
        blob = m._core.state()
        with pytest.raises(lowbit.LowbitError, match="saved state"):
            m._core.set_state(np.asarray([4, 5, 6], dtype=np.int32), blob[:-8])
        with pytest.raises(lowbit.LowbitError, match="saved state"):
            m._core.set_state(np.asarray([4, 5, 6, 7], dtype=np.int32), blob)
        assert m.cached_tokens == [4, 5, 6]
