"""Constrained decoding (lowbit.constrain, llguidance): sampled at temperature 1 from a tiny random model, which on
its own writes nothing like JSON, every generation under a JSON schema parses and validates with the `jsonschema`
package; regex and GBNF outputs match their pattern; bad constraints get clear errors."""
from __future__ import annotations

import json
import re

import pytest

import lowbit
from model_helpers import N_THREADS, tiny_gguf

pytest.importorskip("llguidance", reason="constrained decoding needs llguidance (the structured extra)")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},  # compact JSON: a random model would pad it with spaces
}


@pytest.fixture(scope="module")
def model():
    with lowbit.load(tiny_gguf("q8_0"), n_threads=N_THREADS, n_ctx=256) as m:
        yield m


def test_json_schema_outputs_validate(model):
    free = model.generate("Data:", max_new_tokens=40, temperature=1.0, seed=0)
    with pytest.raises(ValueError):
        json.loads(free)  # unconstrained, the model does not write JSON
    for seed in range(50):
        out = model.generate("Data:", max_new_tokens=120, temperature=1.0, seed=seed, json_schema=SCHEMA)
        assert model.last_finish_reason == "stop", (seed, out)
        jsonschema.validate(json.loads(out), SCHEMA)
    # The schema as JSON text, streamed, and through generate_tokens.
    text = "".join(model.generate("Data:", max_new_tokens=120, temperature=1.0, seed=3,
                                  json_schema=json.dumps(SCHEMA), stream=True))
    assert text == model.generate("Data:", max_new_tokens=120, temperature=1.0, seed=3, json_schema=SCHEMA)
    ids = model.generate_tokens("Data:", max_new_tokens=120, temperature=1.0, seed=3, json_schema=SCHEMA)
    assert model.detokenize(ids) == text


def test_regex_and_gbnf(model):
    for seed in range(10):
        out = model.generate("x", max_new_tokens=30, temperature=1.0, seed=seed, regex=r"[0-9]{3}-[a-z]{2}")
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", out), out
        out = model.generate("x", max_new_tokens=30, temperature=1.0, seed=seed,
                             grammar='root ::= ("yes" | "no") " " [0-9]')
        assert re.fullmatch(r"(yes|no) [0-9]", out), out


def test_bad_constraints_are_clear_errors(model, monkeypatch):
    with pytest.raises(lowbit.LowbitError, match="one of json_schema, grammar and regex"):
        model.generate("x", max_new_tokens=4, json_schema=SCHEMA, regex="a")
    with pytest.raises(lowbit.LowbitError, match="json_schema"):
        model.generate("x", max_new_tokens=4, json_schema="{not json")
    with pytest.raises(lowbit.LowbitError, match="json_schema must be a JSON object"):
        model.generate("x", max_new_tokens=4, json_schema=[1, 2])
    with pytest.raises(lowbit.LowbitError, match="grammar"):
        model.generate("x", max_new_tokens=4, grammar="root ::= (")
    import builtins

    real = builtins.__import__

    def no_llguidance(name, *a, **kw):
        if name == "llguidance":
            raise ImportError("No module named 'llguidance'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_llguidance)
    with pytest.raises(lowbit.LowbitError, match="lowbit\\[structured\\]"):
        model.generate("x", max_new_tokens=4, regex="a+")
