"""Bad input to the runtime: every case is a clear lowbit.LowbitError, and a loaded model stays usable."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import lowbit
from model_helpers import N_THREADS, random_ids, tiny_gguf, write_synthetic_gguf

# ---- files that do not load -------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(lowbit.LowbitError, match="does not exist"):
        lowbit.load(tmp_path / "nope.gguf")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(lowbit.LowbitError, match="directory"):
        lowbit.load(tmp_path)


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"this is not a GGUF file at all, just some text " * 10)
    with pytest.raises(lowbit.LowbitError):
        lowbit.load(p, n_threads=1)


def test_unsupported_architecture(tmp_path):
    p = write_synthetic_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(lowbit.LowbitError, match="architecture 'gpt2'"):
        lowbit.load(p, n_threads=1)


def test_mistral_architecture_is_accepted(tmp_path):
    p = write_synthetic_gguf(tmp_path / "mistral.gguf", arch="mistral")
    with lowbit.load(p, n_threads=1) as m:
        assert m.config.architecture == "mistral"
        assert np.isfinite(m.logits([1, 2, 3])).all()


@pytest.mark.parametrize("type_id,name", [(16, "IQ2_XXS"), (34, "TQ1_0"), (39, "MXFP4"), (15, "Q8_K")])
def test_unsupported_tensor_type(tmp_path, type_id, name):
    """A type lowbit cannot run is refused before anything is allocated, naming the tensor, the type and the
    types lowbit runs (Q8_K is an activation type: lowbit quantizes it but no matrix is ever stored as it)."""
    p = write_synthetic_gguf(tmp_path / f"{name}.gguf", types={"blk.0.ffn_up.weight": type_id})
    with pytest.raises(lowbit.LowbitError, match=rf"blk\.0\.ffn_up\.weight.*{name}.*lowbit runs .*Q4_K.*IQ4_XS") as e:
        lowbit.load(p, n_threads=1)
    listed = str(e.value).split("lowbit runs ", 1)[1].split(".", 1)[0].split(", ")
    assert "Q8_K" not in listed and "NF4_DQ" not in listed  # not types a matrix is stored as
    assert {"F32", "F16", "BF16", "Q4_0", "Q6_K", "NF4", "FP4"} <= set(listed)


def test_missing_tensor(tmp_path):
    p = write_synthetic_gguf(tmp_path / "missing.gguf", drop=("blk.0.ffn_up.weight",))
    with pytest.raises(lowbit.LowbitError, match=r"blk\.0\.ffn_up\.weight"):
        lowbit.load(p, n_threads=1)


def test_wrong_tensor_shape(tmp_path):
    p = write_synthetic_gguf(tmp_path / "shape.gguf", shapes={"blk.0.attn_k.weight": (128, 256)})
    with pytest.raises(lowbit.LowbitError, match=r"blk\.0\.attn_k\.weight.*shape"):
        lowbit.load(p, n_threads=1)


def test_missing_output_is_tied(tmp_path):
    p = write_synthetic_gguf(tmp_path / "tied.gguf", drop=("output.weight",))
    with lowbit.load(p, n_threads=1) as m:
        assert m.config.tied_embeddings
        assert m.logits([0, 5]).shape == (2, 32)


def test_gpu_layers_without_cuda_build():
    if lowbit.cuda_info()["compiled"]:
        pytest.skip("this build has the CUDA backend")
    with pytest.raises(lowbit.LowbitError, match="no CUDA backend"):
        lowbit.load(tiny_gguf("f32"), n_gpu_layers=1, n_threads=1)


@pytest.mark.parametrize("kw", [dict(n_threads=0), dict(n_batch=0), dict(n_ctx=-1), dict(n_ctx=1.5)])
def test_bad_load_arguments(kw):
    with pytest.raises(lowbit.LowbitError):
        lowbit.load(tiny_gguf("f32"), **{"n_threads": 1, **kw})


# ---- a loaded model survives bad calls --------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    m = lowbit.load(tiny_gguf("q4_0"), n_threads=N_THREADS, n_ctx=64)
    yield m
    m.close()


@pytest.fixture(scope="module")
def baseline(model):
    return model.generate("Once upon a time", max_new_tokens=12, temperature=0.0)


def _still_usable(model, baseline):
    assert model.generate("Once upon a time", max_new_tokens=12, temperature=0.0) == baseline


@pytest.mark.parametrize("call", [
    lambda m: m.generate(random_ids(80, 400).tolist(), max_new_tokens=4),
    lambda m: m.generate("The sea " * 40, max_new_tokens=4),
    lambda m: m.generate("Hi", max_new_tokens=-2),
    lambda m: m.generate("Hi", max_new_tokens=2.5),
    lambda m: m.generate("Hi", temperature=-0.5),
    lambda m: m.generate("Hi", top_p=1.5),
    lambda m: m.generate("Hi", min_p=-1),
    lambda m: m.generate("Hi", top_k=-2),
    lambda m: m.generate("Hi", repeat_penalty=0),
    lambda m: m.generate("Hi", stop=[3]),
    lambda m: m.generate([1, 2, 100000]),
    lambda m: m.generate([]),
    lambda m: m.logits([1, -1]),
    lambda m: m.logits(list(range(70))),
    lambda m: m.chat([{"role": "wizard", "content": "hi"}]),
    lambda m: m.chat([{"role": "user"}]),
    lambda m: m.chat("just a string"),
    lambda m: m.chat([{"role": "user", "content": "hi"}], max_new_tokens=-3),
], ids=["prompt>n_ctx(ids)", "prompt>n_ctx(text)", "max_new_tokens<-1", "max_new_tokens-float", "temperature<0",
        "top_p>1", "min_p<0", "top_k<0", "repeat_penalty=0", "stop-not-str", "token-out-of-range", "empty-prompt",
        "logits-negative-id", "logits>n_ctx", "unknown-role", "no-content", "messages-str", "chat-max-new<0"])
def test_bad_call_is_clear_error_and_model_survives(model, baseline, call):
    with pytest.raises(lowbit.LowbitError) as e:
        call(model)
    assert len(str(e.value)) > 15  # says what is wrong
    _still_usable(model, baseline)


def test_error_messages_say_what_to_do(model):
    with pytest.raises(lowbit.LowbitError, match="n_ctx"):
        model.generate(random_ids(80, 400).tolist(), max_new_tokens=4)
    with pytest.raises(lowbit.LowbitError, match="unknown role 'wizard'"):
        model.chat([{"role": "wizard", "content": "hi"}])


def test_context_overflow_in_eval_changes_nothing(model, baseline):
    core = model._core
    model.reset()
    core.eval(np.arange(3, 63, dtype=np.int32))
    assert model.n_past == 60
    with pytest.raises(lowbit.LowbitError, match="context is full"):
        core.eval(np.arange(3, 8, dtype=np.int32))
    assert model.n_past == 60
    with pytest.raises(lowbit.LowbitError, match="out of range"):
        core.eval(np.array([5, 1 << 20], dtype=np.int32))
    assert model.n_past == 60
    with pytest.raises(lowbit.LowbitError):
        core.truncate(61)
    _still_usable(model, baseline)


def test_generation_stops_when_context_fills():
    with lowbit.load(tiny_gguf("q4_0"), n_threads=N_THREADS, n_ctx=20) as m:
        out = m.generate_tokens(random_ids(15, 400).tolist(), max_new_tokens=50, temperature=0.0, stop_at_eos=False)
        assert len(out) == 6  # 5 evaluated + the last sampled one
        assert m.n_past == 20


def test_file_truncated_while_mapped(tmp_path):
    p = tmp_path / "copy.gguf"
    shutil.copy(tiny_gguf("f32"), p)
    m = lowbit.load(p, n_threads=1)
    assert m.logits([1, 2, 3]).shape[0] == 3
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    with pytest.raises(lowbit.LowbitError, match="truncated"):
        m.logits([1, 2, 3])
    m.close()


def test_file_replaced_while_mapped(tmp_path):
    p = tmp_path / "copy.gguf"
    shutil.copy(tiny_gguf("f32"), p)
    m = lowbit.load(p, n_threads=1)
    tmp = tmp_path / "other.gguf"
    shutil.copy(tiny_gguf("q8_0"), tmp)
    os.replace(tmp, p)
    with pytest.raises(lowbit.LowbitError, match="replaced"):
        m.logits([1, 2, 3])
    m.close()


def test_closed_model(tmp_path):
    m = lowbit.load(tiny_gguf("f32"), n_threads=1)
    m.close()
    with pytest.raises(lowbit.LowbitError, match="closed"):
        m.generate("Hi")
