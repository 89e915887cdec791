"""Architectures beyond plain Llama, each a row of the core's ArchSpec table: Llama 3 RoPE scaling (rope_freqs),
qwen2 (q/k/v biases, neox RoPE, tied head) and qwen3 (per-head q/k RMSNorm, explicit head size 24 != 64 / 4).

Per architecture a seeded tiny transformers checkpoint (tiny_models.make_tiny_model; every norm and bias
redrawn) is converted with lowbit.convert, then:
  * F32: logits equal transformers' fp32 within 1e-4 of the logit scale; greedy tokens equal;
  * Q8_0: close to transformers' fp32 (mean KL, top-1 agreement; thresholds below);
  * llama.cpp (llama_cpp.Llama) loads the same F32 file and its logits agree with transformers' (mean KL <=
    1e-4), so the file is what llama.cpp's converter writes, names and keys included.
The runtime is also checked on a file written by llama.cpp's gguf-py from converter/hf.py's tensors and keys
(hf.iter_tensors, hf.model_metadata), which does not depend on the conversion pipeline (converter/core.py).

Q8_0 calibration (32 random tokens, seeds 0-5, AVX2 kernels; tests/test_model.py's method): worst mean KL and
worst top-1 agreement over the seeds, then the limit (about twice the KL, about 0.1 below the top-1). A dropped
bias or norm, or the wrong RoPE pairing, gives a KL of nats, far above these.

    arch    worst KL -> limit       worst top-1 -> limit
    llama3  3.3e-4   -> 7e-4        0.906 -> 0.80
    qwen2   2.2e-3   -> 5e-3        0.938 -> 0.85       (tied head: the 4x-scaled embedding is the output)
    qwen3   3.6e-4   -> 8e-4        0.844 -> 0.75
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

import lowbit
from model_helpers import _ROOT, N_THREADS, kl_and_top1, log_softmax, random_ids

ARCHS = ["llama3", "qwen2", "qwen3"]
GGUF_ARCH = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
TIED = {"llama3": False, "qwen2": True, "qwen3": False}
Q8_LIMITS = {"llama3": (7e-4, 0.80), "qwen2": (5e-3, 0.85), "qwen3": (8e-4, 0.75)}
SEQ_LEN = 32


@functools.lru_cache(maxsize=None)
def tiny_hf(arch: str, seed: int = 0):
    from tiny_models import make_tiny_model

    return make_tiny_model(_ROOT / "hf-arch", arch, seed=seed, tied=TIED[arch])


@functools.lru_cache(maxsize=None)
def hf_model(arch: str, seed: int = 0):
    from tiny_models import load_hf_model

    return load_hf_model(tiny_hf(arch, seed))


@functools.lru_cache(maxsize=None)
def _convert(arch: str, qtype: str, seed: int):
    out = _ROOT / f"arch-{arch}-{qtype}-s{seed}.gguf"
    lowbit.convert(tiny_hf(arch, seed), out, outtype=qtype, progress=False, force=True)
    return out


def file_architecture(path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def tiny_gguf(arch: str, qtype: str, seed: int = 0):
    """The tiny checkpoint converted with lowbit.convert (convert.py's pipeline), named as llama.cpp names it."""
    out = _convert(arch, qtype, seed)
    assert file_architecture(out) == GGUF_ARCH[arch]
    return out


@functools.lru_cache(maxsize=None)
def gguf_py_file(arch: str):
    """F32 GGUF of the tiny checkpoint written by gguf-py from hf.py's names, shapes and keys."""
    import gguf
    from lowbit.converter import hf
    from lowbit.converter.metadata import VT
    from lowbit.converter.vocab import tokenizer_metadata

    hf_dir = tiny_hf(arch)
    params = hf.LlamaParams.from_dir(hf_dir)
    out = _ROOT / f"arch-{arch}-gguf-py.gguf"
    w = gguf.GGUFWriter(str(out), params.gguf_arch)  # writes general.architecture itself
    for kv in hf.model_metadata(params, 0) + tokenizer_metadata(hf_dir, params.n_vocab):
        if kv.key == "general.architecture":
            continue
        sub = gguf.GGUFValueType(int(kv.elem_type)) if kv.type == VT.ARRAY else None
        w.add_key_value(kv.key, kv.value, gguf.GGUFValueType(int(kv.type)), sub)
    for name, shape, load in hf.iter_tensors(hf.Checkpoint(hf_dir), params):
        x = load()
        assert tuple(x.shape) == tuple(shape) and hf.tensor_shape(params, name) in (None, tuple(shape)), name
        w.add_tensor(name, x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def hf_logits(arch: str, ids: np.ndarray, seed: int = 0) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = hf_model(arch, seed)(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None])
    return out.logits[0].float().numpy()


def hf_greedy(arch: str, ids: np.ndarray, n_new: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = hf_model(arch).generate(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None], do_sample=False,
                                      max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=None,
                                      pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_file_names_the_architecture(arch):
    from gguf import GGUFReader

    path = tiny_gguf(arch, "f32")
    assert file_architecture(path) == GGUF_ARCH[arch]
    r = GGUFReader(str(path))
    names = {t.name for t in r.tensors}
    assert ("rope_freqs.weight" in names) == (arch == "llama3")
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
    assert ("blk.1.attn_k_norm.weight" in names) == (arch == "qwen3")
    assert ("output.weight" in names) == (not TIED[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_match_transformers(arch):
    ids = random_ids(SEQ_LEN, 400, seed=1)
    with lowbit.load(tiny_gguf(arch, "f32"), n_threads=N_THREADS) as m:
        assert m.config.architecture == GGUF_ARCH[arch]
        if arch == "qwen3":
            assert m.config.head_dim == 24 and m.config.head_dim * m.config.n_head != m.config.n_embd
        ours = m.logits(ids)
    ref = hf_logits(arch, ids)
    assert ours.shape == ref.shape
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= 1e-4 * scale


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_py_file_of_hf_names_and_keys_matches_transformers(arch):
    ids = random_ids(SEQ_LEN, 400, seed=3)
    with lowbit.load(gguf_py_file(arch), n_threads=N_THREADS) as m:
        assert m.config.architecture == GGUF_ARCH[arch]
        assert m.config.tied_embeddings == TIED[arch]
        ours = m.logits(ids)
    ref = hf_logits(arch, ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_transformers(arch):
    prompt = random_ids(8, 400, seed=4)
    with lowbit.load(tiny_gguf(arch, "f32"), n_threads=N_THREADS) as m:
        ours = m.generate_tokens(prompt, max_new_tokens=24, temperature=0.0, stop_at_eos=False)
    assert ours == hf_greedy(arch, prompt, 24)


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_close_to_transformers(arch):
    ids = random_ids(SEQ_LEN, 400, seed=1)
    with lowbit.load(tiny_gguf(arch, "q8_0"), n_threads=N_THREADS) as m:
        ours = m.logits(ids)
    kl, top1 = kl_and_top1(hf_logits(arch, ids), ours)
    max_kl, min_top1 = Q8_LIMITS[arch]
    assert kl <= max_kl and top1 >= min_top1, (kl, top1)


@pytest.mark.parametrize("arch", ARCHS)
def test_llamacpp_reads_the_converted_file(arch):
    try:
        import llama_cpp
    except ImportError as e:  # the oracle is an optional test dependency (pyproject's test extra)
        pytest.skip(f"llama_cpp is not importable ({e}); install the llama-cpp-python wheel to run this oracle")
    ids = random_ids(SEQ_LEN, 400, seed=1)
    llm = llama_cpp.Llama(model_path=str(tiny_gguf(arch, "f32")), n_ctx=64, n_batch=64, logits_all=True,
                          n_threads=N_THREADS, verbose=False)
    try:
        llm.eval(ids.tolist())
        theirs = np.array(llm.scores[:SEQ_LEN], dtype=np.float32)
    finally:
        llm.close()
    lp, lq = log_softmax(hf_logits(arch, ids)), log_softmax(theirs)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    assert kl <= 1e-4, kl


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    from model_helpers import write_synthetic_gguf

    path = write_synthetic_gguf(tmp_path / "phi3.gguf", arch="phi3")
    with pytest.raises(lowbit.LowbitError, match=r"architecture 'phi3'.*'llama'.*'qwen2'.*'qwen3'"):
        lowbit.load(path)
