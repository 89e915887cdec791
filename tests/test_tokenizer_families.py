"""Tokenizers of three model families (Llama 3 and Qwen2 byte-level BPE, Gemma 3 SentencePiece) and the chat templates
of Qwen2.5, Qwen3, Llama 3.x and Gemma 3: lowbit against transformers, tokenizers, sentencepiece and llama.cpp.

Each family's tokenizer is trained here, shaped like the published tokenizer files (tiny_tokenizers), converted by
lowbit's converter into a GGUF holding only the tokenizer.* keys, and read back by lowbit both ways: from the embedded
tokenizer.json and rebuilt from the tokenizer.ggml.* keys (as for files llama.cpp made). llama.cpp reads the same
file with vocab_only.
"""
from __future__ import annotations

import datetime
import unicodedata
from pathlib import Path

import pytest

from lowbit.chat import TemplateError, render_chat
from lowbit.gguf import GGUFFile
from lowbit.tokenizer import Tokenizer
from tiny_models import tokenizer_test_strings
from tiny_tokenizers import (FAMILIES, GEMMA_SPECIAL, GEMMA_USER_DEFINED, VOCAB_ONLY_WORDS, family_hard_strings,
                             llama_cpp_vocab, make_byte_level_checkpoint, make_gemma_checkpoint,
                             write_tokenizer_gguf)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


def _special_text(family: str) -> list[str]:
    """Special-token text inside ordinary text, for each family's markers."""
    if family == "llama3":
        return ["<|begin_of_text|>Hi<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>",
                "x<|python_tag|>y", "<|eot_id|><|eot_id|>", "<|eot_id", "< |eot_id| >", "a <|eom_id|> b"]
    if family == "qwen2":
        return ["<|im_start|>user\nHi<|im_end|>\n", "<think>\nhmm\n</think>\n\nyes", "a<tool_call>{}</tool_call>b",
                "<|endoftext|><|im_end|>", "<|im_start", "x <|fim_prefix|> y", " <think> "]
    return ["<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n", "<unk>x<pad>", "a<mask>b",
            "<eos><bos>", "<start_of_turn", " <end_of_turn> ", "[multimodal]<unused0>"]


def _strings(family: str) -> list[str]:
    out = tokenizer_test_strings() + family_hard_strings() + _special_text(family)
    if family == "llama3":
        out += list(VOCAB_ONLY_WORDS) + ["a zyxwvut b", "end" + " " * 16, "QQQQQ"]
    return out


# ---- byte-level BPE: Llama 3 and Qwen2 --------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def byte_level(request, tmp_path_factory):
    """(family, checkpoint dir, GGUF path)."""
    family = request.param
    tmp = tmp_path_factory.mktemp(f"fam-{family}")
    hf_dir = make_byte_level_checkpoint(tmp, family)
    return family, hf_dir, write_tokenizer_gguf(hf_dir, tmp / "tok.gguf", FAMILIES[family].gguf_arch)


def test_byte_level_metadata(byte_level):
    """The converter writes llama.cpp's tokenizer.ggml.pre for the family, the vocabulary and merges by id, control
    types for special tokens and user-defined for plain added ones, and BOS as the post-processor adds it."""
    import json

    from tokenizers import Tokenizer as HFTokenizer

    family, hf_dir, path = byte_level
    fam = FAMILIES[family]
    md = GGUFFile(path).metadata
    ref = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert md["tokenizer.ggml.model"] == "gpt2"
    assert md["tokenizer.ggml.pre"] == fam.gguf_pre
    n = ref.get_vocab_size(with_added_tokens=True)
    assert md["tokenizer.ggml.tokens"] == [ref.id_to_token(i) for i in range(n)]
    model = json.loads((hf_dir / "tokenizer.json").read_text())["model"]
    assert md["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    want = [NORMAL] * n
    for t in fam.specials:
        want[ref.token_to_id(t)] = CONTROL
    for t in fam.plain_added:
        want[ref.token_to_id(t)] = USER_DEFINED
    assert md["tokenizer.ggml.token_type"] == want
    assert md.get("tokenizer.ggml.bos_token_id") == (ref.token_to_id(fam.bos) if fam.bos else None)
    assert md["tokenizer.ggml.eos_token_id"] == ref.token_to_id(fam.eos)
    assert md["tokenizer.ggml.add_bos_token"] is fam.add_bos


@pytest.mark.parametrize("embedded", [True, False], ids=["embedded-json", "rebuilt-from-ggml"])
def test_byte_level_ids_equal_hf(byte_level, embedded):
    """Same ids as tokenizers and transformers on every string, BOS as the checkpoint adds it; decoding gives the
    (normalized) text back, and its bytes."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    family, hf_dir, path = byte_level
    fam = FAMILIES[family]
    ref = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(hf_dir)
    tok = Tokenizer.from_gguf(path, prefer_embedded=embedded)
    assert tok.add_bos is fam.add_bos
    for s in _strings(family):
        ids = tok.encode(s, add_bos=False)
        assert ids == ref.encode(s, add_special_tokens=False).ids, s
        assert ids == auto(s, add_special_tokens=False).input_ids, s
        assert tok.encode(s) == auto(s).input_ids, s
        text = unicodedata.normalize("NFC", s) if fam.nfc else s
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False) == text, s
        assert tok.decode(ids, skip_special=True) == auto.decode(ids, skip_special_tokens=True), s
        assert tok.decode_bytes(ids) == text.encode("utf-8"), s


@pytest.mark.parametrize("embedded", [True, False], ids=["embedded-json", "rebuilt-from-ggml"])
def test_byte_level_special_false(byte_level, embedded):
    """special=False: special-token text is ordinary text (split_special_tokens in transformers); plain added tokens
    such as <tool_call> stay whole."""
    from transformers import AutoTokenizer

    family, hf_dir, path = byte_level
    auto = AutoTokenizer.from_pretrained(hf_dir, split_special_tokens=True)
    tok = Tokenizer.from_gguf(path, prefer_embedded=embedded)
    for s in _special_text(family):
        assert tok.encode(s, add_bos=False, special=False) == auto(s, add_special_tokens=False).input_ids, s


def test_byte_level_equals_llama_cpp(byte_level):
    """llama.cpp's tokenizer on the same file gives the same ids (BOS by the file's flag, special tokens parsed or
    not) and the same bytes back. llama.cpp does not apply Qwen2's NFC normalizer, so for Qwen2 the strings that NFC
    changes are compared in their NFC form (lowbit == transformers on the raw form is proven above)."""
    family, _, path = byte_level
    fam = FAMILIES[family]
    llama = llama_cpp_vocab(path)
    tok = Tokenizer.from_gguf(path, prefer_embedded=False)
    compared = 0
    for s in _strings(family):
        if fam.nfc:
            s = unicodedata.normalize("NFC", s)
        raw = s.encode("utf-8")
        ids = tok.encode(s)
        assert llama.tokenize(raw, add_bos=True, special=True) == ids, s
        assert llama.tokenize(raw, add_bos=False, special=False) == tok.encode(s, add_bos=False, special=False), s
        assert llama.detokenize(ids, special=True) == tok.decode_bytes(ids), s
        compared += 1
    assert compared >= 250


def test_qwen2_nfc(byte_level):
    """Qwen2 tokenizes decomposed text as its composed form (NFC normalizer); Llama 3 does not normalize."""
    family, hf_dir, path = byte_level
    for embedded in (True, False):
        tok = Tokenizer.from_gguf(path, prefer_embedded=embedded)
        for s in ("e\u0301cole", "Tie\u0302\u0301ng Vie\u0323\u0302t", "\u212b", "\u1100\u1161\u11a8"):
            composed = unicodedata.normalize("NFC", s)
            assert composed != s
            assert (tok.encode(s) == tok.encode(composed)) is FAMILIES[family].nfc, s


def test_wrong_split_is_detected(byte_level):
    """The strings tell the two families apart: the other family's pre-tokenizer (tokenizer.ggml.pre) gives ids
    different from the checkpoint's tokenizer, digit runs among them. Guards the tests above against strings too
    easy to notice a swapped regex."""
    from tokenizers import Tokenizer as HFTokenizer

    family, hf_dir, path = byte_level
    ref = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    md = dict(GGUFFile(path).metadata)
    md["tokenizer.ggml.pre"] = FAMILIES["qwen2" if family == "llama3" else "llama3"].gguf_pre
    wrong = Tokenizer.from_metadata(md, prefer_embedded=False)
    differs = {s for s in _strings(family)
               if wrong.encode(s, add_bos=False) != ref.encode(s, add_special_tokens=False).ids}
    assert {"1234567", "12345678901234567890", "x12345y"} <= differs


# ---- SentencePiece: Gemma 3 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(checkpoint, GGUF of tokenizer.model + tokenizer_config.json, GGUF of the same with tokenizer.json)."""
    tmp = tmp_path_factory.mktemp("fam-gemma")
    plain = make_gemma_checkpoint(tmp, name="gemma-spm")
    with_json = make_gemma_checkpoint(tmp, with_tokenizer_json=True, name="gemma-json")
    return (plain, write_tokenizer_gguf(plain.path, tmp / "spm.gguf", "gemma3"),
            write_tokenizer_gguf(with_json.path, tmp / "json.gguf", "gemma3"))


def test_gemma_metadata(gemma):
    """llama's SentencePiece keys as llama.cpp's Gemma 3 converter writes them: add_space_prefix false, pieces and
    scores of the model, BYTE for the 256 <0xNN> pieces, UNKNOWN for <unk>, CONTROL for the special tokens (Gemma's
    <start_of_turn>/<end_of_turn> are user-defined pieces in the proto, special in tokenizer_config.json)."""
    import sentencepiece as spm

    ckpt, path, json_path = gemma
    sp = spm.SentencePieceProcessor(model_file=str(ckpt.path / "tokenizer.model"))
    md = GGUFFile(path).metadata
    assert md["tokenizer.ggml.model"] == "llama"
    assert md["tokenizer.ggml.add_space_prefix"] is False
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_eos_token"] is False
    assert [md[f"tokenizer.ggml.{k}_token_id"] for k in ("padding", "eos", "bos", "unknown")] == [0, 1, 2, 3]
    assert md["tokenizer.ggml.eot_token_id"] == sp.piece_to_id("<end_of_turn>")
    n = sp.get_piece_size()
    assert md["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    types, scores = md["tokenizer.ggml.token_type"], md["tokenizer.ggml.scores"]
    for i in range(n):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            assert types[i] == BYTE and piece == f"<0x{i - sp.piece_to_id('<0x00>'):02X}>", piece
        elif sp.is_unknown(i):
            assert types[i] == UNKNOWN, piece
        elif piece in GEMMA_SPECIAL or piece.startswith("<unused"):
            assert types[i] == CONTROL, piece
        else:
            assert types[i] == NORMAL, piece
        # llama.cpp's converter scores the tokens of added_tokens_decoder -1000 (the unknown piece keeps its own).
        listed = piece in GEMMA_SPECIAL + GEMMA_USER_DEFINED and not sp.is_unknown(i)
        assert scores[i] == pytest.approx(-1000.0 if listed else sp.get_score(i)), piece
    assert sum(t == BYTE for t in types) == 256
    # With the checkpoint's tokenizer.json present, the same keys plus the embedded JSON.
    md_json = GGUFFile(json_path).metadata
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.add_space_prefix"):
        assert md_json[key] == md[key], key
    assert "tokenizer.huggingface.json" in md_json and "tokenizer.huggingface.json" not in md


@pytest.mark.parametrize("source", ["tokenizer-model", "embedded-json", "json-file-rebuilt"])
def test_gemma_ids_equal_hf(gemma, source):
    """Same ids as transformers' GemmaTokenizer (BOS first, as Gemma adds it) on every string: whitespace runs,
    newlines, bytes outside the vocabulary (byte fallback), emoji, CJK, special-token text; decoding gives the text
    back (skipping control tokens as transformers does) and its bytes."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    ckpt, path, json_path = gemma
    auto = AutoTokenizer.from_pretrained(ckpt.path)
    sp = spm.SentencePieceProcessor(model_file=str(ckpt.path / "tokenizer.model"))
    tok = Tokenizer.from_gguf(json_path if source != "tokenizer-model" else path,
                              prefer_embedded=source == "embedded-json")
    assert tok.add_bos and not tok.add_space_prefix
    specials = ("<unk>", "<pad>", "<eos>", "<bos>", "[multimodal]", "<unused")
    for s in _strings("gemma"):
        ids = tok.encode(s)
        assert ids == auto(s).input_ids, s
        assert ids[0] == 2
        if not any(m in s for m in specials):
            assert ids[1:] == sp.encode(s), s   # sentencepiece itself (it leaves control-token text alone)
        if "<unused" not in s:
            # <unusedN> is not special to transformers but is a control token to llama.cpp's converter (and so to
            # lowbit's), which skip_special then drops.
            assert tok.decode(ids, skip_special=True) == auto.decode(ids, skip_special_tokens=True), s
        text = s.replace("\u2581", " ")   # SentencePiece's space mark decodes as a space
        assert tok.decode(ids[1:]) == auto.decode(ids[1:]) == text, s
        assert tok.decode_bytes(ids[1:]) == text.encode("utf-8"), s


def test_gemma_equals_llama_cpp(gemma):
    """llama.cpp (general.architecture gemma3, vocab_only) on the same file: same ids, with and without special
    parsing, and the same bytes back."""
    _, path, _ = gemma
    llama = llama_cpp_vocab(path)
    tok = Tokenizer.from_gguf(path)
    for s in _strings("gemma"):
        raw = s.encode("utf-8")
        ids = tok.encode(s)
        assert llama.tokenize(raw, add_bos=True, special=True) == ids, s
        assert llama.tokenize(raw, add_bos=False, special=False) == tok.encode(s, add_bos=False, special=False), s
        assert llama.detokenize(ids[1:], special=True) == tok.decode_bytes(ids[1:]), s


def test_gemma_turn_markers(gemma):
    """A Gemma chat turn parses to the control ids; special=False reads the same markers as text."""
    ckpt, path, _ = gemma
    sot, eot = ckpt.ids["<start_of_turn>"], ckpt.ids["<end_of_turn>"]
    for embedded in (True, False):
        tok = Tokenizer.from_gguf(path, prefer_embedded=embedded)
        turn = "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
        ids = tok.encode(turn)
        body = tok.encode("user\nWhat is 2+2?", add_bos=False)
        assert ids[:2 + len(body)] == [2, sot] + body
        assert ids[2 + len(body)] == eot and ids.count(sot) == 2 and ids.count(eot) == 1
        assert tok.is_eog(eot) and tok.is_eog(1)
        plain = tok.encode(turn, special=False)
        assert sot not in plain and eot not in plain
        assert tok.decode(plain[1:]) == turn
        assert tok.decode(ids, skip_special=True) == "user\nWhat is 2+2?\nmodel\n"


def test_gemma_prefix_space_follows_hf_not_proto(tmp_path):
    """A Gemma proto with add_dummy_prefix true: Gemma's Hugging Face tokenizer still adds no space, and so do the
    converted file, lowbit and llama.cpp."""
    from transformers import AutoTokenizer

    ckpt = make_gemma_checkpoint(tmp_path, add_dummy_prefix=True, name="gemma-prefix")
    path = write_tokenizer_gguf(ckpt.path, tmp_path / "t.gguf", "gemma3")
    assert GGUFFile(path).metadata["tokenizer.ggml.add_space_prefix"] is False
    auto = AutoTokenizer.from_pretrained(ckpt.path)
    tok = Tokenizer.from_gguf(path)
    llama = llama_cpp_vocab(path)
    for s in ["the sea", " the sea", "Hello", "\n", "  x"]:
        assert tok.encode(s) == auto(s).input_ids == llama.tokenize(s.encode(), add_bos=True, special=True), s


def test_gemma_user_defined_pieces_from_the_proto(tmp_path):
    """Without added_tokens_decoder in tokenizer_config.json, the proto's user-defined pieces (<start_of_turn>, ...)
    are still matched whole: USER_DEFINED in the file, as transformers and sentencepiece treat them."""
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    ckpt = make_gemma_checkpoint(tmp_path, name="gemma-bare-config")
    cfg_path = ckpt.path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["added_tokens_decoder"]
    cfg_path.write_text(json.dumps(cfg))
    path = write_tokenizer_gguf(ckpt.path, tmp_path / "t.gguf", "gemma3")
    types = GGUFFile(path).metadata["tokenizer.ggml.token_type"]
    assert [types[ckpt.ids[t]] for t in GEMMA_USER_DEFINED] == [USER_DEFINED] * len(GEMMA_USER_DEFINED)
    sp = spm.SentencePieceProcessor(model_file=str(ckpt.path / "tokenizer.model"))
    auto = AutoTokenizer.from_pretrained(ckpt.path)
    tok = Tokenizer.from_gguf(path)
    for s in _special_text("gemma") + ["x<start_of_turn>y", "<end_of_turn><end_of_turn>"]:
        if any(m in s for m in ("<unk>", "<pad>", "<eos>", "<bos>")):
            continue   # control pieces: sentencepiece reads their text as text
        assert tok.encode(s) == auto(s).input_ids == [2] + sp.encode(s), s


# ---- chat templates ---------------------------------------------------------------------------------------------

SYSTEM_CHAT = [{"role": "system", "content": "You are terse.  "},
               {"role": "user", "content": "  What is 2+2?\n"},
               {"role": "assistant", "content": "4"},
               {"role": "user", "content": "And 3+3? <b>bold</b> & \"quotes\""}]
NO_SYSTEM_CHAT = SYSTEM_CHAT[1:]
ONE_TURN = [{"role": "user", "content": "Hi"}]
THINKING_CHAT = [{"role": "user", "content": "2+2?"},
                 {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
                 {"role": "user", "content": "3+3?"}]

# template file -> tokenizer family whose special tokens it uses.
TEMPLATE_FAMILIES = {"Qwen-Qwen2.5-7B-Instruct.jinja": "qwen2", "Qwen-Qwen3-0.6B.jinja": "qwen2",
                     "meta-llama-Llama-3.1-8B-Instruct.jinja": "llama3",
                     "meta-llama-Llama-3.2-3B-Instruct.jinja": "llama3", "google-gemma-3-it.jinja": "gemma"}


def _cases(name: str) -> list[tuple[str, list, dict]]:
    chats = [("system", SYSTEM_CHAT), ("no-system", NO_SYSTEM_CHAT), ("one-turn", ONE_TURN)]
    extras: list[dict] = [{}]
    if "Qwen3" in name:
        chats.append(("thinking", THINKING_CHAT))
        extras += [{"enable_thinking": False}, {"enable_thinking": True}]
    if "Llama-3" in name:
        extras.append({"date_string": "01 Feb 2025"})
    return [(label, chat, extra) for label, chat in chats for extra in extras]


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory):
    """A transformers tokenizer per family (PreTrainedTokenizerFast around the family's tokenizer)."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    tmp = tmp_path_factory.mktemp("templates")
    out = {}
    for family, fam in FAMILIES.items():
        hf_dir = make_byte_level_checkpoint(tmp, family)
        out[family] = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_file(str(hf_dir / "tokenizer.json")),
                                              bos_token=fam.bos, eos_token=fam.eos)
    gemma = make_gemma_checkpoint(tmp, with_tokenizer_json=True, name="gemma-templates")
    out["gemma"] = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_file(str(gemma.path / "tokenizer.json")),
                                           bos_token="<bos>", eos_token="<eos>")
    return out


def _render_both(hf, template: str, chat: list, generation: bool, extra: dict) -> tuple[str, str]:
    """(lowbit, transformers) renderings; rendered again if the date changed in between (templates that print
    today's date)."""
    for _ in range(2):
        day = datetime.date.today()
        ours = render_chat(chat, template, bos_token=hf.bos_token or "", eos_token=hf.eos_token or "",
                           add_generation_prompt=generation, template_kwargs=extra)
        theirs = hf.apply_chat_template(chat, chat_template=template, tokenize=False,
                                        add_generation_prompt=generation, **extra)
        if datetime.date.today() == day:
            break
    return ours, theirs


@pytest.mark.parametrize("name", sorted(TEMPLATE_FAMILIES))
def test_chat_template_equals_transformers(hf_tokenizers, name):
    """lowbit.chat renders each published template exactly as transformers' apply_chat_template: with and without
    a system message, one turn, with and without the generation prompt, and each template's own variables
    (Qwen3's enable_thinking, Llama 3.x's date_string; without it Llama 3.2 prints today's date)."""
    template = (TEMPLATES / name).read_text(encoding="utf-8")
    hf = hf_tokenizers[TEMPLATE_FAMILIES[name]]
    seen = set()
    for label, chat, extra in _cases(name):
        for generation in (True, False):
            ours, theirs = _render_both(hf, template, chat, generation, extra)
            assert ours == theirs, (label, extra, generation)
            seen.add(ours)
    assert len(seen) >= 6   # the cases render differently: the comparison is not of one string


def test_qwen3_enable_thinking_changes_the_prompt(hf_tokenizers):
    """enable_thinking=False reaches the template: Qwen3 then opens an empty think block after the generation
    prompt, as transformers renders it."""
    template = (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text(encoding="utf-8")
    plain = render_chat(ONE_TURN, template)
    off = render_chat(ONE_TURN, template, template_kwargs={"enable_thinking": False})
    assert off != plain and off.startswith(plain)
    assert off == hf_tokenizers["qwen2"].apply_chat_template(ONE_TURN, chat_template=template, tokenize=False,
                                                            add_generation_prompt=True, enable_thinking=False)


def test_gemma_template_refuses_what_transformers_refuses(hf_tokenizers):
    """Gemma 3's template raises on roles that do not alternate; lowbit raises TemplateError where transformers
    raises."""
    import jinja2

    template = (TEMPLATES / "google-gemma-3-it.jinja").read_text(encoding="utf-8")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError):
        hf_tokenizers["gemma"].apply_chat_template(bad, chat_template=template, tokenize=False)
    with pytest.raises(TemplateError, match="alternate"):
        render_chat(bad, template, bos_token="<bos>")


@pytest.mark.parametrize("family", ["qwen2", "llama3", "gemma"])
def test_chat_template_through_the_gguf(tmp_path, family):
    """The template travels with the checkpoint: the converter stores it, and Tokenizer.apply_chat_template on the
    GGUF (the file's BOS/EOS text) renders what transformers renders from the checkpoint directory; the rendered
    prompt tokenizes to transformers' ids."""
    from transformers import AutoTokenizer

    name = {"qwen2": "Qwen-Qwen3-0.6B.jinja", "llama3": "meta-llama-Llama-3.2-3B-Instruct.jinja",
            "gemma": "google-gemma-3-it.jinja"}[family]
    template = (TEMPLATES / name).read_text(encoding="utf-8")
    if family == "gemma":
        hf_dir = make_gemma_checkpoint(tmp_path, chat_template=template, name="gemma-chat").path
        arch = "gemma3"
    else:
        hf_dir = make_byte_level_checkpoint(tmp_path, family, chat_template=template)
        arch = FAMILIES[family].gguf_arch
    path = write_tokenizer_gguf(hf_dir, tmp_path / "t.gguf", arch)
    tok = Tokenizer.from_gguf(path)
    auto = AutoTokenizer.from_pretrained(hf_dir)
    assert tok.chat_template == template
    extra = {"date_string": "01 Feb 2025"} if family == "llama3" else {"enable_thinking": False}
    for chat in (SYSTEM_CHAT, ONE_TURN):
        text = tok.apply_chat_template(chat, **extra)
        assert text == auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **extra)
        # The template writes BOS itself where the model has one, so no second BOS.
        assert tok.encode(text, add_bos=False) == auto(text, add_special_tokens=False).input_ids


def test_template_environment_equals_transformers(hf_tokenizers):
    """The pieces of transformers' template environment that published templates lean on: tools and documents
    defined as none, tojson's keyword arguments without HTML escaping, namespace, loop controls, trim_blocks and
    lstrip_blocks, strftime_now, and extra variables."""
    template = (
        "{% if tools is not none %}TOOLS{% endif %}{% if documents is none %}no documents{% endif %}\n"
        "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2, sort_keys=True) }}|"
        "{{ {'b': 1, 'a': '<&>'} | tojson(separators=(',', ':')) }}\n"
        "{% set ns = namespace(n=0) %}\n"
        "  {% for m in messages %}\n"
        "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}[{{ m.role }}]\n"
        "  {% endfor %}\n"
        "{{ ns.n }} {{ strftime_now('%Y') }} {{ custom_flag }} {{ bos_token }}{{ eos_token }}"
    )
    hf = hf_tokenizers["llama3"]
    for extra in ({"custom_flag": "on"}, {"custom_flag": 3, "tools": [{"name": "f"}], "documents": []}):
        ours, theirs = _render_both(hf, template, SYSTEM_CHAT, True, extra)
        assert ours == theirs, extra


def test_model_chat_passes_template_kwargs(tmp_path):
    """Model.chat(template_kwargs=...) reaches the template: on a tiny model carrying Qwen3's template, the prompt
    it evaluates is transformers' rendering with the same variables, tokenized."""
    import json

    from transformers import AutoTokenizer

    import lowbit
    from tiny_models import make_tiny_llama

    hf_dir = make_tiny_llama(tmp_path, name="tiny-qwen3-template")
    cfg_path = hf_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text(encoding="utf-8")
    cfg_path.write_text(json.dumps(cfg))
    (hf_dir / "chat_template.jinja").unlink(missing_ok=True)
    auto = AutoTokenizer.from_pretrained(hf_dir)
    path = lowbit.convert(hf_dir, tmp_path / "m.gguf", outtype="f32", progress=False)
    lengths = set()
    with lowbit.load(path, n_threads=1, n_ctx=128) as model:
        for extra in ({}, {"enable_thinking": False}):
            text = auto.apply_chat_template(ONE_TURN, tokenize=False, add_generation_prompt=True, **extra)
            model.chat(ONE_TURN, template_kwargs=extra, max_new_tokens=1, temperature=0.0)
            evaluated = model.last_timings["prompt_tokens"] + model.last_timings["reused_tokens"]
            assert evaluated == len(auto(text, add_special_tokens=False).input_ids), extra
            lengths.add(evaluated)
    assert len(lengths) == 2
