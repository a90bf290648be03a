"""EngineClient: what the HTTP server needs from an engine. AsyncLLM implements it; tests use stand-ins.

The server validates and tokenizes prompts only through `input_processor.process(...)` (raising ValueError -> 400)
and hands the resulting ProcessedPrompt to `generate`; it never reaches into the engine's internals.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol, runtime_checkable

from stablelm_fast.engine.input_processor import ProcessedPrompt
from stablelm_fast.outputs import RequestOutput
from stablelm_fast.sampling_params import SamplingParams


class ServerTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...


class PromptProcessor(Protocol):
    def process(self, prompt: Any, params: SamplingParams | None = None) -> ProcessedPrompt:
        """str or {"prompt_token_ids": [...]} -> validated prompt (params' max_tokens resolved); ValueError if not."""


@runtime_checkable
class EngineClient(Protocol):
    tokenizer: ServerTokenizer
    max_model_len: int
    input_processor: PromptProcessor

    @property
    def is_running(self) -> bool:
        """False once the engine cannot serve (died or shut down): the server answers 503."""

    def generate(self, prompt: ProcessedPrompt, sampling_params: SamplingParams | None,
                 request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs until the request finishes; closing the iterator early aborts the request."""

    async def abort(self, request_id: str) -> None: ...


def default_model_name(engine: EngineClient) -> str:
    """The name requests use when none is configured: the model path an AsyncLLM was made with (its public `model`
    attribute; an engine without one, such as a test double, serves "model")."""
    return str(getattr(engine, "model", "") or "model")
