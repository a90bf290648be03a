"""The engine's public exception types."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (e.g. a tensor-parallel worker died): no request can be served."""
