"""Chat prompts: render a model's Jinja chat template (sandboxed) into the text that generate() continues.

The template is the file's `tokenizer.chat_template` (copied from the Hugging Face tokenizer_config.json by the
converter). It is rendered the way transformers' `apply_chat_template` does: an immutable sandboxed Jinja
environment with `trim_blocks` and `lstrip_blocks`, the variables `messages`, `add_generation_prompt`,
`bos_token` and `eos_token`, and the helpers `raise_exception(msg)` and `strftime_now(fmt)`. Extra variables a
template reads go in `template_kwargs`, as they go in apply_chat_template's keyword arguments, e.g.
`{"enable_thinking": False}` for Qwen3 or `{"date_string": "26 Jul 2024"}` for Llama 3.x.

A file without a template gets FALLBACK_TEMPLATE, plain ChatML:

    <|im_start|>system
    You are a helpful assistant.<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant

which many small instruct models (SmolLM2, Qwen) were trained on; for others it is only a reasonable guess.
"""
from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ._core import LowbitError

ROLES = ("system", "user", "assistant", "tool")

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(LowbitError):
    """The chat template raised (raise_exception) or could not be compiled or rendered."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' tojson filter: no HTML escaping (Jinja's built-in escapes <, >, &, '), same keyword arguments.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template does not compile ({e}); fix tokenizer.chat_template in the file") from e


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check the conversation's shape: a non-empty list of {"role": one of ROLES, "content": str} dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or len(messages) == 0:
        raise LowbitError('messages must be a non-empty list of {"role": ..., "content": ...} dicts')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise LowbitError(f'message {i} must be a dict with "role" and "content" keys, got {m!r}')
        if m["role"] not in ROLES:
            raise LowbitError(f"message {i} has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise LowbitError(f"message {i} content must be a string, got {type(m['content']).__name__}")
        out.append(dict(m))
    return out


def render_chat(messages: Sequence[Mapping[str, Any]], template: str | None, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True,
                template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt text for `messages` under `template` (None or "": FALLBACK_TEMPLATE). template_kwargs: extra
    template variables (they override bos_token/eos_token, as apply_chat_template's keyword arguments do)."""
    import jinja2

    msgs = validate_messages(messages)
    extra = dict(template_kwargs or {})
    for reserved in ("messages", "add_generation_prompt"):
        if reserved in extra:
            raise LowbitError(f"template_kwargs may not set {reserved!r}; pass it as the argument of that name")
    # transformers always defines tools and documents (None without any); "tools is not none" needs that.
    variables = {"tools": None, "documents": None, "bos_token": bos_token, "eos_token": eos_token, **extra}
    compiled = _compile(template or FALLBACK_TEMPLATE)
    try:
        return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError:
        raise
    except jinja2.TemplateError as e:
        raise TemplateError(f"rendering the chat template failed: {e}") from e
