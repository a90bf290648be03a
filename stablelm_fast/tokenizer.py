"""Tokenizer (HF `tokenizers`), incremental detokenization, stop ids, and chat templates rendered with jinja2."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, model_dir: str, config_eos_ids: list[int] | None = None) -> None:
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"{model_dir!r} has no tokenizer.json")
        self.hf = HFTokenizer.from_file(path)
        cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        gen = _read_json(os.path.join(model_dir, "generation_config.json"))
        self.chat_template: str | None = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default one
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()))
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        eos: set[int] = set(config_eos_ids or [])
        gen_eos = gen.get("eos_token_id")
        if gen_eos is not None:
            eos.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
        if self.eos_token is not None and self.hf.token_to_id(self.eos_token) is not None:
            eos.add(self.hf.token_to_id(self.eos_token))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str:
        if not self.chat_template:
            raise ValueError("this checkpoint's tokenizer_config.json has no chat_template; use generate() instead")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    tools=tools, bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                    **kwargs)


def _raise(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
_ENV.filters["tojson"] = _tojson
_ENV.globals["raise_exception"] = _raise


def render_chat_template(template: str, messages: list[dict], **context: Any) -> str:
    """Render exactly as transformers' apply_chat_template (jinja2, trim_blocks and lstrip_blocks on)."""
    return _ENV.from_string(template).render(messages=messages, **context)


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text without splitting a multi-byte character.

    Decodes a small window of recent tokens (prefix_offset..) and emits only what is new since read_offset; while the
    new tail ends in U+FFFD (an incomplete UTF-8 sequence) it waits for the next token.
    """

    tokenizer: Tokenizer
    skip_special_tokens: bool = True
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""
    ids: list[int] = field(default_factory=list)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset: self.read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""
