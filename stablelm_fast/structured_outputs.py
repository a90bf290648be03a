"""Structured outputs (vLLM's `SamplingParams(structured_outputs=StructuredOutputsParams(...))`), through xgrammar.

xgrammar compiles the constraint (a JSON schema, any JSON object, a regex, a choice of strings, an EBNF grammar) once
per request (cached) against the tokenizer's vocabulary; each sequence owns a GrammarMatcher that, before every
sampled token, fills the bitmask of allowed tokens (the engine does this while the model step runs) and then accepts
the sampled token. The sampler masks disallowed tokens; logprobs stay the model's own. A request whose constraint does
not compile is refused with ValueError before anything is queued. xgrammar is an optional dependency
(`pip install xgrammar`); without it such requests are refused with a clear error.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None  # a JSON schema (dict or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (xgrammar / GBNF style), root rule `root`
    json_object: bool | None = None  # any JSON object

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"StructuredOutputsParams needs exactly one of json, regex, choice, grammar, "
                             f"json_object; got {given or 'none'}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("StructuredOutputsParams.choice must be a non-empty list of non-empty strings")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"StructuredOutputsParams.{name} must be a string")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError("StructuredOutputsParams.json must be a JSON schema (a dict or its JSON text)")

    @classmethod
    def coerce(cls, value: Any) -> "StructuredOutputsParams":
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"json", "regex", "choice", "grammar", "json_object"})
            if unknown:
                raise ValueError(f"structured_outputs has unknown field {unknown[0]!r}")
            return cls(**value)
        raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict")

    def key(self) -> str:
        return json.dumps({k: getattr(self, k) for k in ("json", "regex", "choice", "grammar", "json_object")},
                          sort_keys=True)


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ValueError("structured outputs need the xgrammar package (pip install xgrammar)") from None
    return xgrammar


class StructuredOutputManager:
    """Compiles constraints for one tokenizer (lazily: the compiler is built at the first structured request)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiler = None
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()  # compile() runs in callers' threads (AsyncLLM validates there)

    def _get_compiler(self):
        xgr = _xgrammar()
        if self._compiler is None:
            vocab = self.tokenizer.hf.get_vocab(with_added_tokens=True)
            encoded = [""] * self.vocab_size
            for token, i in vocab.items():
                if i < self.vocab_size:
                    encoded[i] = token
            info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=self.vocab_size,
                                     stop_token_ids=sorted(self.tokenizer.eos_token_ids))
            self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        return self._compiler

    def compile(self, params: StructuredOutputsParams) -> Any:
        """-> an xgrammar CompiledGrammar; ValueError naming the problem if the constraint is invalid."""
        key = params.key()
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            compiler = self._get_compiler()
            try:
                if params.json is not None:
                    schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
                    compiled = compiler.compile_json_schema(schema, any_whitespace=False)
                elif params.json_object:  # OpenAI's json_object: a JSON object, not any JSON value
                    compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
                elif params.regex is not None:
                    compiled = compiler.compile_regex(params.regex)
                elif params.choice is not None:
                    compiled = compiler.compile_regex("|".join(_regex_escape(c) for c in params.choice))
                else:
                    compiled = compiler.compile_grammar(params.grammar)
            except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own types on bad input
                raise ValueError(f"invalid structured_outputs constraint: {e}") from None
            self._cache[key] = compiled
            return compiled

    def matcher(self, compiled: Any) -> Any:
        return _xgrammar().GrammarMatcher(compiled)

    def allowed_masks(self, matchers: list[Any]) -> torch.Tensor:
        """-> [len(matchers), vocab] bool: the tokens each matcher allows next."""
        xgr = _xgrammar()
        bitmask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
        return bits.view(len(matchers), -1)[:, : self.vocab_size].bool()


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in ".^$*+?{}[]\\|()/" else c for c in text)
