"""Constrained decoding: a JSON schema, a grammar (llama.cpp's GBNF, or Lark) or a regular expression decides,
token by token, which tokens may come next; the others get a logit of -inf before sampling.

The grammar engine is llguidance (the `structured` extra: pip install "lowbit[structured]"), which computes the
set of allowed tokens for a 49k-262k vocabulary in tens of microseconds per step. Tokens are handed to it as the
bytes they stand for; control tokens (and user-defined ones spelled like <...>) are marked as special, as
llguidance's own llama.cpp adapter does, so a grammar never produces them as text.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Optional, Union

import numpy as np

from ._core import LowbitError

_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (lowbit.tokenizer)


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise LowbitError(f"json_schema / grammar / regex need llguidance ({e}); "
                          "pip install 'lowbit[structured]'") from None
    return llguidance


class _Vocabulary:
    """The model's tokenizer as llguidance's TokenizerWrapper expects it."""

    def __init__(self, tok: Any, n_vocab: int):
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id
        pieces = []
        for i in range(n_vocab):
            if i >= len(tok.tokens):
                pieces.append(b"")
                continue
            piece = tok.token_to_piece(i)
            kind = tok.token_types[i]
            if kind == _CONTROL or (kind == _USER_DEFINED and piece.startswith(b"<") and piece.endswith(b">")):
                piece = b"\xff" + tok.tokens[i].encode("utf-8")
            pieces.append(piece)
        self.tokens = pieces
        self.special_token_ids = [i for i, p in enumerate(pieces) if p.startswith(b"\xff")]
        self._tok = tok

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text")  # tells llguidance to pass str, not bytes
        return list(self._tok.encode(text, add_bos=False, special=False))


_cache_lock = threading.Lock()


def ll_tokenizer(model: Any) -> Any:
    """llguidance's tokenizer for a model, built once per model (about a second for 262k tokens)."""
    with _cache_lock:
        cached = getattr(model, "_ll_tokenizer", None)
        if cached is None:
            llg = _llguidance()
            vocab = _Vocabulary(model.tokenizer, model.n_vocab)
            eog = sorted(model._model().eog_ids) or ([vocab.eos_token_id] if vocab.eos_token_id is not None else [])
            cached = llg.LLTokenizer(llg.TokenizerWrapper(vocab), n_vocab=model.n_vocab, eos_token=eog)
            model._ll_tokenizer = cached
    return cached


def grammar_text(json_schema: Union[None, str, dict] = None, grammar: Optional[str] = None,
                 regex: Optional[str] = None) -> Optional[str]:
    """llguidance's grammar for at most one of the three forms (None when none is given)."""
    given = [name for name, v in (("json_schema", json_schema), ("grammar", grammar), ("regex", regex))
             if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise LowbitError(f"give one of json_schema, grammar and regex, not {' and '.join(given)}")
    llg = _llguidance()
    try:
        if json_schema is not None:
            schema = json.loads(json_schema) if isinstance(json_schema, str) else json_schema
            if not isinstance(schema, dict):
                raise LowbitError("json_schema must be a JSON object (a dict or its JSON text)")
            return llg.LLMatcher.grammar_from_json_schema(schema)
        if grammar is not None:
            if not isinstance(grammar, str):
                raise LowbitError("grammar must be a string (GBNF, as llama.cpp's, or Lark)")
            return llg.grammar_from("grammar", grammar)
        if not isinstance(regex, str):
            raise LowbitError("regex must be a string")
        return llg.LLMatcher.grammar_from_regex(regex)
    except LowbitError:
        raise
    except (ValueError, TypeError) as e:
        raise LowbitError(f"{given[0]}: {e}") from None


class Constraint:
    """One generation's grammar state: mask() the logits of each step, then consume() the sampled token."""

    def __init__(self, model: Any, grammar: str):
        llg = _llguidance()
        self._n_vocab = model.n_vocab
        self._matcher = llg.LLMatcher(ll_tokenizer(model), grammar, log_level=0)
        if self._matcher.is_error():
            raise LowbitError(f"the grammar cannot be used: {self._matcher.get_error()}")

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of logits with every token the grammar forbids next at -inf."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:self._n_vocab].astype(bool)
        if not allowed.any():
            raise LowbitError(f"the grammar allows no next token: {self._matcher.get_error() or 'dead end'}")
        return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise LowbitError(f"the grammar rejected token {token}: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar allows nothing more (the text is complete)."""
        return self._matcher.is_stopped()
