"""SamplingParams (vLLM's names and defaults). Every invalid value raises ValueError naming the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # logprob of each prompt token (and the top-k) in RequestOutput.prompt_logprobs
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (in [-100, 100]), before penalties
    include_stop_str_in_output: bool = False  # keep the stop string (or stop_token_ids token's text) in the text
    # constrained decoding (vLLM's name): a StructuredOutputsParams, or a dict of its fields
    structured_outputs: Any = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {why}; got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # v == v rejects NaN

        if not is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a number >= 0")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or (self.top_k < 1 and self.top_k not in (-1, 0)) or self.top_k > 2**31 - 1:
            raise bad("top_k", "must be -1 (or 0: disabled) or an integer in [1, 2**31 - 1]")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1 (or None: up to the context length)")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop_strings = list(self.stop)
        else:
            raise bad("stop", "must be a string or a list of strings")
        if any(s == "" for s in self.stop_strings):
            raise bad("stop", "must not contain an empty string")
        if self.stop_token_ids is not None and (
                not isinstance(self.stop_token_ids, (list, tuple)) or not all(is_int(t) and t >= 0
                                                                               for t in self.stop_token_ids)):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        if self.seed is not None and (not is_int(self.seed) or not -2**63 <= self.seed < 2**63):
            raise bad("seed", "must be a 64-bit integer")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "must be an integer in [0, 20]")
        if self.prompt_logprobs is not None and (not is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            raise bad("prompt_logprobs", "must be an integer in [0, 20]")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a bool")
        if not isinstance(self.skip_special_tokens, bool):
            raise bad("skip_special_tokens", "must be a bool")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise bad("include_stop_str_in_output", "must be a bool")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", "must be a dict of token id -> bias")
            for tid, bias in self.logit_bias.items():
                if not is_int(tid) or tid < 0:
                    raise ValueError(f"SamplingParams.logit_bias keys must be token ids (integers >= 0); got {tid!r}")
                if not is_num(bias) or not -100 <= bias <= 100:
                    raise ValueError(f"SamplingParams.logit_bias values must be numbers in [-100, 100]; got {bias!r} "
                                     f"for token {tid}")
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()} or None
        if self.structured_outputs is not None:
            from stablelm_fast.structured_outputs import StructuredOutputsParams
            self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
