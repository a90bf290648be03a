"""InputProcessor: the one place a request's prompt is validated and tokenized (used by LLM, AsyncLLM and the server).

A prompt is a string, or a dict with `prompt_token_ids` (and optionally the `prompt` text they came from), or a dict
with `prompt` alone. Everything that would make the request fail later is refused here, before anything is queued:
an empty prompt, a token id outside the vocabulary, a prompt plus max_tokens longer than max_model_len or than the
whole KV cache. The result carries the SamplingParams with max_tokens resolved (None -> what the context leaves).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from stablelm_fast.sampling_params import SamplingParams


@dataclass(frozen=True)
class ProcessedPrompt:
    prompt: str | None  # the text, when known
    prompt_token_ids: list[int]
    params: SamplingParams  # max_tokens resolved
    grammar: Any = None  # the compiled structured-outputs constraint (xgrammar), if any


class InputProcessor:
    def __init__(self, tokenizer: Any, vocab_size: int | None, max_model_len: int, block_size: int | None = None,
                 num_kv_blocks: int | None = None, structured: Any = None) -> None:
        self.tokenizer, self.structured = tokenizer, structured
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.block_size, self.num_kv_blocks = block_size, num_kv_blocks

    def tokenize(self, prompt: Any) -> tuple[str | None, list[int]]:
        """-> (text or None, token ids), checked against the vocabulary."""
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
        elif isinstance(prompt, dict) and "prompt" in prompt:
            text, ids = prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        else:
            raise ValueError("a prompt must be a string or a dict with 'prompt_token_ids' (or 'prompt')")
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        if len(ids) == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        if self.vocab_size is not None:
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return text, list(ids)

    def check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        wanted = params.max_tokens or 0
        if num_prompt_tokens + max(wanted, 1) > self.max_model_len:
            raise ValueError(f"This model's maximum context length (max_model_len) is {self.max_model_len} tokens. "
                             f"However, you requested {num_prompt_tokens + wanted} tokens ({num_prompt_tokens} in "
                             f"the prompt, {wanted} for the completion). Please reduce the length of the prompt or "
                             f"of max_tokens.")
        if self.block_size is not None and self.num_kv_blocks is not None:
            blocks = -(-(num_prompt_tokens + max(wanted, 1)) // self.block_size)
            if blocks > self.num_kv_blocks:
                raise ValueError(f"the prompt plus max_tokens needs {blocks} KV-cache blocks but the cache has only "
                                 f"{self.num_kv_blocks}: raise num_kv_blocks / kv_cache_memory_gb")

    def process(self, prompt: Any, params: SamplingParams | None = None) -> ProcessedPrompt:
        """Validate and tokenize one prompt; raises ValueError naming the problem."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams")
        text, ids = self.tokenize(prompt)
        self.check_fits(len(ids), params)
        if params.logit_bias and self.vocab_size is not None:
            bad = sorted(t for t in params.logit_bias if t >= self.vocab_size)
            if bad:
                raise ValueError(f"SamplingParams.logit_bias token id {bad[0]} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        grammar = None
        if params.structured_outputs is not None:
            if self.structured is None:
                raise ValueError("structured_outputs are not available with this engine")
            grammar = self.structured.compile(params.structured_outputs)
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(ids))
        return ProcessedPrompt(text, ids, params, grammar)
