"""Test helpers: tokenizer-only checkpoints built the way Llama 3, Qwen2 and Gemma 3 ship theirs, and GGUF files of
their tokenizer.* keys (lowbit's converter), so tokenizers can be compared with transformers and llama.cpp.

    hf_dir = make_byte_level_checkpoint(tmp_path, "qwen2")   # tokenizer.json + tokenizer_config.json + config.json
    hf_dir = make_gemma_checkpoint(tmp_path)                 # tokenizer.model + tokenizer_config.json + config.json
    path = write_tokenizer_gguf(hf_dir, tmp_path / "t.gguf")  # general.architecture + every tokenizer.* key

Everything is trained offline in well under a second (`tokenizers` BpeTrainer, sentencepiece's trainer). The
family facts (split regexes, normalizers, special tokens and their order, tokenizer_config.json keys, Gemma's
SentencePiece trainer settings) are those of the published tokenizer files, written out here independently of
lowbit's code.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tiny_models import TRAINING_TEXT

# The pre-tokenizer regexes of the two byte-level families, as in their tokenizer.json. They differ only in the
# digit rule: Llama 3 groups up to three digits, Qwen2 splits every digit.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# More training text: digit runs, upper-case contractions, CRLF, spaces before newlines, combining marks, scripts
# with marks, code. Joined with TRAINING_TEXT so merges cover these cases too.
EXTRA_TEXT = """\
Call 555-0199 or 5550199; order #12345678 shipped 2024-03-17 at 09:45, total 1234567.89 EUR.
I'M SURE THEY'LL SAY WE'VE DONE IT, BUT YOU'RE RIGHT: HE'D RATHER NOT, AND IT'S LATE. DON'T!
line one\r\nline two\r\n\r\nline four   \nspaces before newline  \n\ttabbed  \t\n
Tie\u0302\u0301ng Vie\u0323\u0302t, Ti\u1ebfng Vi\u1ec7t, \
\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e, \
\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e04\u0e23\u0e31\u0e1a, a\u0308 o\u0308 u\u0308 \u00e4 \u00f6 \u00fc, \
\u1100\u1161\u11a8 \uac01, \uff21\uff22\uff23 \uff11\uff12\uff13.
class Node:\n    def __init__(self, value=None):\n        self.value, self.next = value, None\n
SELECT id, name FROM users WHERE age >= 21 AND name LIKE '%smith%';\n
"""


@dataclass(frozen=True)
class ByteLevelFamily:
    """What a byte-level BPE family's tokenizer files say."""

    name: str
    regex: str
    nfc: bool                      # tokenizer.json normalizer: NFC (Qwen2) or none (Llama 3)
    ignore_merges: bool            # BPE model flag (Llama 3's tokenizer.json sets it)
    specials: tuple[str, ...]      # added special tokens, appended after the trained vocabulary, in this order
    plain_added: tuple[str, ...]   # added tokens that are not special (matched whole, normalized=False)
    bos: Optional[str]
    eos: str
    pad: Optional[str]
    add_bos: bool                  # post-processor puts bos first (Llama 3) or not (Qwen2)
    tokenizer_class: str
    gguf_arch: str                 # general.architecture llama.cpp uses for the family
    gguf_pre: str                  # tokenizer.ggml.pre llama.cpp uses for the family
    architectures: tuple[str, ...]
    model_type: str


FAMILIES = {
    "llama3": ByteLevelFamily(
        name="llama3", regex=LLAMA3_REGEX, nfc=False, ignore_merges=True,
        specials=("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"),
        plain_added=(), bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, add_bos=True,
        tokenizer_class="PreTrainedTokenizerFast", gguf_arch="llama", gguf_pre="llama-bpe",
        architectures=("LlamaForCausalLM",), model_type="llama"),
    "qwen2": ByteLevelFamily(
        name="qwen2", regex=QWEN2_REGEX, nfc=True, ignore_merges=False,
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"),
        plain_added=("<tool_call>", "</tool_call>", "<think>", "</think>"), bos=None, eos="<|im_end|>",
        pad="<|endoftext|>", add_bos=False, tokenizer_class="Qwen2Tokenizer", gguf_arch="qwen2", gguf_pre="qwen2",
        architectures=("Qwen2ForCausalLM",), model_type="qwen2"),
}


def _added_entry(content: str, special: bool) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


@functools.lru_cache(maxsize=None)
def byte_level_tokenizer_json(family: str, vocab: int = 900) -> str:
    """A trained tokenizer.json of the family's shape (cached per process)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    fam = FAMILIES[family]
    tok = Tokenizer(models.BPE(ignore_merges=fam.ignore_merges))
    if fam.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(fam.regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    if fam.regex != LLAMA3_REGEX:
        # Qwen2's vocabulary was inherited from a tokenizer that groups digits (cl100k's split, like Llama 3's),
        # so it holds multi-digit tokens and merges its own split never reaches. Train it the same way.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.train_from_iterator([TRAINING_TEXT, EXTRA_TEXT] * 4, trainer=trainer)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(fam.regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    if fam.ignore_merges:
        # Llama 3's vocabulary (from tiktoken ranks) holds whole pre-tokens that its merges never build;
        # ignore_merges is what makes them reachable. Give this one some, right after the trained tokens (the added
        # tokens come after them, as ids must run on without a gap).
        data = json.loads(tok.to_str())
        vocab_ids = data["model"]["vocab"]
        for word in VOCAB_ONLY_WORDS:
            assert byte_level_spelling(word) not in vocab_ids, word
            vocab_ids[byte_level_spelling(word)] = len(vocab_ids)
        tok = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fam.specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in fam.plain_added])
    level = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if fam.add_bos:
        bos_id = tok.token_to_id(fam.bos)
        tok.post_processor = processors.Sequence([level, processors.TemplateProcessing(
            single=f"{fam.bos}:0 $A:0", pair=f"{fam.bos}:0 $A:0 {fam.bos}:1 $B:1",
            special_tokens=[(fam.bos, bos_id)])])
    else:
        tok.post_processor = level
    return tok.to_str()


# Pre-tokens that are in the Llama 3 test vocabulary without a merge path to them.
VOCAB_ONLY_WORDS = (" zyxwvut", " " * 16, "QQQQ")


def byte_level_spelling(text: str) -> str:
    """GPT-2's printable spelling of text's UTF-8 bytes (byte-level BPE vocabulary keys), from `tokenizers`."""
    from tokenizers import pre_tokenizers

    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    return "".join(p for p, _ in pieces)


def make_byte_level_checkpoint(tmp_path: Path, family: str, chat_template: Optional[str] = None) -> Path:
    """tokenizer.json, tokenizer_config.json (with added_tokens_decoder, as transformers writes it) and a config.json
    naming the family's architecture; returns the directory."""
    from tokenizers import Tokenizer

    fam = FAMILIES[family]
    out = Path(tmp_path) / f"tok-{family}"
    out.mkdir(parents=True, exist_ok=True)
    text = byte_level_tokenizer_json(family)
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    tok = Tokenizer.from_str(text)
    decoder = {str(tok.token_to_id(t)): _added_entry(t, True) for t in fam.specials}
    decoder.update({str(tok.token_to_id(t)): _added_entry(t, False) for t in fam.plain_added})
    cfg: dict[str, Any] = {"added_tokens_decoder": decoder, "bos_token": fam.bos, "eos_token": fam.eos,
                           "clean_up_tokenization_spaces": False, "model_max_length": 131072,
                           "tokenizer_class": fam.tokenizer_class}
    if fam.pad is not None:
        cfg["pad_token"] = fam.pad
    if family == "qwen2":
        cfg.update({"add_prefix_space": False, "errors": "replace", "split_special_tokens": False,
                    "unk_token": None, "add_bos_token": False})
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    n_vocab = tok.get_vocab_size(with_added_tokens=True)
    (out / "config.json").write_text(json.dumps({"architectures": list(fam.architectures),
                                                  "model_type": fam.model_type, "vocab_size": n_vocab}))
    return out


# ---- Gemma (SentencePiece) ---------------------------------------------------------------------------------------

# Gemma's first ids (pad 0, eos 1, bos 2, unk 3, then user-defined pieces in trainer order) and which of them its
# tokenizer_config.json flags special.
GEMMA_CONTROL = ("<pad>", "<eos>", "<bos>")
GEMMA_USER_DEFINED = ("<mask>", "[multimodal]", "<unused0>", "<unused1>", "<start_of_turn>", "<end_of_turn>",
                      "<start_of_image>", "<end_of_image>")
GEMMA_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>",
                 "<start_of_image>", "<end_of_image>")


@dataclass
class GemmaCheckpoint:
    path: Path
    n_vocab: int
    ids: dict[str, int] = field(default_factory=dict)


def train_gemma_spm(prefix: Path, vocab: int = 700, add_dummy_prefix: bool = False) -> Path:
    """A SentencePiece model with Gemma 3's trainer settings; returns the .model path."""
    import sentencepiece as spm

    corpus = prefix.parent.parent / f"{prefix.parent.name}-corpus.txt"   # beside the checkpoint, not in it
    corpus.write_text((TRAINING_TEXT + EXTRA_TEXT) * 3, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab, model_type="bpe", byte_fallback=True,
        character_coverage=0.98, split_digits=True, allow_whitespace_only_pieces=True, split_by_whitespace=True,
        add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=False, normalization_rule_name="identity",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=list(GEMMA_USER_DEFINED), max_sentencepiece_length=16,
        vocabulary_output_piece_score=True, hard_vocab_limit=True, minloglevel=2, num_threads=1)
    return prefix.with_suffix(".model")


def make_gemma_checkpoint(tmp_path: Path, add_dummy_prefix: bool = False, with_tokenizer_json: bool = False,
                          chat_template: Optional[str] = None, name: str = "tok-gemma3") -> GemmaCheckpoint:
    """tokenizer.model + tokenizer_config.json + config.json (model_type gemma3_text), as google/gemma-3-*-it ship
    them; with_tokenizer_json adds the tokenizer.json transformers makes from them (real checkpoints carry one).
    add_dummy_prefix: the proto's normalizer flag (Gemma's own is false; Gemma's Hugging Face tokenizer never adds
    a prefix space either way)."""
    import sentencepiece as spm

    out = Path(tmp_path) / name
    out.mkdir(parents=True, exist_ok=True)
    model = train_gemma_spm(out / "tokenizer", add_dummy_prefix=add_dummy_prefix)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    decoder = {str(ids[t]): _added_entry(t, t in GEMMA_SPECIAL) for t in
               GEMMA_CONTROL + ("<unk>",) + GEMMA_USER_DEFINED}
    cfg: dict[str, Any] = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
                           "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                           "clean_up_tokenization_spaces": False, "model_max_length": 131072,
                           "padding_side": "left", "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
                           "tokenizer_class": "GemmaTokenizer", "use_default_system_prompt": False}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    n_vocab = sp.get_piece_size()
    (out / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
                                                 "vocab_size": n_vocab, "bos_token_id": 2, "eos_token_id": 1,
                                                 "pad_token_id": 0}))
    if with_tokenizer_json:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(out).backend_tokenizer.save(str(out / "tokenizer.json"))
    return GemmaCheckpoint(out, n_vocab, ids)


# ---- GGUF --------------------------------------------------------------------------------------------------------


def write_tokenizer_gguf(hf_dir: Path, out: Path, arch: str, n_vocab: Optional[int] = None) -> Path:
    """A GGUF holding general.architecture and the tokenizer.* keys lowbit's converter writes for hf_dir (no
    tensors: llama.cpp's vocab_only load needs none)."""
    from lowbit.converter.metadata import VT
    from lowbit.converter.vocab import tokenizer_metadata
    from lowbit.gguf import GGUFValueType, GGUFWriter

    if n_vocab is None:
        n_vocab = json.loads((Path(hf_dir) / "config.json").read_text())["vocab_size"]
    writer = GGUFWriter(out)
    writer.add_metadata("general.architecture", arch, GGUFValueType.STRING)
    for kv in tokenizer_metadata(Path(hf_dir), n_vocab):
        if kv.type == VT.ARRAY:
            writer.add_metadata(kv.key, kv.value, GGUFValueType.ARRAY, GGUFValueType(int(kv.elem_type)))
        else:
            writer.add_metadata(kv.key, kv.value, GGUFValueType(int(kv.type)))
    return writer.finish()


def llama_cpp_vocab(path: Path):
    """llama.cpp's tokenizer for a GGUF (llama_cpp.Llama with vocab_only), or pytest.skip when llama_cpp is not
    importable."""
    import pytest

    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama_cpp (llama-cpp-python) is not importable: {e}")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


# ---- strings -----------------------------------------------------------------------------------------------------


def family_hard_strings() -> list[str]:
    """Strings where byte-level families and SentencePiece differ in detail: digit runs of every length, upper-case
    contractions, CRLF and spaces before newlines, letters with combining marks in both normal forms, whitespace
    runs, bytes outside the vocabulary, and special-token text inside ordinary text."""
    import unicodedata

    digits = ["7" * n for n in range(1, 8)] + ["1234567", "x12345y", " 123 4567 ", "3.14159265", "10,000,000",
                                               "\u0661\u0662\u0663\u0664", "\uff11\uff12\uff13\uff14"]
    contractions = ["I'M", "YOU'RE", "WE'VE", "THEY'LL", "SHE'D", "IT'S", "DON'T", "I'm", "You'Re", "'S", "'LL",
                    "O'NEIL'S", "rock'n'roll", "''tis"]
    whitespace = ["a\r\nb", "line\r\n\r\nnext", "trail  \nnext", "tab\t\n", "x \n\n y", "  \r\n", " \n ", "\r",
                  "a \r\n b", "end   ", "\n   \n", "\u2028sep\u2029", "\u00a0\u00a0x", "a" + " " * 9 + "b",
                  "\t\t\t\tx", "  \t  ", "\n" * 5 + "x", "x" + "\r\n" * 3]
    marked = ["Tie\u0302\u0301ng Vie\u0323\u0302t", "Ti\u1ebfng Vi\u1ec7t", "e\u0301cole", "\u00e9cole",
              "\u0928\u092e\u0938\u094d\u0924\u0947", "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
              "a\u0308o\u0308u\u0308", "\u1100\u1161\u11a8", "\uac01", "\u212b", "A\u030a", "\ufb01le",
              "\U0001d400\U0001d401", "\u0645\u064e\u0631\u0652\u062d\u064e\u0628\u064b\u0627"]
    nfd = [unicodedata.normalize("NFD", s) for s in ("caf\u00e9 na\u00efve \u00fcber", "Ti\u1ebfng Vi\u1ec7t",
                                                     "\u00c5ngstr\u00f6m", "\uac00\ub098\ub2e4", "\u1e9b\u0323")]
    other = ["\U0001F600\U0001F44D\U0001F3FD", "\u4f60\u597d\uff0c\u4e16\u754c\uff01", "\U00020000\U0002a6d6",
             "\x00\x01\x7f", "\ufffd", "\U0010ffff", "\u200b\u200c\u200d", "\ue000", "<0x41>", "\u2581x \u2581"]
    return digits + contractions + whitespace + marked + nfd + other
