"""The OpenAI-compatible HTTP server: `create_app(engine)` -> an ASGI (FastAPI) app."""

from stablelm_fast.server.app import APIError, create_app

__all__ = ["create_app", "APIError"]
