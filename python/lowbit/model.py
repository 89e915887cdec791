"""lowbit.load / lowbit.Model: a GGUF LLaMA-family model with tokenizer, KV cache reuse, sampling and chat.

    m = lowbit.load("model.gguf", n_ctx=2048, n_threads=4)
    print(m.generate("Once upon a time", max_new_tokens=32, temperature=0))
    for piece in m.chat([{"role": "user", "content": "Hi!"}], stream=True):
        print(piece, end="")

Cache: the model keeps the tokens of the last prompt and its generated continuation in the KV cache, and the
next generate()/chat() evaluates only what follows the longest common prefix (a second chat turn does not
recompute the first). logits() replaces the cache contents with its own tokens. reset() empties the cache.

Threads: one generation at a time per model. A second thread calling generate() waits for the first; a
thread that calls generate() while its own streaming generation is still open gets a LowbitError.
Ctrl-C during generate() leaves the model usable: the cache holds exactly the fully evaluated tokens.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from . import _core
from ._core import LowbitError
from .chat import render_chat

if TYPE_CHECKING:
    from .constrain import Constraint

log = logging.getLogger("lowbit.model")

Prompt = Union[str, Sequence[int]]


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters read from the file ({architecture}.* keys)."""

    architecture: str
    name: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    rope_freq_base: float
    rope_freq_scale: float
    rms_eps: float
    tied_embeddings: bool
    sliding_window: int = 0      # sliding-window blocks attend to this many positions; 0: none
    attn_scale: float = 0.0      # the queries' scale (1/sqrt(head_dim) for most models)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's defaults; temperature 0 is greedy. Order: repeat penalty, top_k, top_p, min_p, temperature."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64

    def make_sampler(self, seed: int) -> "_core.Sampler":
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise LowbitError(f"{name} must be a number, got {value!r}")
        for name in ("top_k", "repeat_last_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise LowbitError(f"{name} must be an integer, got {value!r}")
        return _core.Sampler(temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p),
                             min_p=float(self.min_p), repeat_penalty=float(self.repeat_penalty),
                             repeat_last_n=int(self.repeat_last_n), seed=seed)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its raw logits: before penalties,
    top-k/top-p/min-p and temperature, as llama.cpp and OpenAI report them) and the n most likely tokens at
    that position as (id, logprob), most likely first (ties: lower id first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's top_logprobs


def check_logprobs(n: Optional[int]) -> Optional[int]:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= MAX_LOGPROBS:
        raise LowbitError(f"logprobs must be None or an integer from 0 to {MAX_LOGPROBS}, got {n!r}")
    return int(n)


def token_logprob(logits: np.ndarray, token: int, n: int) -> TokenLogprob:
    """TokenLogprob of token under logits (one position, n_vocab floats), with the top n alternatives."""
    x = np.asarray(logits, dtype=np.float64)
    m = float(x.max())
    lse = m + float(np.log(np.exp(x - m).sum()))
    top: tuple[tuple[int, float], ...] = ()
    if n > 0:
        idx = np.argpartition(-x, min(n, x.size) - 1)[:n]
        idx = idx[np.lexsort((idx, -x[idx]))]
        top = tuple((int(i), float(x[i] - lse)) for i in idx)
    return TokenLogprob(int(token), float(x[token] - lse), top)


_STATE_MAGIC = b"LOWBIT-STATE-1\n\0"


def pool_hidden(hidden: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    """One embedding from a text's final hidden states (n, n_embd): mean, last or first ("cls") row, optionally
    scaled to unit length (float64 arithmetic, float32 result)."""
    v = hidden.mean(axis=0, dtype=np.float64) if pooling == "mean" else \
        hidden[-1 if pooling == "last" else 0].astype(np.float64)
    if normalize:
        norm = np.linalg.norm(v)
        v = v / norm if norm > 0 else v
    return v.astype(np.float32)


def embed_in_sequence(core: "_core.Model", inputs: Sequence[np.ndarray], pooling: str, normalize: bool,
                      seq: int = 0) -> np.ndarray:
    """(len(inputs), n_embd): each input's pooled final hidden states, evaluated on its own from an empty cache
    in sequence seq (which then holds the last input)."""
    out = np.empty((len(inputs), core.config["n_embd"]), dtype=np.float32)
    for k, ids in enumerate(inputs):
        core.truncate(0, seq=seq)
        out[k] = pool_hidden(core.eval_hidden(ids, seq=seq), pooling, normalize)
    return out


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _default_threads() -> int:
    # Like llama.cpp: the physical cores are what matter; with SMT, half the logical CPUs is a good guess.
    n = _usable_cpus()
    return max(1, n // 2) if n > 4 else n


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string (it may still become one)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class _TextStream:
    """The text of generated tokens as it becomes final: held back while it ends in an incomplete UTF-8
    character or in a proper prefix of a stop string; ends at the first stop string (not included). Only the
    text not yet released is kept, so a long generation costs linear time."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self._decoder = tokenizer.stream_decoder()
        self._stops = [s for s in stops if s]
        self._pending = ""  # decoded, not yet released
        self.stopped = False

    def feed(self, token: int) -> str:
        """Text released by one more token ("" while held back or after a stop string)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.feed(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        if self.stopped:
            return ""
        self._pending += self._decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._pending
        if self._stops:
            # A stop string never straddles released text: its beginning would have been held back.
            hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
            if hits:
                self.stopped = True
                self._pending = ""
                return text[:min(hits)]
        safe = len(text) if final or not self._stops else len(text) - _stop_holdback(text, self._stops)
        self._pending = text[safe:]
        return text[:safe]


class Model:
    """A loaded model. Prefer lowbit.load(...)."""

    def __init__(self, path: Union[str, os.PathLike], n_ctx: int = 0, n_threads: Optional[int] = None,
                 n_gpu_layers: int = 0, seed: Optional[int] = None, n_batch: int = 512, kv_f16: bool = False,
                 n_seq: int = 1) -> None:
        self._core: Optional[_core.Model] = None
        path = Path(path)
        if not path.exists():
            raise LowbitError(f"model file '{path}' does not exist; check the path")
        if path.is_dir():
            raise LowbitError(f"'{path}' is a directory; pass a .gguf file (convert a Hugging Face folder first "
                              "with `lowbit convert`)")
        for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch), ("n_gpu_layers", n_gpu_layers), ("n_seq", n_seq)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise LowbitError(f"{name} must be an integer, got {value!r}")
        if n_threads is None:
            n_threads = _default_threads()
        if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)) or n_threads < 1:
            raise LowbitError(f"n_threads must be a positive integer or None (a guess), got {n_threads!r}")
        if n_gpu_layers != 0 and not _core.cuda_info()["compiled"]:
            raise LowbitError(f"n_gpu_layers={n_gpu_layers} needs a GPU, but this build has no CUDA backend; "
                              "rebuild with LOWBIT_CUDA=ON (nvcc on PATH) or pass n_gpu_layers=0")
        self.path = path
        self.n_threads = int(n_threads)
        if self.n_threads > _usable_cpus():
            log.warning("n_threads=%d is more than the %d CPUs this process may use: the threads wait on each other "
                        "and decoding slows down (leave n_threads unset for a guess from the cores)",
                        self.n_threads, _usable_cpus())
        t0 = time.perf_counter()
        self._core = _core.Model(str(path), n_ctx=int(n_ctx), n_threads=int(n_threads), n_batch=int(n_batch),
                                 n_gpu_layers=int(n_gpu_layers), kv_f16=bool(kv_f16), n_seq=int(n_seq))
        self._config = ModelConfig.from_dict(self._core.config)
        bos = self._core.metadata("tokenizer.ggml.bos_token_id").get("tokenizer.ggml.bos_token_id")
        self._bos_id: Optional[int] = int(bos) if isinstance(bos, (int, np.integer)) else None
        if self._config.n_ctx_train and self._core.n_ctx > self._config.n_ctx_train:
            log.warning("n_ctx=%d is above the %d positions %s was trained on; quality usually drops past them",
                        self._core.n_ctx, self._config.n_ctx_train, path.name)
        self._tokenizer = None
        self._tokenizer_error: Optional[Exception] = None
        self._tokenizer_keys: Optional[dict] = None
        self._tokenizer_lock = threading.Lock()
        self._chat_template: Optional[str] = None
        self._warned_no_template = False
        self._seed_rng = random.Random(seed)
        self._lock = threading.Lock()
        self._owner: Optional[int] = None
        self.load_seconds = time.perf_counter() - t0
        self.last_timings: dict[str, float] = {}
        self.last_finish_reason: Optional[str] = None
        self.last_logprobs: Optional[list[TokenLogprob]] = None
        self._file_identity: Optional[dict] = None
        log.info("loaded %s: %d layers, n_embd %d, vocab %d, n_ctx %d, %d threads, in %.3f s", path,
                 self._config.n_layer, self._config.n_embd, self._config.n_vocab, self.n_ctx, self.n_threads,
                 self.load_seconds)

    # ---- properties ---------------------------------------------------------------------------------

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def n_ctx(self) -> int:
        return self._model().n_ctx

    @property
    def n_vocab(self) -> int:
        return self._config.n_vocab

    @property
    def n_past(self) -> int:
        """Tokens currently in the KV cache."""
        return self._model().n_past

    @property
    def cached_tokens(self) -> list[int]:
        return self._model().tokens.tolist()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            with self._tokenizer_lock:
                if self._tokenizer_error is not None:
                    raise self._tokenizer_error
                if self._tokenizer is None:
                    # The tokenizer.* keys move from the core (read at load; the file is not parsed again) into
                    # the tokenizer, so the vocabulary is not held twice (~13 MiB less at the peak for 49k tokens).
                    # Kept until the build succeeds, so an interrupted build (Ctrl-C) can be retried.
                    if self._tokenizer_keys is None:
                        self._tokenizer_keys = self._model().take_metadata("tokenizer.")
                    try:
                        tok = Tokenizer.from_metadata(self._tokenizer_keys)
                    except Exception as e:  # a bad vocabulary stays bad: later calls get the same error
                        self._tokenizer_error = e
                        self._tokenizer_keys = None
                        raise
                    self._tokenizer_keys = None
                    self._chat_template = tok.chat_template
                    self._tokenizer = tok
        return self._tokenizer

    def _model(self) -> "_core.Model":
        if self._core is None:
            raise LowbitError("this model was closed; load it again")
        return self._core

    # ---- tokens -------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of text. add_bos: prepend BOS when the model uses one; special: parse special-token text
        such as "<|im_end|>" as those tokens (False: as plain text)."""
        if not isinstance(text, str):
            raise LowbitError(f"tokenize needs a str, got {type(text).__name__}")
        # add_bos=True follows the file's tokenizer.ggml.add_bos_token, as llama.cpp's add_special does.
        return list(self.tokenizer.encode(text, add_bos=None if add_bos else False, special=special))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # ---- evaluation ---------------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int], what: str) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise LowbitError(f"{what} must be a 1-D sequence of token ids")
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_vocab):
            bad = int(arr[(arr < 0) | (arr >= self.n_vocab)][0])
            raise LowbitError(f"{what} contains token id {bad}, outside the vocabulary [0, {self.n_vocab})")
        return arr.astype(np.int32)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits (len(tokens), n_vocab) float32, evaluated from an empty cache. The cache then
        holds these tokens (the previous contents are dropped)."""
        ids = self._check_ids(tokens, "tokens")
        if ids.size == 0:
            raise LowbitError("logits needs at least one token")
        if ids.size > self.n_ctx:
            raise LowbitError(f"{ids.size} tokens do not fit in the context of {self.n_ctx}; "
                              "load the model with a larger n_ctx")
        with self._exclusive():
            core = self._model()
            core.truncate(0)
            return core.eval(ids, all_logits=True)

    # ---- embeddings ---------------------------------------------------------------------------------

    def embed(self, texts: Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]]], pooling: str = "mean",
              normalize: bool = True, add_bos: bool = True) -> np.ndarray:
        """Embeddings from the final hidden states (the output of the last norm, as transformers'
        last_hidden_state and llama.cpp's embeddings): (len(texts), n_embd) float32, or (n_embd,) for one str
        or one list of token ids. pooling: "mean" over the tokens, "last" token or first ("cls") token;
        normalize: scale each vector to unit length. Each text is evaluated on its own from an empty cache."""
        single, inputs = self.embed_inputs(texts, pooling, add_bos)
        with self._exclusive():
            out = embed_in_sequence(self._model(), inputs, pooling, normalize)
        return out[0] if single else out

    def embed_inputs(self, texts: Any, pooling: str, add_bos: bool = True) -> tuple[bool, list[np.ndarray]]:
        """embed()'s inputs checked and tokenized: (one input given, [token ids per input])."""
        if pooling not in ("mean", "last", "cls"):
            raise LowbitError(f"pooling must be 'mean', 'last' or 'cls', got {pooling!r}")
        if not isinstance(texts, (str, list, tuple, np.ndarray)):
            raise LowbitError(f"embed takes a str, a list of str, or token ids, got {type(texts).__name__}")
        single = isinstance(texts, str) or (len(texts) > 0 and all(isinstance(t, (int, np.integer))
                                                                    for t in texts))
        items = [texts] if single else list(texts)
        if not items:
            raise LowbitError("embed needs at least one text")
        inputs = []
        for k, item in enumerate(items):
            if isinstance(item, str):
                ids = np.asarray(self.tokenize(item, add_bos=add_bos), dtype=np.int32)
            elif isinstance(item, (list, tuple, np.ndarray)):
                ids = self._check_ids(item, f"embed input {k}")
            else:
                raise LowbitError(f"embed input {k} must be a str or a list of token ids, got {type(item).__name__}")
            if ids.size == 0:
                raise LowbitError(f"embed: input {k} has no tokens")
            if ids.size > self.n_ctx:
                raise LowbitError(f"embed: input {k} has {ids.size} tokens, more than the context of {self.n_ctx}; "
                                  "shorten it or load the model with a larger n_ctx")
            inputs.append(ids)
        return single, inputs

    # ---- saved state ----------------------------------------------------------------------------------

    def save_state(self, path: Union[str, os.PathLike]) -> None:
        """Write the KV cache and its tokens to a file, so that a long prompt (a system prompt, a document) is
        evaluated once: load_state() on a later run of the same model file puts them back, and generate() then
        reuses them as it reuses its own cache. The file records which model file it belongs to."""
        with self._exclusive():
            core = self._model()
            blob = core.state()
            tokens = np.asarray(core.tokens, dtype="<i4")
        header = json.dumps({"model": self._identity(), "n_past": int(tokens.size)}).encode()
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        try:
            with open(tmp, "wb") as f:
                f.write(_STATE_MAGIC + struct.pack("<QQQ", len(header), tokens.size, len(blob)))
                f.write(header)
                f.write(tokens.tobytes())
                f.write(blob)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_state(self, path: Union[str, os.PathLike]) -> int:
        """Put back a cache written by save_state(); returns the number of tokens it holds. Refuses, with the
        reason and the cache unchanged, a file from a different or changed model file, another KV type, or
        more tokens than this context holds."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise LowbitError(f"cannot read the saved state '{path}': {e.strerror or e}") from None
        head = len(_STATE_MAGIC) + 24
        if len(raw) < head or not raw.startswith(_STATE_MAGIC):
            raise LowbitError(f"'{path}' is not a lowbit saved state")
        n_header, n_tokens, n_blob = struct.unpack("<QQQ", raw[len(_STATE_MAGIC):head])
        if len(raw) != head + n_header + 4 * n_tokens + n_blob:
            raise LowbitError(f"the saved state '{path}' is truncated or has trailing bytes")
        try:
            header = json.loads(raw[head:head + n_header])
        except ValueError:
            raise LowbitError(f"the saved state '{path}' has a damaged header") from None
        saved, mine = header.get("model", {}), self._identity()
        if saved != mine:
            raise LowbitError(f"the saved state '{path}' belongs to another model file ({saved.get('name')!r}, "
                              f"{saved.get('size')} bytes) or to an earlier version of this one ({mine['name']!r}, "
                              f"{mine['size']} bytes); evaluate the prompt again")
        tokens = np.frombuffer(raw, dtype="<i4", count=n_tokens, offset=head + n_header).astype(np.int32)
        blob = raw[head + n_header + 4 * n_tokens:]
        with self._exclusive():
            self._model().set_state(tokens, blob)
        return int(n_tokens)

    def _identity(self) -> dict:
        """What ties a saved state to one model file: its name, size and a digest of its first MiB (the header
        and tensor table), its last 64 KiB and 16 KiB at each of 62 evenly spaced offsets."""
        if self._file_identity is None:
            h = hashlib.sha256()
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                h.update(f.read(1 << 20))
                for k in range(1, 63):
                    f.seek(size * k // 63)
                    h.update(f.read(16 << 10))
                f.seek(max(0, size - (64 << 10)))
                h.update(f.read())
            self._file_identity = {"name": self.path.name, "size": size, "sha256_sampled": h.hexdigest()}
        return self._file_identity

    def reset(self) -> None:
        """Empty the KV cache."""
        with self._exclusive():
            self._model().truncate(0)

    def memory_footprint(self) -> dict[str, Any]:
        """Bytes held: weights (mapped from the file, or owned), kv, scratch; and per device."""
        f = self._model().memory_footprint()
        return {
            "weights": f["weights_mapped"] + f["weights_owned"] + f["weights_gpu"],
            "weights_mapped": f["weights_mapped"],
            "weights_owned": f["weights_owned"],
            "kv": f["kv_cpu"] + f["kv_gpu"],
            "scratch": f["scratch_cpu"] + f["scratch_gpu"],
            "devices": {
                "cpu": {"weights": f["weights_mapped"] + f["weights_owned"], "kv": f["kv_cpu"],
                        "scratch": f["scratch_cpu"]},
                "cuda": {"weights": f["weights_gpu"], "kv": f["kv_gpu"], "scratch": f["scratch_gpu"]},
            },
        }

    # ---- generation ---------------------------------------------------------------------------------

    def generate(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, seed: Optional[int] = None,
                 stop: Union[str, Sequence[str], None] = None, stream: bool = False, repeat_last_n: int = 64,
                 add_bos: bool = True, context_shift: bool = False, n_keep: int = 0,
                 logprobs: Optional[int] = None, json_schema: Union[None, str, Mapping[str, Any]] = None,
                 grammar: Optional[str] = None, regex: Optional[str] = None) -> Union[str, Iterator[str]]:
        """Continue prompt (text, or token ids used as they are). Stops at EOS/EOT, at a stop string (not part
        of the result), after max_new_tokens (-1: no limit), or when the context is full. stream=True returns
        an iterator of text pieces (never half a UTF-8 character, never the start of a stop string).

        Why it stopped is in last_finish_reason afterwards: "stop" (an end-of-generation token or a stop
        string) or "length" (max_new_tokens, or a full context). context_shift=True makes room instead when
        the context fills, as llama.cpp does: the first n_keep tokens (-1: the whole prompt; a BOS is always
        kept) stay, the older half of the rest is dropped and the kept tokens are evaluated again.

        logprobs=n (0-20) records each generated token's log-probability and its n most likely alternatives in
        last_logprobs (a list of TokenLogprob, one per generated token, end token excluded).

        json_schema (a dict or its JSON text), grammar (GBNF as llama.cpp's, or Lark) or regex constrains the
        text token by token (lowbit.constrain; the `structured` extra): it ends when the grammar is complete."""
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n)
        ids, sampler, stops = self._prepare(prompt, max_new_tokens, sampling, seed, stop, add_bos)
        shift = self._shift_keep(ids, context_shift, n_keep)
        n_lp = check_logprobs(logprobs)
        constraint = self._constraint(json_schema, grammar, regex)
        pieces = self._stream(ids, int(max_new_tokens), sampler, int(repeat_last_n), stops, shift, n_lp,
                              constraint)
        if stream:
            return pieces
        return "".join(pieces)

    def generate_tokens(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                        top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                        seed: Optional[int] = None, repeat_last_n: int = 64, add_bos: bool = True,
                        stop_at_eos: bool = True, context_shift: bool = False, n_keep: int = 0,
                        logprobs: Optional[int] = None, json_schema: Union[None, str, Mapping[str, Any]] = None,
                        grammar: Optional[str] = None, regex: Optional[str] = None) -> list[int]:
        """generate(), returning the new token ids (EOS/EOT excluded; stop_at_eos=False samples past them)."""
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n)
        ids, sampler, _ = self._prepare(prompt, max_new_tokens, sampling, seed, None, add_bos)
        shift = self._shift_keep(ids, context_shift, n_keep)
        n_lp = check_logprobs(logprobs)
        constraint = self._constraint(json_schema, grammar, regex)
        with self._exclusive():
            return list(self._tokens(ids, int(max_new_tokens), sampler, int(repeat_last_n), stop_at_eos, shift,
                                     n_lp, constraint))

    def _constraint(self, json_schema: Any, grammar: Any, regex: Any) -> Optional["Constraint"]:
        from .constrain import Constraint, grammar_text

        text = grammar_text(json_schema, grammar, regex)
        return Constraint(self, text) if text is not None else None

    def _shift_keep(self, ids: np.ndarray, context_shift: bool, n_keep: int) -> Optional[int]:
        """Tokens a context shift keeps at the start (None: no shifting)."""
        if not context_shift:
            return None
        if isinstance(n_keep, bool) or not isinstance(n_keep, (int, np.integer)) or n_keep < -1:
            raise LowbitError(f"n_keep must be an integer >= -1 (-1: the whole prompt), got {n_keep!r}")
        keep = ids.size if n_keep == -1 else int(n_keep)
        if self._bos_id is not None and ids.size and int(ids[0]) == self._bos_id and n_keep != -1:
            keep += 1  # the BOS stays, as llama.cpp keeps it
        if keep > self.n_ctx - 4:
            raise LowbitError(f"n_keep={n_keep} keeps {keep} tokens, too many for a context of {self.n_ctx} to shift; "
                              "keep fewer or load the model with a larger n_ctx")
        return keep

    def chat(self, messages: Sequence[Mapping[str, Any]], template_kwargs: Optional[Mapping[str, Any]] = None,
             **gen_kwargs: Any) -> Union[str, Iterator[str]]:
        """Render messages with the file's chat template (see lowbit.chat) and generate the assistant's reply.
        template_kwargs: extra template variables, e.g. {"enable_thinking": False} for Qwen3. Accepts generate()'s
        keyword arguments (stream=True too)."""
        return self.generate(self.chat_ids(messages, template_kwargs), **gen_kwargs)

    def chat_ids(self, messages: Sequence[Mapping[str, Any]],
                 template_kwargs: Optional[Mapping[str, Any]] = None) -> list[int]:
        """The token ids chat() generates from: messages rendered with the file's chat template, tokenized with
        special tokens (and BOS unless the template already writes it)."""
        tok = self.tokenizer
        bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else ""
        eos = tok.tokens[tok.eos_id] if tok.eos_id is not None else ""
        if not self._chat_template and not self._warned_no_template:
            self._warned_no_template = True
            log.warning("%s has no tokenizer.chat_template; formatting the chat as ChatML, which may not be what "
                        "this model was trained on", self.path.name)
        text = render_chat(messages, self._chat_template, bos_token=bos, eos_token=eos,
                           template_kwargs=template_kwargs)
        # A template that writes BOS itself must not get a second one.
        add_bos = not (bos and text.startswith(bos))
        return self.tokenize(text, add_bos=add_bos, special=True)

    def prepare(self, prompt: Prompt, max_new_tokens: int, sampling: SamplingParams, seed: Optional[int],
                stop: Union[str, Sequence[str], None] = None, add_bos: bool = True):
        """(prompt ids, sampler, stop strings) as generate() checks and builds them (for lowbit.batch)."""
        return self._prepare(prompt, max_new_tokens, sampling, seed, stop, add_bos)

    def _prepare(self, prompt: Prompt, max_new_tokens: int, sampling: SamplingParams, seed: Optional[int],
                 stop: Union[str, Sequence[str], None], add_bos: bool):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
            raise LowbitError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if max_new_tokens < -1:
            raise LowbitError(f"max_new_tokens must be >= 0, or -1 for no limit, got {max_new_tokens}")
        if isinstance(prompt, str):
            ids = np.asarray(self.tokenize(prompt, add_bos=add_bos), dtype=np.int32)
        else:
            ids = self._check_ids(prompt, "prompt")
        if ids.size == 0:
            raise LowbitError("the prompt is empty (no tokens); give some text, or add_bos=True")
        if ids.size > self.n_ctx:
            raise LowbitError(f"the prompt has {ids.size} tokens, more than the context of {self.n_ctx}; "
                              "shorten it or load the model with a larger n_ctx")
        if seed is None:
            seed = self._seed_rng.getrandbits(64)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise LowbitError(f"seed must be an integer or None, got {seed!r}")
        sampler = sampling.make_sampler(int(seed) & 0xFFFFFFFFFFFFFFFF)
        if stop is None:
            stops: list[str] = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise LowbitError(f"stop must be a string or a list of strings, got {stop!r}")
        stops = [s for s in stops if s]
        return ids, sampler, stops

    def _acquire(self) -> None:
        me = threading.get_ident()
        if self._owner == me:
            raise LowbitError("this thread is already generating with this model (an unfinished stream?); "
                              "exhaust or close() that iterator first")
        self._lock.acquire()
        self._owner = me

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    class _Exclusive:
        def __init__(self, model: "Model") -> None:
            self.model = model

        def __enter__(self) -> None:
            self.model._acquire()

        def __exit__(self, *exc: Any) -> None:
            self.model._release()

    def _exclusive(self) -> "Model._Exclusive":
        return Model._Exclusive(self)

    def _tokens(self, prompt: np.ndarray, max_new_tokens: int, sampler: "_core.Sampler", window: int,
                stop_at_eos: bool = True, shift_keep: Optional[int] = None,
                logprobs: Optional[int] = None, constraint: Optional["Constraint"] = None) -> Iterator[int]:
        """Evaluate prompt after the longest cached common prefix, then sample and evaluate up to
        max_new_tokens tokens (-1: no limit). Yields each new token id (EOS/EOT are not yielded). A full context
        ends generation, or with shift_keep shifts it (generate's context_shift). Sets last_finish_reason."""
        core = self._model()
        # From the core: generating from token ids never needs the tokenizer (tens of MiB of vocabulary objects).
        eos = frozenset(core.eog_ids) if stop_at_eos else frozenset()
        timings = {"prompt_tokens": 0, "prompt_seconds": 0.0, "reused_tokens": 0, "generated_tokens": 0,
                   "generate_seconds": 0.0, "context_shifts": 0}
        self.last_timings = timings
        self.last_finish_reason = "length"
        self.last_logprobs = [] if logprobs is not None else None
        n_keep = _common_prefix(core.tokens, prompt)
        if n_keep == prompt.size:
            n_keep -= 1  # the last prompt token must be evaluated again to get its logits
        n_keep = core.reusable_prefix(n_keep)  # 0 where sliding-window blocks no longer hold that far back
        core.truncate(n_keep)
        t0 = time.perf_counter()
        logits = core.eval(prompt[n_keep:])
        timings.update(prompt_tokens=int(prompt.size - n_keep), reused_tokens=n_keep,
                       prompt_seconds=time.perf_counter() - t0)
        if max_new_tokens == 0:
            return
        history = [int(t) for t in prompt]  # what the repeat penalty looks back over
        t0 = time.perf_counter()
        i = 0
        while True:
            recent = history if window < 0 else history[-window:] if window else []
            allowed = constraint.mask(logits) if constraint is not None else logits
            token = sampler.sample(allowed, np.asarray(recent, dtype=np.int32))
            if token in eos:
                self.last_finish_reason = "stop"
                break
            if constraint is not None:
                constraint.consume(token)
            i += 1
            timings["generated_tokens"] = i
            if logprobs is not None:
                self.last_logprobs.append(token_logprob(logits, token, logprobs))
            yield token
            history.append(token)
            if constraint is not None and constraint.done:
                self.last_finish_reason = "stop"
                break
            if i == max_new_tokens:
                break
            if core.n_past >= core.n_ctx:
                if shift_keep is None:
                    break
                logits = self._shift_context(core, shift_keep, token)
                timings["context_shifts"] += 1
            else:
                logits = core.eval(np.asarray([token], dtype=np.int32))
            timings["generate_seconds"] = time.perf_counter() - t0
        timings["generate_seconds"] = time.perf_counter() - t0

    @staticmethod
    def _shift_context(core: "_core.Model", keep: int, token: int) -> np.ndarray:
        """A full cache: keep its first `keep` tokens and the newer half of the rest, evaluate again what the
        cache cannot keep in place (positions move), then the new token; returns its logits."""
        cached = core.tokens
        n_discard = (cached.size - keep) // 2
        kept = np.concatenate([cached[:keep], cached[keep + n_discard:], np.asarray([token], dtype=np.int32)])
        reuse = core.reusable_prefix(keep)
        core.truncate(reuse)
        return core.eval(kept[reuse:].astype(np.int32))

    def _stream(self, prompt: np.ndarray, max_new_tokens: int, sampler: "_core.Sampler", window: int,
                stops: list[str], shift_keep: Optional[int] = None,
                logprobs: Optional[int] = None, constraint: Optional["Constraint"] = None) -> Iterator[str]:
        """Text pieces of the generated tokens: held back while they end in an incomplete UTF-8 character or
        in a prefix of a stop string."""
        self._acquire()
        try:
            text = _TextStream(self.tokenizer, stops)
            for token in self._tokens(prompt, max_new_tokens, sampler, window, shift_keep=shift_keep,
                                      logprobs=logprobs, constraint=constraint):
                piece = text.feed(token)
                if piece:
                    yield piece
                if text.stopped:
                    self.last_finish_reason = "stop"
                    return
            piece = text.finish()
            if piece:
                yield piece
        finally:
            self._release()

    # ---- lifetime -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the mapping, the KV cache and the threads. The model cannot be used afterwards."""
        self._core = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<lowbit.Model {self.path.name}: {self._config.n_layer} layers, vocab {self._config.n_vocab}, "
                f"n_ctx {self.n_ctx if self._core else 'closed'}>")


def load(path: Union[str, os.PathLike], n_ctx: int = 0, n_threads: Optional[int] = None, n_gpu_layers: int = 0,
         seed: Optional[int] = None, n_batch: int = 512, kv_f16: bool = False) -> Model:
    """Load a GGUF model. n_ctx 0: the file's context length, at most 4096. n_threads None: a guess from the
    CPU count. n_gpu_layers: transformer blocks to run on the GPU (CUDA builds). seed: seeds the sampler
    of every generate() call that passes no seed of its own. n_batch: prompt tokens evaluated together.
    kv_f16: store the KV cache as fp16 (half the memory)."""
    return Model(path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, seed=seed, n_batch=n_batch,
                 kv_f16=kv_f16)
