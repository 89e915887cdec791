"""lowbit.converter.ftype against the tensor types llama.cpp's quantizer chose (tests/data/ftype/*.json)."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from lowbit.converter.ftype import (FILE_TYPES, ModelFacts, TensorSpec, block_size, fallback_type, file_type_id,
                                    file_type_table, is_quantizable, tensor_types, uses_more_bits)

DATA = Path(__file__).resolve().parent / "data" / "ftype"
SHAPES = json.loads((DATA / "shapes.json").read_text())
RECORDED = sorted(p.name for p in DATA.glob("*.json") if p.name not in ("shapes.json", "file_types.json"))


def _model(shape: str) -> tuple[list[TensorSpec], ModelFacts]:
    entry = SHAPES[shape]
    specs = [TensorSpec(name, tuple(t["shape"]), t["type"]) for name, t in entry["tensors"].items()]
    return specs, ModelFacts(**entry["facts"])


def _parse(file_name: str) -> tuple[str, str, bool]:
    stem = file_name[:-len(".json")]
    pure = stem.endswith("_pure")
    shape, ftype = (stem[:-len("_pure")] if pure else stem).split("_", 1)
    return shape, ftype, pure


def test_every_file_type_and_shape_is_recorded():
    for shape in SHAPES:
        for ftype in FILE_TYPES:
            assert f"{shape}_{ftype}.json" in RECORDED, (shape, ftype)
    assert len(RECORDED) >= len(SHAPES) * len(FILE_TYPES)


@pytest.mark.parametrize("file_name", RECORDED)
def test_matches_llama_cpp(file_name):
    shape, ftype, pure = _parse(file_name)
    specs, facts = _model(shape)
    want = json.loads((DATA / file_name).read_text())
    got = tensor_types(specs, facts, ftype, pure=pure)
    assert got.keys() == want.keys()
    diff = {name: (want[name], got[name]) for name in want if want[name] != got[name]}
    assert not diff, f"{file_name}: (llama.cpp, ours) {diff}"


@pytest.mark.parametrize("ftype", ["q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m"])
def test_tensor_order_in_the_input_does_not_matter(ftype):
    # the layer counters follow llama.cpp's walk (by layer, then name), not the order the tensors are given in
    specs, facts = _model("gqa4")
    want = json.loads((DATA / f"gqa4_{ftype}.json").read_text())
    shuffled = list(reversed(specs))
    random.Random(1).shuffle(shuffled)
    got = tensor_types(shuffled, facts, ftype)
    assert list(got) == [t.name for t in shuffled]
    assert got == want


def test_file_type_ids_match_llama_cpp():
    written = json.loads((DATA / "file_types.json").read_text())
    assert written.keys() == FILE_TYPES.keys()
    for name, ftype_id in written.items():
        assert FILE_TYPES[name].ftype_id == ftype_id
        assert file_type_id(name) == ftype_id
        assert file_type_id(name.upper()) == ftype_id


def test_file_type_id_of_ggml_type_names():
    assert file_type_id("Q4_K") == FILE_TYPES["q4_k_m"].ftype_id
    assert file_type_id("Q3_K") == FILE_TYPES["q3_k_m"].ftype_id
    assert file_type_id("Q5_K") == FILE_TYPES["q5_k_m"].ftype_id
    assert file_type_id("Q6_K") == 18 and file_type_id("Q8_0") == 7 and file_type_id("F16") == 1
    with pytest.raises(ValueError, match="no llama.cpp file type"):
        file_type_id("NF4")


def test_file_type_table_lists_every_type():
    table = file_type_table()
    for ft in FILE_TYPES.values():
        assert ft.name in table and ft.description in table


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("ftype", sorted(FILE_TYPES))
def test_pure_gives_the_base_type_where_it_fits(shape, ftype):
    specs, facts = _model(shape)
    base = FILE_TYPES[ftype].base_type
    got = tensor_types(specs, facts, ftype, pure=True)
    for t in specs:
        if not is_quantizable(t.name, t.shape):
            assert got[t.name] == t.source_type, t.name
        elif t.shape[0] % block_size(base) == 0:
            assert got[t.name] == base, t.name
        else:
            assert got[t.name] == fallback_type(base, t.shape[0]) != base, t.name


def test_norms_and_1d_tensors_stay_f32():
    specs, facts = _model("untied512")
    for ftype in FILE_TYPES:
        got = tensor_types(specs, facts, ftype)
        for t in specs:
            if len(t.shape) == 1:
                assert got[t.name] == "F32", (ftype, t.name)


def test_fallback_table():
    assert fallback_type("Q4_K", 576) == "Q5_0"
    assert fallback_type("Q5_K", 576) == "Q5_1"
    assert fallback_type("Q6_K", 576) == "Q8_0"
    assert fallback_type("Q2_K", 576) == "Q4_0"
    assert fallback_type("Q3_K", 576) == "Q4_0"
    assert fallback_type("IQ4_XS", 576) == "IQ4_NL"
    assert fallback_type("Q4_K", 512) == "Q4_K"
    for t in ("Q4_0", "Q8_0", "IQ4_NL", "Q4_K", "Q6_K", "IQ4_XS"):
        assert fallback_type(t, 200) == "F16"


def test_more_bits_layers():
    assert [i for i in range(8) if uses_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(32) if uses_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29,
                                                                30, 31]


def _smollm2_like() -> tuple[dict[str, tuple[int, ...]], ModelFacts]:
    # SmolLM2-135M: 30 layers, rows of 576, n_ff 1536, 9 heads / 3 kv heads, tied embedding
    t: dict[str, tuple[int, ...]] = {"token_embd.weight": (576, 49152), "output_norm.weight": (576,)}
    for i in range(30):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": (576,), p + "ffn_norm.weight": (576,),
                  p + "attn_q.weight": (576, 576), p + "attn_k.weight": (576, 192), p + "attn_v.weight": (576, 192),
                  p + "attn_output.weight": (576, 576), p + "ffn_gate.weight": (576, 1536),
                  p + "ffn_up.weight": (576, 1536), p + "ffn_down.weight": (1536, 576)})
    return t, ModelFacts(n_layer=30, n_head=9, n_head_kv=3)


@pytest.mark.parametrize("ftype, counts", [
    # counted on SmolLM2-135M-Instruct files written by llama.cpp's quantizer (llama-cpp-python 0.3.36)
    ("q4_k_m", {"Q5_0": 166, "Q4_K": 16, "Q6_K": 14, "Q8_0": 15, "F32": 61}),
    ("q4_0", {"Q4_0": 210, "Q8_0": 1, "F32": 61}),
    ("q6_k", {"Q8_0": 181, "Q6_K": 30, "F32": 61}),
    ("q2_k", {"Q4_0": 180, "Q3_K": 30, "Q8_0": 1, "F32": 61}),
])
def test_smollm2_counts(ftype, counts):
    tensors, facts = _smollm2_like()
    assert Counter(tensor_types(tensors, facts, ftype).values()) == counts


def test_tied_is_read_from_the_tensor_list_unless_given():
    tensors = {"token_embd.weight": (512, 1024), "blk.0.attn_q.weight": (512, 512)}
    facts = ModelFacts(n_layer=1, n_head=8, n_head_kv=8)
    assert tensor_types(tensors, facts, "q4_k_m")["token_embd.weight"] == "Q6_K"
    untied = ModelFacts(n_layer=1, n_head=8, n_head_kv=8, tied=False)
    assert tensor_types(tensors, untied, "q4_k_m")["token_embd.weight"] == "Q4_K"


def test_unknown_file_type_is_an_error():
    with pytest.raises(ValueError, match="unknown file type"):
        tensor_types({"token_embd.weight": (512, 8)}, ModelFacts(1, 8, 8), "q7_k")
