"""Errors in the OpenAI shape: {"error": {"message", "type", "code", "param"}}, and the mapping of every failure
(pydantic validation, SamplingParams / InputProcessor ValueErrors, engine failures, Starlette HTTP errors) onto it."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from stablelm_fast.engine.exceptions import EngineDeadError

logger = logging.getLogger("stablelm_fast.server")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable",
               504: "timeout_error"}


class APIError(Exception):
    """An HTTP error answer: status, message, and the request field at fault (param) when there is one."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "code": self.status, "param": self.param}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def validation_error(errors: list[dict], where_default: str = "request body") -> APIError:
    """pydantic's first error -> 400 naming the field ("Invalid value for 'n': ...")."""
    err = (errors or [{}])[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    where = ".".join(loc) or where_default
    return APIError(400, f"Invalid value for '{where}': {err.get('msg', 'invalid')}", loc[0] if loc else None)


def value_error(e: ValueError, default_param: str | None = None) -> APIError:
    """A ValueError -> 400; SamplingParams' messages ("SamplingParams.top_k must ...") name the field."""
    msg = str(e)
    m = re.match(r"SamplingParams\.(\w+) ", msg)
    if m:
        return APIError(400, msg[len("SamplingParams."):], m.group(1))
    return APIError(400, msg, default_param)


def engine_error(e: BaseException) -> APIError:
    """What an engine request failed with -> the answer: 400 (bad input), 503 (engine dead) or 500 (an APIError, e.g.
    a deadline's 504, as it is)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):
        return value_error(e, "prompt")
    if isinstance(e, EngineDeadError):
        return APIError(503, f"The engine is not running: {e}")
    logger.error("request failed in the engine: %r", e)
    return APIError(500, f"The engine failed while serving this request: {e}")


def add_exception_handlers(app: FastAPI) -> None:
    """Every error the app can raise answers in the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _req_validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return validation_error(e.errors(), where_default="request").response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected server error")
        return APIError(500, f"Internal server error: {e!r}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail)).response()
