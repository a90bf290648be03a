"""The OpenAI-compatible HTTP server: `create_app(engine)` returns a FastAPI (ASGI) app, mountable anywhere.

    engine = AsyncLLM(model_dir)
    app = create_app(engine, served_model_name="stablelm", api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

This module is the HTTP surface: auth, body reading, routes. The endpoints' logic is in serving_completion.py and
serving_chat.py, sharing a ServingContext (serving.py); errors.py maps every failure to an OpenAI error body;
streaming.py runs the engine requests and streams their outputs, aborting them when the client goes away.
"""

from __future__ import annotations

import json
import secrets
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from stablelm_fast.server.engine_client import EngineClient, default_model_name
from stablelm_fast.server.errors import APIError, add_exception_handlers, validation_error
from stablelm_fast.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from stablelm_fast.server.serving import ServingContext
from stablelm_fast.server.serving_chat import ServingChat
from stablelm_fast.server.serving_completion import ServingCompletion

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024

M = TypeVar("M", bound=BaseModel)


def check_auth(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <api_key>` (or `x-api-key`); no-op without a key."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not token or not secrets.compare_digest(token.encode(), api_key.encode()):
        raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.")


async def read_json(request: Request, model: type[M], max_body_bytes: int) -> M:
    """The body as `model`: 413 past max_body_bytes (checked while reading), 400 for bad JSON or bad fields."""
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
        raise validation_error(e.errors()) from None


def create_app(engine: EngineClient, served_model_name: str | list[str] | None = None, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """An ASGI app serving `engine` (an AsyncLLM) with the OpenAI API; mount it in another app or run it as is.

    served_model_name: the name(s) requests must use in `model` (default: the model path the engine was made with);
    api_key: if set, /v1/* requires `Authorization: Bearer <api_key>`; max_body_bytes: larger bodies get 413.
    """
    model_path = default_model_name(engine)
    if served_model_name is None:
        names = [model_path]
    elif isinstance(served_model_name, str):
        names = [served_model_name]
    else:
        names = list(served_model_name)
    ctx = ServingContext(engine, names, model_path)
    serving_completion, serving_chat = ServingCompletion(ctx), ServingChat(ctx)

    app = FastAPI(title="stablelm-fast", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.served_model_names = names
    add_exception_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return JSONResponse({"status": "dead"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        check_auth(request, api_key)
        cards = [ModelCard(id=n, root=model_path, max_model_len=ctx.max_model_len) for n in names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_auth(request, api_key)
        req = await read_json(request, CompletionRequest, max_body_bytes)
        return await serving_completion.create(req, request.receive)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_auth(request, api_key)
        req = await read_json(request, ChatCompletionRequest, max_body_bytes)
        return await serving_chat.create(req, request.receive)

    return app
