"""ServingContext: what both endpoints share (the engine, the served names, request checks, answer pieces)."""

from __future__ import annotations

from typing import Any

from stablelm_fast.engine.input_processor import ProcessedPrompt
from stablelm_fast.sampling_params import SamplingParams
from stablelm_fast.structured_outputs import StructuredOutputsParams
from stablelm_fast.server.engine_client import EngineClient
from stablelm_fast.server.errors import APIError, value_error
from stablelm_fast.server.streaming import Fanin

_OPTIONAL_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                             "frequency_penalty")


class ServingContext:
    def __init__(self, engine: EngineClient, names: list[str], model_path: str,
                 max_pending_seqs: int | None = None, request_timeout: float | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = int(engine.max_model_len)
        self.names, self.model_path = names, model_path
        self.max_pending_seqs = max_pending_seqs
        self.request_timeout = request_timeout  # seconds; a request's own request_timeout may only shorten it
        self.pending_seqs = 0  # sequences of this app's requests now in the engine (running or waiting)

    def start(self, jobs: list[tuple[ProcessedPrompt, SamplingParams, str]], timeout: float | None = None) -> Fanin:
        """Admit a request's engine requests and start them. Past max_pending_seqs: 503 with Retry-After (a request
        that could never fit: 400), so that a flood is turned away at once instead of queueing without bound.
        timeout: the request's own deadline in seconds (the server's request_timeout, if shorter, wins)."""
        num_seqs = sum(params.n for _, params, _ in jobs)
        cap = self.max_pending_seqs
        if cap is not None and num_seqs > cap:
            raise APIError(400, f"this request asks for {num_seqs} sequences (prompts x n); the server admits at "
                           f"most {cap} at once", "n")
        if cap is not None and self.pending_seqs + num_seqs > cap:
            raise APIError(503, f"The server is busy ({self.pending_seqs} sequences pending, limit {cap}); "
                           f"retry shortly.", retry_after=1)
        self.pending_seqs += num_seqs

        def release() -> None:
            self.pending_seqs -= num_seqs

        limits = [t for t in (timeout, self.request_timeout) if t is not None]
        return Fanin(self.engine, jobs, on_close=release, timeout=min(limits) if limits else None)

    def begin(self, name: str | None) -> str:
        """Every generation request starts here: -> the served model name it asked for (404 / 503 if it cannot)."""
        model = self.check_model(name)
        self.check_engine()
        return model

    def check_model(self, name: str | None) -> str:
        """The served name a request asked for (the first one if none); 404 if it is not served here."""
        if name is None or name == "":
            return self.names[0]
        if name not in self.names:
            raise APIError(404, f"The model `{name}` does not exist. Served: {', '.join(self.names)}.", "model")
        return name

    def check_engine(self) -> None:
        if not self.engine.is_running:
            raise APIError(503, "The engine is not running.")

    def make_params(self, req: Any, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """A request's sampling fields -> SamplingParams; 400 naming the field SamplingParams refuses."""
        kwargs: dict[str, Any] = dict(logit_bias=logit_bias_of(req.logit_bias),
                                      include_stop_str_in_output=req.include_stop_str_in_output,
                                      n=req.n, max_tokens=max_tokens, stop=req.stop, seed=req.seed,
                                      stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                                      min_tokens=req.min_tokens, logprobs=logprobs,
                                      skip_special_tokens=req.skip_special_tokens)
        for name in _OPTIONAL_SAMPLING_FIELDS:
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        kwargs["structured_outputs"] = structured_outputs_of(req)
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:
            raise value_error(e) from None

    def prepare_prompt(self, prompt: str | list[int], params: SamplingParams, param: str) -> ProcessedPrompt:
        """Tokenize and check a prompt up front (the engine's input processor): 400 if it cannot be served."""
        raw = prompt if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        try:
            return self.engine.input_processor.process(raw, params)
        except ValueError as e:
            raise value_error(e, param) from None

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


class Endpoint:
    """An endpoint's logic (ServingCompletion, ServingChat), over the context every endpoint shares."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx


def finish_reason(reason: str | None) -> str | None:
    """The engine's finish reason in OpenAI's words (an aborted request just stopped)."""
    return None if reason is None else ("stop" if reason == "abort" else reason)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk_body(obj_type: str, rid: str, created: int, model: str, choices: list, usage_: dict | None,
               include_usage: bool) -> dict:
    """One streamed chunk of a completion (obj_type "text_completion") or chat ("chat.completion.chunk")."""
    body = {"id": rid, "object": obj_type, "created": created, "model": model, "choices": choices}
    if include_usage:
        body["usage"] = usage_
    return body


def logit_bias_of(raw: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (JSON keys are strings: token ids) -> {token id: bias}; 400 for a key that is no id.
    Ranges (bias in [-100, 100], ids in the vocabulary) are checked by SamplingParams and the input processor."""
    if not raw:
        return None
    out = {}
    for key, bias in raw.items():
        try:
            out[int(key)] = bias
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids (integers); got {key!r}", "logit_bias") from None
    return out


def structured_outputs_of(req: Any) -> StructuredOutputsParams | None:
    """The one constraint a request asks for (response_format, structured_outputs or a guided_* field) as
    StructuredOutputsParams; 400 naming the field if it is malformed or if several are given."""
    found: list[tuple[str, dict]] = []
    rf = req.response_format
    if rf is not None and rf.get("type") not in (None, "text"):
        if rf.get("type") == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif rf.get("type") == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise APIError(400, "response_format json_schema needs json_schema.schema, a JSON schema object",
                               "response_format")
            found.append(("response_format", {"json": schema}))
        else:
            raise APIError(400, f"response_format type {rf.get('type')!r} is not supported (text, json_object, "
                                f"json_schema)", "response_format")
    if req.structured_outputs is not None:
        found.append(("structured_outputs", dict(req.structured_outputs)))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        if getattr(req, name) is not None:
            found.append((name, {key: getattr(req, name)}))
    if len(found) > 1:
        raise APIError(400, f"only one structured-output constraint per request; got {', '.join(f for f, _ in found)}",
                       found[1][0])
    if not found:
        return None
    field, value = found[0]
    try:
        return StructuredOutputsParams.coerce(value)
    except ValueError as e:
        raise APIError(400, str(e), field) from None
