"""Running an HTTP request's engine requests and getting their outputs to the client, abortable at any moment.

Every engine request of an HTTP request runs in its own task feeding one queue (Fanin); whatever ends the HTTP
request early (client disconnect, error, cancellation) cancels those tasks, which aborts the engine requests and frees
their KV blocks. Non-streamed answers wait in `collect` while watching for a disconnect; streamed ones go out as
server-sent events through SSEResponse, which stops at once when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi.responses import StreamingResponse

from stablelm_fast.engine.input_processor import ProcessedPrompt
from stablelm_fast.outputs import RequestOutput
from stablelm_fast.sampling_params import SamplingParams
from stablelm_fast.server.engine_client import EngineClient
from stablelm_fast.server.errors import APIError, engine_error

logger = logging.getLogger("stablelm_fast.server")

SSE_DONE = "data: [DONE]\n\n"
_DONE = object()

Receive = Callable[[], Awaitable[dict]]


class Fanin:
    """Runs several engine requests concurrently; iterate for (index, RequestOutput) in arrival order. With a
    timeout (seconds from now), iterating past it raises a 504 APIError; closing then aborts the engine requests."""

    def __init__(self, engine: EngineClient, jobs: list[tuple[ProcessedPrompt, SamplingParams, str]],
                 on_close: Callable[[], None] | None = None, timeout: float | None = None) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = len(jobs)
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.on_close = on_close  # called once, by the first close()
        self.tasks = [asyncio.create_task(self._run(i, engine, *job)) for i, job in enumerate(jobs)]

    async def _run(self, index: int, engine: EngineClient, prompt: ProcessedPrompt, params: SamplingParams,
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
            if self.deadline is None:
                index, item = await self.queue.get()
            else:
                try:
                    index, item = await asyncio.wait_for(self.queue.get(), max(0.0, self.deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise APIError(504, f"The request did not finish within its deadline ({self.timeout:g} s) and "
                                        f"was aborted.", "request_timeout") from None
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
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()


async def wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _first_of(main: asyncio.Task, receive: Receive) -> bool:
    """Wait for `main` or a client disconnect, whichever comes first; -> True if main finished. Both end here."""
    watch = asyncio.create_task(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({main, watch}, return_when=asyncio.FIRST_COMPLETED)
        return main in done
    finally:
        for t in (main, watch):
            t.cancel()
        await asyncio.gather(main, watch, return_exceptions=True)


async def collect(fanin: Fanin, receive: Receive, n_jobs: int) -> list[RequestOutput] | None:
    """The final output of every job; a client disconnect aborts everything (-> None). Engine errors -> APIError."""
    finals: list[RequestOutput | None] = [None] * n_jobs

    async def run() -> None:
        async for index, out in fanin:
            finals[index] = out

    task = asyncio.create_task(run())
    try:
        if not await _first_of(task, receive):
            logger.info("client disconnected: request aborted")
            return None
        exc = task.exception()
        if exc is not None:
            raise engine_error(exc)
    finally:
        await fanin.close()
    return [f for f in finals if f is not None]


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse_events(chunks: AsyncIterator[str], tail: Callable[[], list[str]]) -> AsyncIterator[str]:
    """The chunks, then tail() (e.g. a usage chunk), then [DONE]. The headers are sent by then: an engine error is
    reported as an error event, then [DONE]."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as e:  # noqa: BLE001
        yield sse(engine_error(e).body())
        yield SSE_DONE
        return
    for chunk in tail():
        yield chunk
    yield SSE_DONE


class SSEResponse(StreamingResponse):
    """text/event-stream from an async iterator of str events; a client disconnect closes the iterator at once."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content=events, status_code=200, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.on_close = events, on_close

    async def __call__(self, scope: dict, receive: Receive, send: Callable) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pump_task = asyncio.create_task(pump())
        try:
            if await _first_of(pump_task, receive):
                exc = pump_task.exception()
                if exc is not None and not isinstance(exc, OSError):  # OSError: the client went away
                    raise exc
        finally:
            await self.on_close()
