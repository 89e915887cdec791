"""Continuous batching: many generations on one model, their rows in one forward pass per step.

    engine = lowbit.BatchEngine("model.gguf", n_seq=8)
    a = engine.submit("Once upon a time", max_new_tokens=32, temperature=0.0)
    b = engine.submit([1, 2, 3], max_new_tokens=16)
    while engine.busy:
        for request, token in engine.step():
            ...                                  # each new token as it is sampled
    print(a.text, a.finish_reason)

Each step gives every decoding request one row (its last token) and the requests still reading their prompt
chunks of it (prefill_chunk tokens per step in all), so a long prompt does not stall the others; the weights
are read once per step for all of them (Model.eval_batch in the core). Requests beyond n_seq wait in a queue.
A new request takes the free sequence whose cached tokens share the longest prefix with its prompt (a shared
system prompt, the earlier turns of a chat) and evaluates only the rest. Sampling is per request, with the
same sampler and the same rules as Model.generate, so at temperature 0 a request gives generate()'s tokens.
"""
from __future__ import annotations

import collections
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np

from ._core import LowbitError
from .model import Model, Prompt, SamplingParams, _common_prefix, check_logprobs, embed_in_sequence, token_logprob

log = logging.getLogger("lowbit.batch")


_NO_HISTORY = np.zeros(0, dtype=np.int32)


@dataclass(eq=False)
class Request:
    """One generation. tokens grows as the engine samples; finish_reason is set when it ends: "stop" (an
    end-of-generation token), "length" (max_new_tokens or the context), "cancelled"."""

    id: int
    prompt: np.ndarray
    max_new_tokens: int
    stop_at_eos: bool
    repeat_last_n: int
    repeat_penalty: float = 1.0
    tokens: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    logprobs: Optional[list] = None  # TokenLogprob per token when submitted with logprobs=n
    reused_tokens: int = 0          # prompt tokens found in the sequence's cache
    seq: Optional[int] = None       # the sequence it runs in, while it runs
    _sampler: Any = None
    _fed: int = 0                   # prompt tokens evaluated so far (from reused_tokens on)
    _engine: Any = None
    _n_logprobs: Optional[int] = None
    _constraint: Any = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self._engine.model.detokenize(self.tokens)


class BatchEngine:
    """Runs many requests on one model (see the module docstring). Not thread-safe: one thread calls
    submit/step/cancel (a server's event loop or worker thread)."""

    def __init__(self, path: Union[str, Any], n_seq: int = 4, n_ctx: int = 0, n_threads: Optional[int] = None,
                 n_batch: int = 512, kv_f16: bool = False, prefill_chunk: int = 256, seed: Optional[int] = None):
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise LowbitError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        self.model = Model(path, n_ctx=n_ctx, n_threads=n_threads, seed=seed, n_batch=n_batch, kv_f16=kv_f16,
                           n_seq=n_seq)
        self._core = self.model._model()
        self.n_seq = self._core.n_seq
        self.prefill_chunk = prefill_chunk
        self._eog = frozenset(self._core.eog_ids)
        self._ids = itertools.count()
        self._queue: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # seq -> request
        self.last_embed_tokens = 0  # tokens of the last embed() call's inputs

    # ---- requests -----------------------------------------------------------------------------------

    def submit(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
               top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
               seed: Optional[int] = None, add_bos: bool = True, stop_at_eos: bool = True,
               logprobs: Optional[int] = None, json_schema: Any = None, grammar: Optional[str] = None,
               regex: Optional[str] = None) -> Request:
        """Queue a generation (text or token ids; generate()'s arguments, checked the same way). logprobs=n:
        request.logprobs gets a TokenLogprob per generated token, as generate()'s last_logprobs. json_schema,
        grammar or regex constrain the text as in generate()."""
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n)
        ids, sampler, _ = self.model.prepare(prompt, max_new_tokens, sampling, seed, None, add_bos)
        n_lp = check_logprobs(logprobs)
        constraint = self.model._constraint(json_schema, grammar, regex)
        req = Request(next(self._ids), ids, int(max_new_tokens), bool(stop_at_eos), int(repeat_last_n),
                      float(repeat_penalty), _sampler=sampler, _engine=self, _n_logprobs=n_lp,
                      logprobs=[] if n_lp is not None else None, _constraint=constraint)
        if req.max_new_tokens == 0:
            req.finish_reason = "length"
        else:
            self._queue.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """End a request now (queued or running); its sequence is free for the next step."""
        if req.done:
            return
        if req.seq is not None:
            del self._running[req.seq]
            req.seq = None
        else:
            self._queue.remove(req)
        req.finish_reason = "cancelled"

    @property
    def busy(self) -> bool:
        return bool(self._queue or self._running)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- one step -----------------------------------------------------------------------------------

    def _admit(self) -> None:
        free = [s for s in range(self.n_seq) if s not in self._running]
        while self._queue and free:
            req = self._queue.popleft()
            # The free sequence with the longest reusable common prefix (the last prompt token is always
            # evaluated again, for its logits).
            best, keep = free[0], -1
            for s in free:
                k = min(_common_prefix(self._core.seq_tokens(s), req.prompt), req.prompt.size - 1)
                k = self._core.reusable_prefix(k, seq=s)
                if k > keep:
                    best, keep = s, k
            free.remove(best)
            self._core.truncate(keep, seq=best)
            req.seq, req.reused_tokens, req._fed = best, keep, keep
            self._running[best] = req

    def step(self) -> list[tuple[Request, int]]:
        """Admit queued requests to free sequences, evaluate one batch, sample. Returns (request, token) for
        every token sampled in this step, in sequence order; requests that finished have finish_reason set
        (an end-of-generation token is not returned, as generate() does not yield it)."""
        self._admit()
        if not self._running:
            return []
        inputs, reqs, budget = [], [], self.prefill_chunk
        for seq in sorted(self._running):
            req = self._running[seq]
            if req._fed < req.prompt.size:  # still reading its prompt
                if budget == 0:
                    continue
                chunk = req.prompt[req._fed:req._fed + budget]
                budget -= chunk.size
            else:
                chunk = np.asarray(req.tokens[-1:], dtype=np.int32)
            inputs.append((seq, chunk))
            reqs.append(req)
        if not inputs:  # every runner waits for prompt budget: cannot happen with budget >= 1
            return []
        logits = self._core.eval_batch(inputs)
        events = []
        for (seq, chunk), req, row in zip(inputs, reqs, logits):
            if req._fed < req.prompt.size:
                req._fed += chunk.size
                if req._fed < req.prompt.size:
                    continue  # more prompt to read: nothing to sample yet
            window = req.repeat_last_n if req.repeat_penalty != 1.0 else 0  # no penalty: no history needed
            if window:
                history = np.concatenate([req.prompt, np.asarray(req.tokens, dtype=np.int32)])
                recent = np.ascontiguousarray(history if window < 0 else history[-window:])
            else:
                recent = _NO_HISTORY
            try:
                allowed = req._constraint.mask(row) if req._constraint is not None else row
                token = int(req._sampler.sample(allowed, recent))
                if req.stop_at_eos and token in self._eog:
                    self._finish(req, "stop")
                    continue
                if req._constraint is not None:
                    req._constraint.consume(token)
            except LowbitError as e:  # a grammar at a dead end ends its own request, not the others
                log.warning("request %d: %s", req.id, e)
                self._finish(req, "stop")
                continue
            req.tokens.append(token)
            if req._n_logprobs is not None:
                req.logprobs.append(token_logprob(row, token, req._n_logprobs))
            events.append((req, token))
            # As generate(): the last token is sampled, not evaluated; a full context ends the request.
            cached = req.prompt.size + len(req.tokens) - 1  # the prompt and every token but this one
            if req._constraint is not None and req._constraint.done:
                self._finish(req, "stop")  # the grammar is complete
            elif 0 <= req.max_new_tokens <= len(req.tokens) or cached >= self.model.n_ctx:  # -1: no limit
                self._finish(req, "length")
        return events

    def free_sequence(self) -> Optional[int]:
        """A sequence no request runs in (None if all are busy)."""
        return next((s for s in range(self.n_seq) if s not in self._running), None)

    def embed(self, texts: Any, pooling: str = "mean", normalize: bool = True, add_bos: bool = True) -> np.ndarray:
        """Model.embed's embeddings, computed in a sequence no request is using (between steps, on the thread
        that steps the engine). LowbitError when every sequence is busy: call again after a step."""
        single, inputs = self.model.embed_inputs(texts, pooling, add_bos)
        seq = self.free_sequence()
        if seq is None:
            raise LowbitError("every sequence is busy; embed after a request ends")
        self.last_embed_tokens = sum(int(ids.size) for ids in inputs)
        out = embed_in_sequence(self._core, inputs, pooling, normalize, seq=seq)
        return out[0] if single else out

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        del self._running[req.seq]
        req.seq = None

    def run(self, requests: Optional[Sequence[Request]] = None) -> None:
        """Step until the given requests (default: all) are done."""
        while (any(not r.done for r in requests) if requests is not None else self.busy):
            self.step()

    def close(self) -> None:
        for req in list(self._queue) + list(self._running.values()):
            self.cancel(req)
        self.model.close()

    def __enter__(self) -> "BatchEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
