"""The OpenAI-compatible HTTP server: `create_app(engine)` -> an ASGI (FastAPI) app."""

from stablelm_fast.server.app import create_app
from stablelm_fast.server.engine_client import EngineClient
from stablelm_fast.server.errors import APIError

__all__ = ["create_app", "APIError", "EngineClient"]
