"""Request and response bodies of the OpenAI-compatible HTTP API (pydantic v2).

Requests accept the OpenAI fields plus vLLM's sampling extras and structured outputs. Fields we know and do not
support yet (beam search, custom chat templates, ...) are refused with a 400 naming them unless they hold their no-op
value (each request model's UNSUPPORTED); other unknown fields are ignored, as OpenAI-compatible servers usually do.
Type errors and the caps (n, integer ranges) are caught by pydantic; value ranges are checked by SamplingParams, whose
messages name the offending field.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 128  # choices per prompt
MAX_PROMPTS = 128  # prompts per completion request
Int32 = Annotated[int, Field(ge=-2**31, le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-2**63, le=2**63 - 1)]

# vLLM / OpenAI fields we do not support yet -> the values that mean "not used" (anything else: 400 naming the field)
_UNSUPPORTED_COMMON: dict[str, tuple] = {
    "logits_processors": (None,),
    "prompt_logprobs": (None,), "allowed_token_ids": (None,),
    "bad_words": (None, []), "use_beam_search": (None, False), "truncate_prompt_tokens": (None,),
    "return_tokens_as_token_ids": (None, False), "spaces_between_special_tokens": (None, True),
}
_UNSUPPORTED_CHAT_TEMPLATE: dict[str, tuple] = {"chat_template": (None,), "documents": (None,)}


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {}


def find_unsupported(data: dict, unsupported: dict[str, tuple]) -> str | None:
    """The first field of a request body set to a value we do not support, or None."""
    for name, no_op in unsupported.items():
        if name in data and not any(data[name] == v for v in no_op):
            return name
    return None


class StreamOptions(_Request):
    include_usage: bool | None = False


class _SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int = Field(1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: Int64 | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extras
    top_k: Int32 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Int64] | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # ours: seconds after which the request is aborted (504); the server's --request-timeout caps it
    request_timeout: float | None = Field(None, gt=0)
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(_SamplingFields):
    UNSUPPORTED = {**_UNSUPPORTED_COMMON, "add_special_tokens": (None, True)}

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ToolCallFunction(_Request):
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCallIn(_Request):
    id: str | None = None
    type: str = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(_Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class _ChatTemplateFields(_Request):
    """How the messages go through the chat template (vLLM's fields)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False  # leave the last message open: the model continues it
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the template


class ChatCompletionRequest(_SamplingFields, _ChatTemplateFields):
    UNSUPPORTED = {**_UNSUPPORTED_COMMON, **_UNSUPPORTED_CHAT_TEMPLATE,
                   "add_special_tokens": (None, False), "echo": (None, False), "functions": (None,),
                   "function_call": (None, "none", "auto"), "audio": (None,), "modalities": (None, ["text"]),
                   "prediction": (None,)}

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class TokenizeCompletionRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(_ChatTemplateFields):
    UNSUPPORTED = _UNSUPPORTED_CHAT_TEMPLATE

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses (plain dicts would do; models keep the shapes in one place) -----------------------------------------

class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ErrorInfo(BaseModel):
    message: str
    type: str
    code: int
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "stablelm-fast"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
