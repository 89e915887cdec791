"""Files written by llama.cpp's own quantizer (llama-quantize's file types, llama.cpp's per-tensor mix): every
tensor dequantizes in lowbit exactly as gguf-py (llama.cpp's Python package) dequantizes it, and the model runs.

SmolLM2-135M has rows of 576 (not a multiple of 256: llama.cpp falls back to Q5_0/Q5_1/Q8_0/IQ4_NL/Q4_0 tensor
by tensor); the tiny model of tests/model_helpers.py with 256-wide rows gets the K types themselves.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import lowbit

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (llama.cpp) is the oracle here; make test installs it")
gguf = pytest.importorskip("gguf")

# llama.h's LLAMA_FTYPE_MOSTLY_* ids.
FILE_TYPES = {"q4_0": 2, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_m": 12, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18,
              "iq4_nl": 25, "iq4_xs": 30}


def llama_quantize(src, dst, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed ({rc})"


def assert_every_tensor_dequantizes_as_gguf_py(path) -> set[str]:
    reader = gguf.GGUFReader(str(path))
    seen = set()
    with lowbit.GGUFFile(path) as f:
        for t in reader.tensors:
            want = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)
            got = f.tensor(t.name).to_numpy().reshape(-1)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (path.name, t.name, t.tensor_type.name)
            seen.add(t.tensor_type.name)
    return seen


@pytest.fixture(scope="module")
def smollm2_f16(tmp_path_factory):
    from lowbit.hub import fetch_smollm2

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-f16.gguf"
    return lowbit.quantize_file(fetch_smollm2(), out, "f16", progress=False, allow_requantize=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FILE_TYPES))
def test_smollm2_llamacpp_files_read_exactly_and_run(tmp_path, smollm2_f16, name):
    out = tmp_path / f"smollm2-{name}.gguf"
    llama_quantize(smollm2_f16, out, FILE_TYPES[name])
    types = assert_every_tensor_dequantizes_as_gguf_py(out)
    assert types - {"F32", "F16"}, types
    with lowbit.load(out, n_threads=2) as m:
        logits = np.asarray(m.logits([1, 504, 3458, 282, 253]))
    assert np.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FILE_TYPES))
def test_256_wide_llamacpp_files_read_exactly(tmp_path, name):
    from test_convert import MODELS, write_f16_llama

    src = write_f16_llama(tmp_path / "k256-f16.gguf", **MODELS["k256"])
    out = tmp_path / f"k256-{name}.gguf"
    llama_quantize(src, out, FILE_TYPES[name])
    types = assert_every_tensor_dequantizes_as_gguf_py(out)
    if name.startswith(("q2", "q3", "q4_k", "q5_k", "q6")):
        assert types & {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}, types
    if name == "iq4_xs":
        assert "IQ4_XS" in types, types
