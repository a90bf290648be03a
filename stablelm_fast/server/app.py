"""The OpenAI-compatible HTTP server: `create_app(engine)` returns a FastAPI (ASGI) app, mountable anywhere.

    engine = AsyncLLM(model_dir)
    app = create_app(engine, served_model_name="stablelm", api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every engine request of an HTTP request runs in its own task feeding one queue; whatever ends the HTTP request early
(client disconnect, error, cancellation) cancels those tasks, which aborts the engine requests and frees their KV
blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import secrets
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from stablelm_fast.engine.exceptions import EngineDeadError
from stablelm_fast.engine.input_processor import ProcessedPrompt
from stablelm_fast.outputs import RequestOutput
from stablelm_fast.sampling_params import SamplingParams
from stablelm_fast.server import tool_calls as tc
from stablelm_fast.server.protocol import (ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, now,
                                           random_id)

logger = logging.getLogger("stablelm_fast.server")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
_DONE = object()


# ---- errors ----------------------------------------------------------------------------------------------------------

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "request_too_large", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "error"),
                          "code": self.status, "param": self.param}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    field = loc[0] if loc else None
    where = ".".join(loc) if loc else "request body"
    return APIError(400, f"Invalid value for '{where}': {err.get('msg', 'invalid')}", field)


def _value_error(e: ValueError, default_param: str | None = None) -> APIError:
    msg = str(e)
    m = re.match(r"SamplingParams\.(\w+) ", msg)
    if m:
        return APIError(400, msg[len("SamplingParams."):], m.group(1))
    return APIError(400, msg, default_param)


# ---- the engine side -------------------------------------------------------------------------------------------------

class _Fanin:
    """Runs several engine requests concurrently; iterate for (index, RequestOutput) in arrival order."""

    def __init__(self, engine: Any, jobs: list[tuple[ProcessedPrompt, SamplingParams, str]]) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = len(jobs)
        self.tasks = [asyncio.create_task(self._run(i, engine, *job)) for i, job in enumerate(jobs)]

    async def _run(self, index: int, engine: Any, prompt: ProcessedPrompt, params: SamplingParams,
                   request_id: str) -> None:
        try:
            async for out in engine.generate(prompt, params, request_id=request_id):
                self.queue.put_nowait((index, out))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001  (delivered to the consumer)
            self.queue.put_nowait((index, e))
            return
        self.queue.put_nowait((index, _DONE))

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self.pending:
            index, item = await self.queue.get()
            if item is _DONE:
                self.pending -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _engine_error(e: BaseException) -> APIError:
    if isinstance(e, ValueError):
        return _value_error(e, "prompt")
    if isinstance(e, EngineDeadError):
        return APIError(503, f"The engine is not running: {e}")
    logger.error("request failed in the engine: %r", e)
    return APIError(500, f"The engine failed while serving this request: {e}")


async def _wait_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _SSEResponse(StreamingResponse):
    """text/event-stream from an async iterator of str events; a client disconnect closes the iterator at once."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content=events, status_code=200, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.on_close = events, on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pump_task = asyncio.create_task(pump())
        watch_task = asyncio.create_task(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if pump_task in done:
                exc = pump_task.exception()
                if exc is not None and not isinstance(exc, OSError):  # OSError: the client went away
                    raise exc
        finally:
            for t in (pump_task, watch_task):
                t.cancel()
            await asyncio.gather(pump_task, watch_task, return_exceptions=True)
            await self.on_close()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _sse_chunk(obj_type: str, rid: str, created: int, model: str, choices: list, usage: dict | None,
               include_usage: bool) -> str:
    """One streamed chunk of a completion (obj_type "text_completion") or chat ("chat.completion.chunk")."""
    body = {"id": rid, "object": obj_type, "created": created, "model": model, "choices": choices}
    if include_usage:
        body["usage"] = usage
    return _sse(body)


# ---- the app ---------------------------------------------------------------------------------------------------------

def create_app(engine: Any, served_model_name: str | list[str] | None = None, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """An ASGI app serving `engine` (an AsyncLLM) with the OpenAI API; mount it in another app or run it as is.

    served_model_name: the name(s) requests must use in `model` (default: the model path the engine was made with);
    api_key: if set, /v1/* requires `Authorization: Bearer <api_key>`; max_body_bytes: larger bodies get 413.
    """
    model_path = str(getattr(getattr(getattr(engine, "engine", None), "args", None), "model", "") or "model")
    if served_model_name is None:
        names = [model_path]
    elif isinstance(served_model_name, str):
        names = [served_model_name]
    else:
        names = list(served_model_name)
    tokenizer = engine.tokenizer
    max_model_len = int(engine.max_model_len)

    app = FastAPI(title="stablelm-fast", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.served_model_names = names

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestValidationError)
    async def _req_validation(_: Request, e: RequestValidationError) -> JSONResponse:
        err = (e.errors() or [{}])[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        return APIError(400, f"Invalid value for '{'.'.join(loc) or 'request'}': {err.get('msg', 'invalid')}",
                        loc[0] if loc else None).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected server error")
        return APIError(500, f"Internal server error: {e!r}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail)).response()

    # ---- helpers -----------------------------------------------------------------------------------------------------

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not token or not secrets.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.")

    async def read_json(request: Request, model: type[BaseModel]) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise APIError(413, f"The request body ({length} bytes) is larger than the limit ({max_body_bytes} bytes).")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"The request body is larger than the limit ({max_body_bytes} bytes).")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"The request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None

    def check_model(name: str | None) -> str:
        if name is None or name == "":
            return names[0]
        if name not in names:
            raise APIError(404, f"The model `{name}` does not exist. Served: {', '.join(names)}.", "model")
        return name

    def make_params(req: Any, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        kwargs: dict[str, Any] = dict(n=req.n, max_tokens=max_tokens, stop=req.stop, seed=req.seed,
                                      stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                                      min_tokens=req.min_tokens, logprobs=logprobs,
                                      skip_special_tokens=req.skip_special_tokens)
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:
            raise _value_error(e) from None

    def prepare_prompt(prompt: str | list[int], params: SamplingParams, param: str) -> ProcessedPrompt:
        """Tokenize and check a prompt up front (the engine's input processor): 400 if it cannot be served."""
        raw = prompt if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        try:
            return engine.input_processor.process(raw, params)
        except ValueError as e:
            raise APIError(400, str(e), param) from None

    async def run_to_end(request: Request, fanin: _Fanin, n_jobs: int) -> list[RequestOutput] | None:
        """Collect the final outputs; a client disconnect aborts everything (and returns None)."""
        finals: list[RequestOutput | None] = [None] * n_jobs

        async def collect() -> None:
            async for index, out in fanin:
                finals[index] = out

        collect_task = asyncio.create_task(collect())
        watch_task = asyncio.create_task(_wait_disconnect(request.receive))
        try:
            done, _ = await asyncio.wait({collect_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if collect_task not in done:  # the client went away
                logger.info("client disconnected: request aborted")
                return None
            exc = collect_task.exception()
            if exc is not None:
                raise _engine_error(exc)
        finally:
            for t in (collect_task, watch_task):
                t.cancel()
            await asyncio.gather(collect_task, watch_task, return_exceptions=True)
            await fanin.close()
        return [f for f in finals if f is not None]

    def finish_reason(reason: str | None) -> str | None:
        return None if reason is None else ("stop" if reason == "abort" else reason)

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], offset: int, top: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, lp in zip(token_ids, logprobs):
            text = token_text(tid)
            tokens.append(text)
            token_lps.append(lp.get(tid))
            ranked = sorted(lp.items(), key=lambda kv: -kv[1])[: max(top, 1)]
            tops.append({token_text(t): v for t, v in ranked})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], top: int) -> dict:
        content = []
        for tid, lp in zip(token_ids, logprobs):
            text = token_text(tid)
            ranked = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
            content.append({"token": text, "logprob": lp.get(tid), "bytes": list(text.encode("utf-8")),
                            "top_logprobs": [{"token": token_text(t), "logprob": v,
                                              "bytes": list(token_text(t).encode("utf-8"))} for t, v in ranked]})
        return {"content": content}

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def check_engine() -> None:
        if not engine.is_running:
            raise APIError(503, "The engine is not running.")

    # ---- endpoints ---------------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return JSONResponse({"status": "dead"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        check_auth(request)
        cards = [ModelCard(id=n, root=model_path, max_model_len=max_model_len) for n in names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_auth(request)
        req: CompletionRequest = await read_json(request, CompletionRequest)
        model = check_model(req.model)
        check_engine()
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (only best_of == n)", "best_of")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise APIError(400, "logprobs must be an integer in [0, 20]", "logprobs")
        params = make_params(req, req.max_tokens, req.logprobs)
        raw = req.prompt
        if isinstance(raw, str):
            prompts: list = [raw]
        elif raw and all(isinstance(p, int) for p in raw):
            prompts = [raw]
        else:
            prompts = list(raw)
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt")
        inputs = [prepare_prompt(p, params, "prompt") for p in prompts]
        rid = random_id("cmpl")
        created = now()
        jobs = [(inp, inp.params, f"{rid}-{i}") for i, inp in enumerate(inputs)]
        n = params.n

        def echo_text(inp: ProcessedPrompt) -> str:
            if not req.echo:
                return ""
            return inp.prompt if inp.prompt is not None else tokenizer.decode(inp.prompt_token_ids)

        if not req.stream:
            fanin = _Fanin(engine, jobs)
            finals = await run_to_end(request, fanin, len(jobs))
            if finals is None:
                return Response(status_code=499)
            choices, completion_tokens = [], 0
            for p_index, out in enumerate(finals):
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    prefix = echo_text(inputs[p_index])
                    lp = (completion_logprobs(c.token_ids, c.logprobs or [], len(prefix), req.logprobs)
                          if req.logprobs is not None else None)
                    choices.append({"index": p_index * n + c.index, "text": prefix + c.text, "logprobs": lp,
                                    "finish_reason": finish_reason(c.finish_reason), "stop_reason": c.stop_reason})
            prompt_tokens = sum(len(i.prompt_token_ids) for i in inputs)
            return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                                 "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        fanin = _Fanin(engine, jobs)

        async def events() -> AsyncIterator[str]:
            sent_text: dict[tuple[int, int], int] = {}
            sent_lps: dict[tuple[int, int], int] = {}
            lp_offset: dict[tuple[int, int], int] = {}
            completion_tokens: dict[tuple[int, int], int] = {}

            def chunk(choices: list, usage_: dict | None = None) -> str:
                return _sse_chunk("text_completion", rid, created, model, choices, usage_, include_usage)

            try:
                async for p_index, out in fanin:
                    for c in out.outputs:
                        key = (p_index, c.index)
                        first = key not in sent_text
                        prev = sent_text.get(key, 0)
                        delta = c.text[prev:] if len(c.text) > prev else ""
                        if first:
                            delta = echo_text(inputs[p_index]) + delta
                        lp = None
                        if req.logprobs is not None:
                            start = sent_lps.get(key, 0)
                            lp = completion_logprobs(c.token_ids[start:], (c.logprobs or [])[start:],
                                                     lp_offset.get(key, len(echo_text(inputs[p_index]))),
                                                     req.logprobs)
                            lp_offset[key] = (lp["text_offset"][-1] + len(lp["tokens"][-1]) if lp["tokens"]
                                              else lp_offset.get(key, len(echo_text(inputs[p_index]))))
                            sent_lps[key] = len(c.logprobs or [])
                        sent_text[key] = max(prev, len(c.text))
                        completion_tokens[key] = len(c.token_ids)
                        reason = finish_reason(c.finish_reason)
                        if delta or reason is not None or (lp and lp["tokens"]):
                            yield chunk([{"index": p_index * n + c.index, "text": delta, "logprobs": lp,
                                          "finish_reason": reason,
                                          "stop_reason": c.stop_reason if reason else None}])
            except Exception as e:  # noqa: BLE001  (headers are sent: report in the stream)
                yield _sse(_engine_error(e).body())
                yield "data: [DONE]\n\n"
                return
            if include_usage:
                prompt_tokens = sum(len(i.prompt_token_ids) for i in inputs)
                yield chunk([], usage(prompt_tokens, sum(completion_tokens.values())))
            yield "data: [DONE]\n\n"

        return _SSEResponse(events(), fanin.close)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_auth(request)
        req: ChatCompletionRequest = await read_json(request, ChatCompletionRequest)
        model = check_model(req.model)
        check_engine()
        if req.response_format and req.response_format.get("type") not in (None, "text"):
            raise APIError(400, "response_format other than 'text' is not supported", "response_format")
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
            if not 0 <= req.top_logprobs <= 20:
                raise APIError(400, "top_logprobs must be an integer in [0, 20]", "top_logprobs")
        top = req.top_logprobs or 0
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = make_params(req, max_tokens, top if req.logprobs else None)
        tools_raw = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            tools = tc.select_tools(tools_raw, req.tool_choice)
        except ValueError as e:
            raise APIError(400, str(e), "tool_choice") from None
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        for m, orig in zip(messages, req.messages):  # keep tool-call dumps ordered as given
            if orig.tool_calls:
                m["tool_calls"] = [c.model_dump() for c in orig.tool_calls]
        try:
            rendered = tc.render_messages(messages, tools)
            text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        ids = tokenizer.encode(text, add_special_tokens=False)
        inp = dataclasses.replace(prepare_prompt(ids, params, "messages"), prompt=text)
        rid = random_id("chatcmpl")
        created = now()
        parse_tools = bool(tools)
        fanin = _Fanin(engine, [(inp, inp.params, rid)])

        if not req.stream:
            finals = await run_to_end(request, fanin, 1)
            if finals is None:
                return Response(status_code=499)
            out = finals[0]
            choices = []
            for c in out.outputs:
                message: dict[str, Any] = {"role": "assistant", "content": c.text}
                reason = finish_reason(c.finish_reason)
                calls = tc.parse_tool_calls(c.text) if parse_tools else None
                if calls:
                    message = {"role": "assistant", "content": None, "tool_calls": calls}
                    reason = "tool_calls"
                lp = chat_logprobs(c.token_ids, c.logprobs or [], top) if req.logprobs else None
                choices.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": reason})
            completion_tokens = sum(len(c.token_ids) for c in out.outputs)
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                                 "choices": choices, "usage": usage(len(ids), completion_tokens)})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            parsers: dict[int, tc.StreamingToolParser] = {}
            sent_text: dict[int, int] = {}
            sent_lps: dict[int, int] = {}
            completion_tokens: dict[int, int] = {}

            def chunk(choices: list, usage_: dict | None = None) -> str:
                return _sse_chunk("chat.completion.chunk", rid, created, model, choices, usage_, include_usage)

            try:
                async for _, out in fanin:
                    for c in out.outputs:
                        i = c.index
                        if i not in sent_text:
                            sent_text[i] = 0
                            sent_lps[i] = 0
                            parsers[i] = tc.StreamingToolParser()
                            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}])
                        prev = sent_text[i]
                        delta = c.text[prev:] if len(c.text) > prev else ""
                        sent_text[i] = max(prev, len(c.text))
                        completion_tokens[i] = len(c.token_ids)
                        lp = None
                        if req.logprobs:
                            lp = chat_logprobs(c.token_ids[sent_lps[i]:], (c.logprobs or [])[sent_lps[i]:], top)
                            sent_lps[i] = len(c.logprobs or [])
                        if parse_tools:
                            delta = parsers[i].feed(delta)
                        reason = finish_reason(c.finish_reason)
                        if reason is None:
                            if delta or (lp and lp["content"]):
                                yield chunk([{"index": i, "delta": {"content": delta}, "logprobs": lp,
                                              "finish_reason": None}])
                            continue
                        calls = None
                        if parse_tools:
                            rest, calls = parsers[i].finish()
                            delta += rest
                        if delta or (lp and lp["content"]):
                            yield chunk([{"index": i, "delta": {"content": delta}, "logprobs": lp,
                                          "finish_reason": None}])
                        if calls:
                            yield chunk([{"index": i, "delta": {"tool_calls": [
                                {"index": k, **call} for k, call in enumerate(calls)]},
                                "logprobs": None, "finish_reason": None}])
                            reason = "tool_calls"
                        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
            except Exception as e:  # noqa: BLE001  (headers are sent: report in the stream)
                yield _sse(_engine_error(e).body())
                yield "data: [DONE]\n\n"
                return
            if include_usage:
                yield chunk([], usage(len(ids), sum(completion_tokens.values())))
            yield "data: [DONE]\n\n"

        return _SSEResponse(events(), fanin.close)

    return app
