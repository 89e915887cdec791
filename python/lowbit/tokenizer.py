"""The tokenizer stored in a GGUF file: HF `tokenizers` from the embedded tokenizer.json, or rebuilt from the vocab."""
from __future__ import annotations

import codecs
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from ._core import END_OF_TURN_TEXTS, LowbitError

log = logging.getLogger("lowbit.tokenizer")

# llama.cpp token types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# End-of-turn tokens of common chat formats; generation stops on these as well as on EOS (the core's list).
_EOT_TEXTS = END_OF_TURN_TEXTS

# Split regexes for tokenizer.ggml.pre values (the pre-tokenizers of the HF tokenizers these files came from).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
           "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# Llama 3's tokenizer.json sets the BPE model's ignore_merges: a pre-token found whole in the vocabulary is one token,
# even where the merges would split it (llama.cpp does the same for these pre values).
_IGNORE_MERGES = frozenset({"llama-bpe", "llama3", "llama-v3"})
# Qwen2's tokenizer.json normalizes to NFC before splitting, so "e" + U+0301 tokenizes like "\u00e9".
_NFC = frozenset({"qwen2"})


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the other 68
    bytes to U+0100 onwards, in byte order (the byte-level BPE spelling)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in byte_alphabet().items()}


@dataclass
class Tokenizer:
    """Encode/decode exactly as the Hugging Face tokenizer the file was made from.

    tok = Tokenizer.from_gguf("model.gguf")
    ids = tok.encode("Hello")                  # BOS added when the file says add_bos_token
    text = tok.decode(ids, skip_special=True)
    """

    hf: Any                                    # tokenizers.Tokenizer
    kind: str                                  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    token_types: list[int]
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: Optional[str] = None
    eot_ids: frozenset = field(default_factory=frozenset)
    add_space_prefix: bool = False             # SentencePiece prepending a space (Llama 2, not Gemma); decode drops it
    _pieces: dict = field(default_factory=dict, repr=False)

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, gguf_file: Union[str, Path, Any], prefer_embedded: bool = True) -> "Tokenizer":
        """From a GGUF path or an open lowbit.GGUFFile. prefer_embedded=False ignores tokenizer.huggingface.json
        and rebuilds the tokenizer from the tokenizer.ggml.* keys (as for files made by llama.cpp)."""
        if isinstance(gguf_file, (str, Path)):
            from .gguf import GGUFFile

            gguf_file = GGUFFile(gguf_file)
        return cls.from_metadata(gguf_file.metadata, prefer_embedded)

    @classmethod
    def from_metadata(cls, md: dict, prefer_embedded: bool = True) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        kind = md.get("tokenizer.ggml.model")
        tokens = list(md.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise LowbitError("the GGUF file has no tokenizer.ggml.tokens; it cannot be tokenized")
        types = list(md.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
        embedded = md.get("tokenizer.huggingface.json")
        # llama.cpp's default for SentencePiece files without the key is True (Llama 2); Gemma files say False.
        space_prefix = kind == "llama" and bool(md.get("tokenizer.ggml.add_space_prefix", True))
        if prefer_embedded and embedded:
            hf = HFTokenizer.from_str(embedded)
        elif kind == "gpt2":
            hf = _build_byte_level(tokens, types, list(md.get("tokenizer.ggml.merges") or []),
                                   md.get("tokenizer.ggml.pre", "default"))
        elif kind == "llama":
            hf = _build_sentencepiece(tokens, types, list(md.get("tokenizer.ggml.scores") or []), space_prefix)
        else:
            raise LowbitError(f"tokenizer.ggml.model={kind!r} is not supported (gpt2 byte-level BPE or llama "
                              f"SentencePiece)")
        bos, eos = md.get("tokenizer.ggml.bos_token_id"), md.get("tokenizer.ggml.eos_token_id")
        add_bos = md.get("tokenizer.ggml.add_bos_token")
        eot = {i for i in (eos, md.get("tokenizer.ggml.eot_token_id"), md.get("tokenizer.ggml.eom_token_id"))
               if i is not None}
        index = {t: i for i, t in enumerate(tokens)}
        eot.update(index[t] for t in _EOT_TEXTS if t in index and types[index[t]] == _CONTROL)
        return cls(hf=hf, kind=kind, tokens=tokens, token_types=types, bos_id=bos, eos_id=eos,
                   add_bos=bool(add_bos) if add_bos is not None else kind == "llama",
                   add_eos=bool(md.get("tokenizer.ggml.add_eos_token", False)),
                   chat_template=md.get("tokenizer.chat_template"), eot_ids=frozenset(eot),
                   add_space_prefix=space_prefix)

    # ---- encode / decode ---------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_bos: Optional[bool] = None, special: bool = True,
               add_eos: Optional[bool] = None) -> list[int]:
        """Token ids of text. add_bos/add_eos: None follows the file's add_bos_token/add_eos_token.
        special=False tokenizes special-token text (e.g. "<|im_end|>") as plain text."""
        self.hf.encode_special_tokens = not special
        try:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        finally:
            self.hf.encode_special_tokens = False
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if (self.add_eos if add_eos is None else add_eos) and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_piece(self, token_id: int) -> bytes:
        """The bytes token_id stands for (a piece of UTF-8 that may end mid-character)."""
        piece = self._pieces.get(token_id)
        if piece is None:
            if not 0 <= token_id < len(self.tokens):
                raise LowbitError(f"token id {token_id} is out of range (vocabulary of {len(self.tokens)})")
            text, ttype = self.tokens[token_id], self.token_types[token_id]
            if ttype in (_CONTROL, _USER_DEFINED, _UNKNOWN, _UNUSED):
                piece = text.encode("utf-8")
            elif self.kind == "gpt2":
                dec = _byte_decoder()
                piece = bytes(dec[c] for c in text) if all(c in dec for c in text) else text.encode("utf-8")
            elif ttype == _BYTE and len(text) == 6 and text.startswith("<0x"):
                piece = bytes([int(text[3:5], 16)])
            else:
                piece = text.replace("\u2581", " ").encode("utf-8")
            self._pieces[token_id] = piece
        return piece

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """The raw bytes of a token sequence (SentencePiece with add_space_prefix: without the leading space of
        the first piece)."""
        out = b"".join(self.token_to_piece(i) for i in ids
                       if not (skip_special and self.token_types[i] == _CONTROL))
        if self.add_space_prefix and out.startswith(b" "):
            out = out[1:]
        return out

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        """Incremental detokenizer: feed ids one at a time, get back only complete UTF-8 text."""
        return StreamDecoder(self, skip_special)

    def is_eog(self, token_id: int) -> bool:
        """True for tokens that end generation (EOS and end-of-turn tokens such as <|im_end|>)."""
        return token_id in self.eot_ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """Render messages with the file's tokenizer.chat_template as transformers' apply_chat_template does
        (lowbit.chat.render_chat). template_kwargs are extra template variables, e.g. enable_thinking=False for
        Qwen3 or date_string for Llama 3.x."""
        if not self.chat_template:
            raise LowbitError("the GGUF file has no tokenizer.chat_template; format the prompt yourself")
        from .chat import render_chat

        bos = self.tokens[self.bos_id] if self.bos_id is not None else ""
        eos = self.tokens[self.eos_id] if self.eos_id is not None else ""
        return render_chat(messages, self.chat_template, bos_token=bos, eos_token=eos,
                           add_generation_prompt=add_generation_prompt, template_kwargs=template_kwargs)


class StreamDecoder:
    """UTF-8 safe streaming: text is released only once its bytes form whole characters."""

    def __init__(self, tok: Tokenizer, skip_special: bool = False):
        self._tok = tok
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True

    def feed(self, token_id: int) -> str:
        if self._skip and self._tok.token_types[token_id] == _CONTROL:
            return ""
        piece = self._tok.token_to_piece(token_id)
        if self._first and self._tok.add_space_prefix and piece.startswith(b" "):
            piece = piece[1:]
        self._first = False
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# ---- rebuilding from tokenizer.ggml.* ----------------------------------------------------------------


def _added(tokens: list[str], types: list[int]):
    """Tokens matched whole before the model runs: control and unknown tokens (special: skipped by
    encode(special=False) and decode(skip_special=True)) and user-defined ones, as llama.cpp's tokenizer does."""
    from tokenizers import AddedToken

    return [AddedToken(t, special=(ty in (_CONTROL, _UNKNOWN)), normalized=False)
            for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN, _USER_DEFINED)]


def _build_byte_level(tokens: list[str], types: list[int], merges: list[str], pre: str):
    """Byte-level BPE from the file's vocabulary and merges, with the pre-tokenizer tokenizer.ggml.pre names."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    spell = byte_alphabet()
    alphabet = set(spell.values())
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        # Normal tokens are stored byte-level spelled; a few writers store raw text, so re-spell those.
        key = t if ty in (_CONTROL, _USER_DEFINED) or set(t) <= alphabet else "".join(
            spell[b] for b in t.encode("utf-8"))
        vocab.setdefault(key, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES))
    if pre in _NFC:
        hf.normalizer = normalizers.NFC()
    split = _SPLITS.get(pre)
    if split is not None:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "smollm":
        # SmolLM's tokenizer.json: every digit is its own pre-token, then GPT-2's split.
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        if pre not in ("gpt-2", "gpt2", "default", None):
            log.warning("tokenizer.ggml.pre=%r is not known to lowbit; using GPT-2's split (tokens may differ "
                        "from the original tokenizer)", pre)
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_tokens(_added(tokens, types))
    return hf


def _build_sentencepiece(tokens: list[str], types: list[int], scores: list[float], add_space_prefix: bool):
    """SentencePiece BPE (llama) as a `tokenizers` BPE with byte fallback: merges ranked by the score of the
    merged piece (higher first), "▁" for spaces, <0xNN> byte tokens for unknown characters."""
    from tokenizers import decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    if len(scores) != len(tokens):
        raise LowbitError("tokenizer.ggml.scores is missing or does not match tokenizer.ggml.tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    # Every split of a normal piece into two pieces of the vocabulary is a merge. For a large vocabulary this loop
    # is most of the load time, hence the bare lookups.
    find = vocab.get
    merges = []
    for t, ty, score in zip(tokens, types, scores):
        if ty != _NORMAL:
            continue
        for k in range(1, len(t)):
            a = find(t[:k])
            if a is not None:
                b = find(t[k:])
                if b is not None:
                    merges.append((-score, a, b))
    merges.sort()
    unk = next((tokens[i] for i, ty in enumerate(types) if ty == _UNKNOWN), None)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(tokens[a], tokens[b]) for _, a, b in merges], unk_token=unk,
                                fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    hf.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if add_space_prefix else steps)
    hf.add_tokens(_added(tokens, types))
    return hf
