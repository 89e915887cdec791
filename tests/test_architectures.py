"""Architectures beyond plain Llama, each a row of the core's ArchSpec table: Llama 3 RoPE scaling (rope_freqs),
qwen2 (q/k/v biases, neox RoPE, tied head), qwen3 (per-head q/k RMSNorm, explicit head size 24 != 64 / 4) and
gemma3 (norms before and after attention and feed-forward stored as 1 + w, GELU-tanh, q/k norms, embedding x
sqrt(n_embd), tied head, five sliding-window blocks of 8 positions to one global block, each kind with its own
RoPE base, head size 32 != 64 / 4). Prompts are 32-48 tokens, several windows long.

Per architecture a seeded tiny transformers checkpoint (tiny_models.make_tiny_model; every norm and bias
redrawn) is converted with lowbit.convert, then:
  * F32: logits equal transformers' fp32 within 1e-4 of the logit scale; greedy tokens equal;
  * Q8_0: close to transformers' fp32 (mean KL, top-1 agreement; thresholds below);
  * llama.cpp (llama_cpp.Llama) loads the same F32 file and its logits agree with transformers' (mean KL <=
    1e-4), so the file is what llama.cpp's converter writes, names and keys included.
The runtime is also checked on a file written by llama.cpp's gguf-py from converter/hf.py's tensors and keys
(hf.iter_tensors, hf.model_metadata), which does not depend on the conversion pipeline (converter/core.py).

Q8_0 calibration (32 random tokens, seeds 0-5, AVX2 kernels; tests/test_model.py's method; gemma3 on the
AVX-512 VNNI kernels): worst mean KL and worst top-1 agreement over the seeds, then the limit (about twice the
KL, about 0.1 below the top-1). A dropped bias or norm, or the wrong RoPE pairing, gives a KL of nats, far above
these.

    arch    worst KL -> limit       worst top-1 -> limit
    llama3  3.3e-4   -> 7e-4        0.906 -> 0.80
    qwen2   2.2e-3   -> 5e-3        0.938 -> 0.85       (tied head: the 4x-scaled embedding is the output)
    qwen3   3.6e-4   -> 8e-4        0.844 -> 0.75
    gemma3  7.3e-3   -> 1.5e-2      0.938 -> 0.85       (llama.cpp on the same files: about as far)

Q4_K_M files need rows that hold 256-element superblocks: the same architectures at hidden 256, intermediate
512 (seeds 0-5, AVX-512 VNNI). Against transformers' fp32 the 4-bit rounding itself dominates, so those limits
are loose; against llama.cpp running the same file (the same rounded weights) they are tight:

    arch    vs transformers: KL, top-1 -> limits     vs llama.cpp: KL, top-1 -> limits
    llama3  3.9e-2, 0.56 -> 8e-2, 0.45                6.3e-4, 0.938 -> 1.3e-3, 0.85
    qwen2   1.5e-1, 0.69 -> 3e-1, 0.55                2.9e-3, 0.969 -> 6e-3,   0.85
    qwen3   3.4e-2, 0.56 -> 7e-2, 0.45                6.3e-4, 0.938 -> 1.3e-3, 0.85
    gemma3  3.4e-1, 0.50 -> 7e-1, 0.40                8.3e-3, 0.938 -> 1.7e-2, 0.85
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

import lowbit
from model_helpers import _ROOT, N_THREADS, kl_and_top1, random_ids

ARCHS = ["llama3", "qwen2", "qwen3", "gemma3"]
GGUF_ARCH = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}
TIED = {"llama3": False, "qwen2": True, "qwen3": False, "gemma3": True}
Q8_LIMITS = {"llama3": (7e-4, 0.80), "qwen2": (5e-3, 0.85), "qwen3": (8e-4, 0.75), "gemma3": (1.5e-2, 0.85)}
KQ_HF_LIMITS = {"llama3": (8e-2, 0.45), "qwen2": (3e-1, 0.55), "qwen3": (7e-2, 0.45), "gemma3": (7e-1, 0.40)}
KQ_LLAMACPP_LIMITS = {"llama3": (1.3e-3, 0.85), "qwen2": (6e-3, 0.85), "qwen3": (1.3e-3, 0.85),
                      "gemma3": (1.7e-2, 0.85)}
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
def tiny_hf_wide(arch: str):
    """The architecture at hidden 256 / intermediate 512, so that K-quant superblocks fit its rows."""
    from tiny_models import make_tiny_model

    return make_tiny_model(_ROOT / "hf-arch", arch, tied=TIED[arch], hidden=256, intermediate=512,
                           name=f"tiny-{arch}-wide")


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


def hf_logits(arch: str, ids: np.ndarray, seed: int = 0, model=None) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = (model or hf_model(arch, seed))(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None])
    return out.logits[0].float().numpy()


def llamacpp_logits(path, ids: np.ndarray) -> np.ndarray:
    """llama.cpp's logits for every position of ids on the file (skips the test without llama_cpp)."""
    try:
        import llama_cpp
    except ImportError as e:  # the oracle is an optional test dependency (pyproject's test extra)
        pytest.skip(f"llama_cpp is not importable ({e}); install the llama-cpp-python wheel to run this oracle")
    n = len(ids)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, n), n_batch=max(64, n), logits_all=True,
                          n_threads=N_THREADS, verbose=False)
    try:
        llm.eval([int(t) for t in ids])
        return np.array(llm.scores[:n], dtype=np.float32)
    finally:
        llm.close()


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
    assert ("blk.1.attn_k_norm.weight" in names) == (arch in ("qwen3", "gemma3"))
    assert ("blk.2.post_attention_norm.weight" in names) == (arch == "gemma3")
    assert ("blk.2.post_ffw_norm.weight" in names) == (arch == "gemma3")
    assert ("output.weight" in names) == (not TIED[arch])
    if arch == "gemma3":
        from tiny_models import GEMMA3_WINDOW

        fields = r.fields
        assert int(fields["gemma3.attention.sliding_window"].parts[-1][0]) == GEMMA3_WINDOW
        # The default layout (every 6th block global), the default sliding RoPE base (10000) and a query scale
        # of head_dim^-0.5 are what llama.cpp assumes, so no key says them.
        for key in ("gemma3.attention.sliding_window_pattern", "gemma3.rope.freq_base_swa", "gemma3.attention.scale"):
            assert key not in fields, key
        # Gemma's norms are stored as 1 + w: HF's weights are near 0, the file's near 1.
        norm = next(t for t in r.tensors if t.name == "blk.0.post_ffw_norm.weight")
        assert 0.5 < float(np.mean(norm.data)) < 1.5


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_match_transformers(arch):
    ids = random_ids(SEQ_LEN, 400, seed=1)
    with lowbit.load(tiny_gguf(arch, "f32"), n_threads=N_THREADS) as m:
        assert m.config.architecture == GGUF_ARCH[arch]
        if arch == "qwen3":
            assert m.config.head_dim == 24 and m.config.head_dim * m.config.n_head != m.config.n_embd
        if arch == "gemma3":
            from tiny_models import GEMMA3_WINDOW

            assert m.config.sliding_window == GEMMA3_WINDOW and SEQ_LEN > 3 * GEMMA3_WINDOW
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


@functools.lru_cache(maxsize=None)
def _wide_q4_k_m(arch: str):
    out = _ROOT / f"arch-{arch}-wide-q4_k_m.gguf"
    lowbit.convert(tiny_hf_wide(arch), out, outtype="q4_k_m", progress=False, force=True)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_q4_k_m_close_to_transformers_and_to_llamacpp(arch):
    from gguf import GGUFReader

    path = _wide_q4_k_m(arch)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_gate.weight"] == "Q4_K" and types["blk.0.attn_q.weight"] == "Q4_K", types
    ids = random_ids(SEQ_LEN, 400, seed=1)
    with lowbit.load(path, n_threads=N_THREADS) as m:
        ours = m.logits(ids)
    from tiny_models import load_hf_model

    kl, top1 = kl_and_top1(hf_logits(arch, ids, model=load_hf_model(tiny_hf_wide(arch))), ours)
    max_kl, min_top1 = KQ_HF_LIMITS[arch]
    assert kl <= max_kl and top1 >= min_top1, ("vs transformers", kl, top1)
    kl, top1 = kl_and_top1(llamacpp_logits(path, ids), ours)
    max_kl, min_top1 = KQ_LLAMACPP_LIMITS[arch]
    assert kl <= max_kl and top1 >= min_top1, ("vs llama.cpp on the same file", kl, top1)


@pytest.mark.parametrize("arch", ARCHS)
def test_llamacpp_reads_the_converted_file(arch):
    ids = random_ids(SEQ_LEN, 400, seed=1)
    kl = kl_and_top1(hf_logits(arch, ids), llamacpp_logits(tiny_gguf(arch, "f32"), ids))[0]
    assert kl <= 1e-4, kl


def assert_f32_file_matches(path, ids: np.ndarray, ref: np.ndarray) -> None:
    """lowbit's logits on an F32 file within 1e-4 of the logit scale of transformers' (ref), and llama.cpp's on
    the same file within a mean KL of 1e-4."""
    with lowbit.load(path, n_threads=N_THREADS) as m:
        ours = m.logits(ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    kl = kl_and_top1(ref, llamacpp_logits(path, ids))[0]
    assert kl <= 1e-4, kl


# ---- Gemma 3's sliding windows ----------------------------------------------------------------------


@pytest.mark.parametrize("n_batch", [1, 5, 64])
def test_gemma3_sliding_window_cache_in_any_chunking(n_batch):
    """48 positions (6 windows) evaluated in chunks of 1, 5 and all: every position's logits equal
    transformers' (the sliding blocks' ring of window + n_batch - 1 rows wraps many times)."""
    ids = random_ids(48, 400, seed=5)
    ref = hf_logits("gemma3", ids)
    with lowbit.load(tiny_gguf("gemma3", "f32"), n_threads=N_THREADS, n_batch=n_batch) as m:
        core = m._model()
        rows = [core.eval(ids[i:i + n_batch], all_logits=True) for i in range(0, len(ids), n_batch)]
        ours = np.concatenate([r.reshape(-1, ref.shape[1]) for r in rows])
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_gemma3_sliding_blocks_cache_only_their_window():
    """The KV cache grows with n_ctx only for the global block: 5 of the 6 blocks keep window + n_batch - 1
    positions however long the context."""
    from tiny_models import GEMMA3_WINDOW

    sizes = {}
    for n_ctx in (128, 256):
        with lowbit.load(tiny_gguf("gemma3", "f32"), n_ctx=n_ctx, n_batch=16, n_threads=N_THREADS) as m:
            sizes[n_ctx] = m.memory_footprint()["kv"]
            kv_row = 2 * m.config.n_head_kv * m.config.head_dim * 4  # K and V, fp32
    assert sizes[256] - sizes[128] == 128 * kv_row  # one global block
    assert sizes[128] == (128 + 5 * (GEMMA3_WINDOW + 16 - 1)) * kv_row


def test_gemma3_prefix_reuse_past_the_window():
    """Prefix reuse where the sliding blocks have dropped the positions a kept prefix would need: the model
    starts over (reusable_prefix 0) and the result equals a fresh model's; a short step back is reused."""
    a = random_ids(40, 400, seed=6)
    b = np.concatenate([a[:12], random_ids(20, 400, seed=7)])
    path = tiny_gguf("gemma3", "f32")
    with lowbit.load(path, n_threads=N_THREADS, n_batch=4) as m:
        core = m._model()
        m.generate_tokens(a, max_new_tokens=4, temperature=0.0, stop_at_eos=False)
        assert core.reusable_prefix(12) == 0 and core.reusable_prefix(core.n_past - 2) == core.n_past - 2
        with pytest.raises(lowbit.LowbitError, match="sliding-window"):
            core.truncate(12)
        assert core.n_past == 43  # 40 + 3 (the last token is sampled, not evaluated); the refused truncate kept it
        got_b = m.generate_tokens(b, max_new_tokens=8, temperature=0.0, stop_at_eos=False)
        assert m.last_timings["reused_tokens"] == 0
        c = np.concatenate([b, np.asarray(got_b[:6], dtype=np.int32)])  # the cache holds b + got_b[:7]
        got_c = m.generate_tokens(c, max_new_tokens=8, temperature=0.0, stop_at_eos=False)
        assert m.last_timings["reused_tokens"] == len(c) - 1
    with lowbit.load(path, n_threads=N_THREADS) as fresh:
        assert got_b == fresh.generate_tokens(b, max_new_tokens=8, temperature=0.0, stop_at_eos=False)
        assert got_c == fresh.generate_tokens(c, max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    assert got_b == hf_greedy("gemma3", b, 8)


def test_gemma3_layer_layout_from_config():
    """A layout other than llama.cpp's default (here sliding, global, sliding) is written as
    gemma3.attention.sliding_window_pattern, one bool per block, which lowbit and llama.cpp both follow."""
    from gguf import GGUFReader
    from tiny_models import load_hf_model, make_tiny_model

    hf_dir = make_tiny_model(_ROOT / "hf-arch", "gemma3", tied=True, n_layers=3, name="tiny-gemma3-layout",
                             layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    out = _ROOT / "arch-gemma3-layout-f32.gguf"
    lowbit.convert(hf_dir, out, outtype="f32", progress=False, force=True)
    field = GGUFReader(str(out)).fields["gemma3.attention.sliding_window_pattern"]
    assert [bool(field.parts[i][0]) for i in field.data] == [True, False, True]
    ids = random_ids(SEQ_LEN, 400, seed=1)
    ref = hf_logits("gemma3", ids, model=load_hf_model(hf_dir))
    assert_f32_file_matches(out, ids, ref)


def test_gemma3_multimodal_checkpoint_converts_its_text_model():
    """Gemma3ForConditionalGeneration: the vision tower and projector are left out, the language model's
    tensors and text_config make the same gemma3 file, and its logits equal the multimodal model's on text."""
    from gguf import GGUFReader
    from tiny_models import load_hf_model, make_tiny_gemma3_multimodal

    hf_dir = make_tiny_gemma3_multimodal(_ROOT / "hf-arch")
    out = _ROOT / "arch-gemma3-multimodal-f32.gguf"
    lowbit.convert(hf_dir, out, outtype="f32", progress=False, force=True)
    r = GGUFReader(str(out))
    assert file_architecture(out) == "gemma3"
    assert all(t.name.startswith(("token_embd.", "output_norm.", "blk.")) for t in r.tensors)
    assert len([t for t in r.tensors if t.name.startswith("blk.")]) == 6 * 13
    ids = random_ids(SEQ_LEN, 390, seed=1)  # below the image tokens at the top of the vocabulary
    ref = hf_logits("gemma3", ids, model=load_hf_model(hf_dir))
    with lowbit.load(out, n_threads=N_THREADS) as m:
        ours = m.logits(ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


# YaRN (Qwen2.5/Qwen3's long-context setting) with an original context of 256: for head size 16 and base 1e4
# the correction range is pairs 0..4, so pairs keep their frequency, blend, and are divided by the factor.
YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 256}


def test_yarn_rope_scaling_matches_transformers_and_llamacpp():
    from gguf import GGUFReader
    from tiny_models import load_hf_model, make_tiny_model

    hf_dir = make_tiny_model(_ROOT / "hf-arch", "qwen2", tied=True, rope_parameters=YARN, name="tiny-qwen2-yarn")
    out = _ROOT / "arch-qwen2-yarn-f32.gguf"
    lowbit.convert(hf_dir, out, outtype="f32", progress=False, force=True)
    fields = GGUFReader(str(out)).fields
    assert bytes(fields["qwen2.rope.scaling.type"].parts[-1]).decode() == "yarn"
    assert int(fields["qwen2.rope.scaling.original_context_length"].parts[-1][0]) == 256
    ids = random_ids(SEQ_LEN, 400, seed=1)
    ref = hf_logits("qwen2", ids, model=load_hf_model(hf_dir))
    assert_f32_file_matches(out, ids, ref)


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    from model_helpers import write_synthetic_gguf

    path = write_synthetic_gguf(tmp_path / "phi3.gguf", arch="phi3")
    with pytest.raises(lowbit.LowbitError, match=r"architecture 'phi3'.*'llama'.*'qwen2'.*'qwen3'.*'gemma3'"):
        lowbit.load(path)
