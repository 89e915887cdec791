"""Model.embed and `lowbit embed`: pooled final hidden states equal transformers' last_hidden_state (the output of
the final norm) pooled the same way, on the tiny F32 model and on a Gemma 3 checkpoint (sliding windows, embedding
scale, sandwich norms); bad input gets a clear error."""
from __future__ import annotations

import json

import numpy as np
import pytest

import lowbit
from lowbit.cli import main
from model_helpers import N_THREADS, _hf_model, tiny_gguf, tiny_hf

torch = pytest.importorskip("torch")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "A longer text about the sea, the fisherman and "
         "his village in the morning, and what happened to them all on that day."]


def _reference(model_hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model_hf.model(torch.tensor([ids])).last_hidden_state[0]
    return out.double().numpy()


def _pool(h: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    v = {"mean": h.mean(axis=0), "last": h[-1], "cls": h[0]}[pooling]
    return v / np.linalg.norm(v) if normalize else v


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
@pytest.mark.parametrize("normalize", [True, False])
def test_embeddings_equal_transformers(pooling, normalize):
    hf = _hf_model(tiny_hf())
    with lowbit.load(tiny_gguf("f32"), n_threads=N_THREADS, n_ctx=128, n_batch=16) as m:  # chunks of 16
        got = m.embed(TEXTS, pooling=pooling, normalize=normalize)
        assert got.shape == (len(TEXTS), m.config.n_embd) and got.dtype == np.float32
        for text, row in zip(TEXTS, got):
            want = _pool(_reference(hf, m.tokenize(text)), pooling, normalize)
            scale = np.abs(want).max()
            assert np.max(np.abs(row - want)) <= 1e-4 * scale, (text, np.max(np.abs(row - want)), scale)
        one = m.embed(TEXTS[0], pooling=pooling, normalize=normalize)
        assert one.shape == (m.config.n_embd,) and np.array_equal(one, got[0])
        ids = m.tokenize(TEXTS[1])
        assert np.array_equal(m.embed(ids, pooling=pooling, normalize=normalize), got[1])


def test_embeddings_of_a_gemma3_checkpoint():
    """Gemma 3: the embedding scale, q/k norms, sandwich norms and sliding windows (prompt longer than the
    window of 8) all shape the final hidden state."""
    from test_architectures import hf_model, tiny_gguf as arch_gguf

    hf = hf_model("gemma3")
    path = arch_gguf("gemma3", "f32")
    with lowbit.load(path, n_threads=N_THREADS, n_ctx=128) as m:
        ids = list(np.random.default_rng(0).integers(3, 300, 40))
        got = m.embed(ids, pooling="mean", normalize=False)
        want = _reference(hf, ids).mean(axis=0)
        assert np.max(np.abs(got - want)) <= 1e-4 * np.abs(want).max()


def test_embed_errors_and_cli(capsys, tmp_path):
    path = tiny_gguf("f32")
    with lowbit.load(path, n_threads=N_THREADS, n_ctx=32) as m:
        for bad, words in (([], "at least one"), ("", "no tokens"), ("word " * 60, "more than the context"),
                           ([1, 99999], "outside the vocabulary")):
            with pytest.raises(lowbit.LowbitError, match=words):
                m.embed(bad) if bad != "" else m.embed(bad, add_bos=False)
        with pytest.raises(lowbit.LowbitError, match="pooling"):
            m.embed("hi", pooling="max")
        want = m.embed(["hi there", "the sea"])
    assert main(["embed", "-m", str(path), "-p", "hi there", "-p", "the sea", "-t", "1"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert np.allclose(np.asarray(got, dtype=np.float32), want, rtol=0, atol=1e-6)
    with pytest.raises(SystemExit):
        main(["embed", "-m", str(path), "-p", "hi", "--pooling", "max"])
