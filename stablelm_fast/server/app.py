"""The OpenAI-compatible HTTP server: `create_app(engine)` returns a FastAPI (ASGI) app, mountable anywhere.

    engine = AsyncLLM(model_dir)
    app = create_app(engine, served_model_name="stablelm", api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

This module is the HTTP surface: auth, body reading, routes. The endpoints' logic is in serving_completion.py,
serving_chat.py and serving_tokenization.py, sharing a ServingContext (serving.py); protocol.py holds the request
bodies; errors.py maps every failure to an OpenAI error body; streaming.py runs the engine requests and streams their
outputs, aborting them when the client goes away; engine_client.py declares what the server needs of an engine.
"""

from __future__ import annotations

import json
import secrets
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from stablelm_fast import __version__
from stablelm_fast.server.engine_client import EngineClient, default_model_name
from stablelm_fast.server.errors import APIError, add_exception_handlers, validation_error
from stablelm_fast.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard,
                                           ModelList, TokenizeChatRequest, TokenizeCompletionRequest,
                                           find_unsupported)
from stablelm_fast.server.serving import ServingContext
from stablelm_fast.server.serving_chat import ServingChat
from stablelm_fast.server.serving_completion import ServingCompletion
from stablelm_fast.server.serving_tokenization import ServingTokenization

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024

M = TypeVar("M", bound=BaseModel)


def check_auth(request: Request, api_keys: list[str]) -> None:
    """401 unless the request carries `Authorization: Bearer <key>` (or `x-api-key`) with one of the keys; no-op
    without keys. Every key is compared (in constant time), so the time taken does not tell which one was close."""
    if not api_keys:
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    matches = [secrets.compare_digest(token.encode(), key.encode()) for key in api_keys]
    if not token or not any(matches):
        raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.")


MAX_JSON_DEPTH = 100


def json_depth(value: object) -> int:
    """How deeply lists / objects nest in a parsed JSON value (a scalar: 0), without recursion."""
    depth, level = 0, [(value, 1)]
    while level:
        v, d = level.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is not None:
            depth = max(depth, d)
            level.extend((c, d + 1) for c in children)
    return depth


async def read_body(request: Request, max_body_bytes: int) -> dict:
    """The body as a JSON object: 413 past max_body_bytes (checked while reading), 400 for anything that is not
    plain JSON of sane shape (bad syntax, nesting deeper than MAX_JSON_DEPTH, integers with too many digits)."""
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
    except RecursionError:
        raise APIError(400, f"The request body nests deeper than {MAX_JSON_DEPTH} levels.") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an integer past Python's digit limit
        raise APIError(400, f"The request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise APIError(400, f"The request body nests deeper than {MAX_JSON_DEPTH} levels.")
    return data


def parse_request(data: dict, model: type[M]) -> M:
    """A body as `model`: 400 naming the first field that is unsupported (model.UNSUPPORTED) or invalid."""
    name = find_unsupported(data, model.UNSUPPORTED)
    if name is not None:
        raise APIError(400, f"'{name}' is not supported yet (got {json.dumps(data[name])[:200]})", name)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


async def read_json(request: Request, model: type[M], max_body_bytes: int) -> M:
    return parse_request(await read_body(request, max_body_bytes), model)


def create_app(engine: EngineClient, served_model_name: str | list[str] | None = None,
               api_key: str | list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_pending_seqs: int | None = None, allowed_origins: list[str] | None = None,
               request_timeout: float | None = None) -> FastAPI:
    """An ASGI app serving `engine` (an AsyncLLM) with the OpenAI API; mount it in another app or run it as is.

    served_model_name: the name(s) requests must use in `model` (default: the model path the engine was made with);
    api_key: a key or a list of keys; if set, /v1/*, /tokenize and /detokenize require `Authorization: Bearer <key>`
    (/health and /version do not); max_body_bytes: larger bodies get 413; max_pending_seqs: the most sequences
    (prompts x n) this app's requests may hold in the engine at once, running or waiting (e.g. max_num_seqs plus a
    queue allowance); past it a request gets 503 with Retry-After. None: no limit. allowed_origins: browser origins
    allowed to call the API (CORS; ["*"]: any); None: no CORS headers, as before. request_timeout: seconds after
    which a request still running is aborted in the engine (its KV cache freed) and answered 504 (streamed: an error
    event); a request may ask for a shorter deadline with its `request_timeout` field. None: no deadline.
    """
    api_keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    if any(not isinstance(k, str) or not k for k in api_keys):
        raise ValueError("api_key must be a non-empty string or a list of them")
    model_path = default_model_name(engine)
    if served_model_name is None:
        names = [model_path]
    elif isinstance(served_model_name, str):
        names = [served_model_name]
    else:
        names = list(served_model_name)
    if max_pending_seqs is not None and max_pending_seqs < 1:
        raise ValueError(f"max_pending_seqs must be >= 1 (or None: no limit); got {max_pending_seqs}")
    if request_timeout is not None and not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds (or None: no deadline); got {request_timeout}")
    ctx = ServingContext(engine, names, model_path, max_pending_seqs, request_timeout)
    serving_completion, serving_chat = ServingCompletion(ctx), ServingChat(ctx)
    serving_tokenization = ServingTokenization(ctx)

    app = FastAPI(title="stablelm-fast", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.served_model_names = names
    app.state.serving = ctx
    add_exception_handlers(app)
    if allowed_origins is not None:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-API-Key"])

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return JSONResponse({"status": "dead"}, status_code=503)
        return JSONResponse({"status": "ok"})

    metrics = None

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        nonlocal metrics
        if not hasattr(engine, "stats"):
            raise APIError(404, "this engine reports no metrics")
        from stablelm_fast.server.metrics import CONTENT_TYPE, Metrics  # prometheus-client: only when scraped
        if metrics is None:
            metrics = Metrics(engine, names[0])
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": __version__})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        check_auth(request, api_keys)
        cards = [ModelCard(id=n, root=model_path, max_model_len=ctx.max_model_len) for n in names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_auth(request, api_keys)
        req = await read_json(request, CompletionRequest, max_body_bytes)
        return await serving_completion.create(req, request.receive)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_auth(request, api_keys)
        req = await read_json(request, ChatCompletionRequest, max_body_bytes)
        return await serving_chat.create(req, request.receive)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        check_auth(request, api_keys)
        data = await read_body(request, max_body_bytes)
        model = TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest
        return await serving_tokenization.tokenize(parse_request(data, model))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        check_auth(request, api_keys)
        return await serving_tokenization.detokenize(await read_json(request, DetokenizeRequest, max_body_bytes))

    return app
