"""Tokenizer export: tokenizer.json (byte-level BPE) or tokenizer.model (SentencePiece) -> tokenizer.* GGUF keys."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from .._core import LowbitError
from .metadata import KV, VT

log = logging.getLogger("lowbit.convert")

# llama.cpp token types (llama_token_type / gguf TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# End-of-turn tokens of common chat formats; the first present becomes tokenizer.ggml.eot_token_id.
EOT_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(v: Any) -> Optional[str]:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def detect_pre(tok: dict) -> str:
    """tokenizer.ggml.pre for a byte-level BPE tokenizer.json, from the shape of its pre-tokenizer (llama.cpp
    itself hashes a sample encoding; the structure says the same thing for the tokenizers we accept):
      ByteLevel(use_regex)                            -> "gpt-2"
      Sequence[Digits(individual), ByteLevel(regex)] -> "smollm"  (SmolLM / SmolLM2)
      Sequence[Split(Llama-3 regex), ByteLevel]       -> "llama-bpe"
      Sequence[Split(Qwen2 regex), ByteLevel]         -> "qwen2"
    anything else -> "default" (llama.cpp's generic BPE split), with a warning."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = (steps[0].get("pattern") or {}).get("Regex", "")
        if "\\p{N}{1,3}" in pattern and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pattern:
            return "llama-bpe"
        if "\\p{N}" in pattern and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pattern:
            return "qwen2"
    log.warning("unrecognised BPE pre-tokenizer %s; writing tokenizer.ggml.pre='default' (llama.cpp may "
                "split text differently from Hugging Face)", kinds)
    return "default"


def _merges(model: dict) -> list[str]:
    out = []
    for m in model.get("merges") or []:
        out.append(" ".join(m) if isinstance(m, list) else m)
    return out


def _special_ids(hf_dir: Path, vocab: dict[str, int]) -> dict[str, int]:
    """bos/eos/unk/pad ids: tokenizer_config.json, then special_tokens_map.json, then generation_config.json
    and config.json ids."""
    ids: dict[str, int] = {}
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = _read_json(hf_dir / fname)
        for kind in ("bos", "eos", "unk", "pad"):
            text = _token_text(cfg.get(f"{kind}_token"))
            if kind not in ids and text is not None and text in vocab:
                ids[kind] = vocab[text]
    for fname in ("generation_config.json", "config.json"):
        cfg = _read_json(hf_dir / fname)
        for kind in ("bos", "eos", "pad"):
            v = cfg.get(f"{kind}_token_id")
            if isinstance(v, list):
                v = v[0] if v else None
            if kind not in ids and isinstance(v, int) and v >= 0:
                ids[kind] = v
    return ids


def _template_flags(tok: dict, bos: Optional[str], eos: Optional[str]) -> tuple[Optional[bool], Optional[bool]]:
    """add_bos / add_eos as the tokenizer.json post-processor applies them (None: it says nothing)."""
    post = tok.get("post_processor") or {}
    procs = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            pieces = [s.get("SpecialToken", {}).get("id") if "SpecialToken" in s else "$" for s in single]
            return (bool(pieces) and pieces[0] == bos and bos is not None,
                    bool(pieces) and pieces[-1] == eos and eos is not None)
    return None, None


def _chat_templates(hf_dir: Path, tcfg: dict) -> list[KV]:
    tmpl = tcfg.get("chat_template")
    out: list[KV] = []
    if isinstance(tmpl, list):
        for entry in tmpl:
            name, text = entry.get("name"), entry.get("template")
            if name == "default":
                out.append(KV.str("tokenizer.chat_template", text))
            elif name and text:
                out.append(KV.str(f"tokenizer.chat_template.{name}", text))
        return out
    if isinstance(tmpl, str):
        return [KV.str("tokenizer.chat_template", tmpl)]
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return [KV.str("tokenizer.chat_template", jinja.read_text(encoding="utf-8"))]
    cjson = _read_json(hf_dir / "chat_template.json")
    if isinstance(cjson.get("chat_template"), str):
        return [KV.str("tokenizer.chat_template", cjson["chat_template"])]
    return []


def _looks_special(text: str) -> bool:
    """Added tokens that are control tokens even when not flagged special, as llama.cpp's converter treats them:
    <|...|> and DeepSeek's full-width <\uff5c...\uff5c> markers, Gemma's <unusedN>, <mask>, <2mass>, [@BOS@],
    and <pad>."""
    return ((text.startswith("<|") and text.endswith("|>")) or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")) or text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]"))


def _bpe_vocab(hf_dir: Path, tok: dict, n_vocab: int) -> tuple[list[KV], dict[str, int]]:
    model = tok["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in tok.get("added_tokens") or []}
    for i, a in added.items():
        vocab[a["content"]] = i
    size = max(n_vocab, max(vocab.values()) + 1)
    if size > n_vocab:
        raise LowbitError(f"{hf_dir}: tokenizer has {size} tokens but config.json vocab_size is {n_vocab}; "
                          f"the embedding cannot cover them")
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        if i in added:
            a = added[i]
            tokens.append(a["content"])
            types.append(CONTROL if a.get("special") or _looks_special(a["content"]) else USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(NORMAL)
        else:
            # Embedding rows the tokenizer never produces (vocab padded for the matmul): placeholders.
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    kvs = [
        KV.str("tokenizer.ggml.model", "gpt2"),
        KV.str("tokenizer.ggml.pre", detect_pre(tok)),
        KV.arr("tokenizer.ggml.tokens", tokens, VT.STRING),
        KV.arr("tokenizer.ggml.token_type", types, VT.INT32),
        KV.arr("tokenizer.ggml.merges", _merges(model), VT.STRING),
    ]
    return kvs, vocab


def _spm_proto(path: Path):
    """The tokenizer.model's ModelProto (piece types, normalizer flags), or None where protobuf is missing."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        log.warning("protobuf is not installed: SentencePiece user-defined pieces are written as normal tokens; "
                    "pip install protobuf for exact token types")
        return None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _is_gemma(hf_dir: Path, tcfg: dict) -> bool:
    cfg = _read_json(hf_dir / "config.json")
    arches = cfg.get("architectures") or []
    return (str(tcfg.get("tokenizer_class") or "").startswith("Gemma")
            or str(cfg.get("model_type") or "").startswith("gemma")
            or any(str(a).startswith("Gemma") for a in arches))


def _add_space_prefix(hf_dir: Path, tcfg: dict, proto) -> bool:
    """tokenizer.ggml.add_space_prefix: tokenizer_config.json's add_prefix_space where it says; False for Gemma (its
    Hugging Face tokenizer never prepends a space, whatever the proto says; llama.cpp's Gemma converters write
    False); otherwise the proto's add_dummy_prefix, as sentencepiece itself does."""
    flag = tcfg.get("add_prefix_space")
    if isinstance(flag, bool):
        return flag
    if _is_gemma(hf_dir, tcfg):
        return False
    return bool(proto.normalizer_spec.add_dummy_prefix) if proto is not None else True


def _spm_vocab(hf_dir: Path, n_vocab: int, tcfg: dict) -> tuple[list[KV], dict[str, int]]:
    import sentencepiece as spm

    model_path = hf_dir / "tokenizer.model"
    proto = _spm_proto(model_path)
    proc = spm.SentencePieceProcessor()
    proc.LoadFromFile(str(model_path))
    tokens, scores, types = [], [], []
    for i in range(proc.vocab_size()):
        tokens.append(proc.IdToPiece(i))
        scores.append(proc.GetScore(i))
        if proto is not None:
            # The proto's piece types use llama.cpp's numbering (NORMAL 1 ... BYTE 6), USER_DEFINED included.
            types.append(int(proto.pieces[i].type))
        else:
            types.append(UNKNOWN if proc.IsUnknown(i) else CONTROL if proc.IsControl(i) else
                         UNUSED if proc.IsUnused(i) else BYTE if proc.IsByte(i) else NORMAL)

    def put(i: int, text: str, ttype: int) -> None:
        while len(tokens) <= i:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(UNUSED)
        if types[i] in (UNKNOWN, BYTE):
            return  # the proto's own unknown and byte pieces keep their meaning
        tokens[i] = text
        scores[i] = -1000.0
        types[i] = ttype

    # Added tokens, as llama.cpp's converter reads them: added_tokens.json (user-defined), tokenizer.json's
    # added_tokens and tokenizer_config.json's added_tokens_decoder (control when flagged special or spelled like a
    # control token). These may retype pieces of the proto itself: Gemma's <start_of_turn> is a user-defined piece
    # there and a special token in tokenizer_config.json.
    for text, i in sorted(_read_json(hf_dir / "added_tokens.json").items(), key=lambda kv: kv[1]):
        if isinstance(i, int):
            put(i, text, CONTROL if _looks_special(text) else USER_DEFINED)
    entries = [(a.get("id"), a) for a in _read_json(hf_dir / "tokenizer.json").get("added_tokens") or []]
    entries += [(int(k), a) for k, a in (tcfg.get("added_tokens_decoder") or {}).items() if str(k).isdigit()]
    for i, a in entries:
        text = a.get("content") if isinstance(a, dict) else None
        if isinstance(i, int) and isinstance(text, str):
            put(i, text, CONTROL if a.get("special") or _looks_special(text) else USER_DEFINED)
    if len(tokens) > n_vocab:
        raise LowbitError(f"{hf_dir}: tokenizer has {len(tokens)} tokens but config.json vocab_size is {n_vocab}")
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    vocab = {t: i for i, t in enumerate(tokens)}
    kvs = [
        KV.str("tokenizer.ggml.model", "llama"),
        KV.str("tokenizer.ggml.pre", "default"),
        KV.arr("tokenizer.ggml.tokens", tokens, VT.STRING),
        KV.arr("tokenizer.ggml.scores", scores, VT.FLOAT32),
        KV.arr("tokenizer.ggml.token_type", types, VT.INT32),
        KV.bool("tokenizer.ggml.add_space_prefix", _add_space_prefix(hf_dir, tcfg, proto)),
    ]
    return kvs, vocab


def tokenizer_metadata(hf_dir: Path, n_vocab: int) -> list[KV]:
    """Every tokenizer.* key for the checkpoint in hf_dir (n_vocab: config.json vocab_size)."""
    tok_path = hf_dir / "tokenizer.json"
    tok = _read_json(tok_path)
    tcfg = _read_json(hf_dir / "tokenizer_config.json")
    model_type = (tok.get("model") or {}).get("type")
    has_spm = (hf_dir / "tokenizer.model").is_file()
    if tok and model_type == "BPE" and not (tok["model"].get("byte_fallback") and has_spm):
        if tok["model"].get("byte_fallback"):
            raise LowbitError(f"{tok_path}: a SentencePiece-style BPE (byte_fallback) without tokenizer.model is "
                              f"not supported; add the checkpoint's tokenizer.model")
        kvs, vocab = _bpe_vocab(hf_dir, tok, n_vocab)
        default_bos = False
    elif has_spm:
        kvs, vocab = _spm_vocab(hf_dir, n_vocab, tcfg)
        default_bos = True
    elif tok:
        raise LowbitError(f"{tok_path}: tokenizer model {model_type!r} is not supported (byte-level BPE "
                          f"tokenizer.json or SentencePiece tokenizer.model)")
    else:
        raise LowbitError(f"{hf_dir}: no tokenizer.json or tokenizer.model; the GGUF needs the tokenizer")

    ids = _special_ids(hf_dir, vocab)
    for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        if kind in ids:
            kvs.append(KV.u32(f"tokenizer.ggml.{key}", ids[kind]))
    for text in EOT_TOKENS:
        if text in vocab:
            kvs.append(KV.u32("tokenizer.ggml.eot_token_id", vocab[text]))
            break

    by_id = {i: t for t, i in vocab.items()}
    tpl_bos, tpl_eos = _template_flags(tok, by_id.get(ids.get("bos", -1)), by_id.get(ids.get("eos", -1)))
    add_bos = tcfg.get("add_bos_token")
    add_bos = add_bos if isinstance(add_bos, bool) else tpl_bos if tpl_bos is not None else default_bos
    add_eos = tcfg.get("add_eos_token")
    add_eos = add_eos if isinstance(add_eos, bool) else bool(tpl_eos)
    kvs.append(KV.bool("tokenizer.ggml.add_bos_token", add_bos))
    kvs.append(KV.bool("tokenizer.ggml.add_eos_token", add_eos))
    kvs.extend(_chat_templates(hf_dir, tcfg))
    if tok:
        kvs.append(KV.str("tokenizer.huggingface.json", tok_path.read_text(encoding="utf-8")))
    return kvs
