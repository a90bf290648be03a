"""AsyncLLM: the engine for asyncio servers. One engine loop (a thread) serves every concurrent request.

The event loop never blocks on the model: requests and aborts are validated in the caller's thread and handed to the
engine thread through an inbox; outputs come back through one asyncio.Queue per request.

    engine = AsyncLLM(model_dir)
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.outputs[0].text)     # cumulative text so far
    await engine.abort("r1")           # at any moment, from anywhere
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import Any, AsyncIterator

from stablelm_fast.engine.exceptions import EngineDeadError
from stablelm_fast.engine.input_processor import ProcessedPrompt
from stablelm_fast.engine.llm_engine import EngineArgs, LLMEngine
from stablelm_fast.engine.stats import EngineStats
from stablelm_fast.outputs import RequestOutput
from stablelm_fast.sampling_params import SamplingParams


class AsyncLLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.model = model  # the checkpoint path (the server's default served model name)
        kwargs.setdefault("disable_log_stats", False)  # a server logs its throughput and load periodically
        self.engine = LLMEngine(EngineArgs(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self.config = self.engine.config
        self.max_model_len = self.engine.max_model_len
        self.input_processor = self.engine.input_processor
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._ids = itertools.count()
        self._stopped = threading.Event()
        self.dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="stablelm-fast-engine", daemon=True)
        self._thread.start()

    # ---- public API ------------------------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.dead_error is None

    async def generate(self, prompt: str | dict | ProcessedPrompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative RequestOutputs until the request finishes. Bad input raises ValueError at once.
        A ProcessedPrompt (from self.input_processor) is taken as validated, with its own params."""
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self.dead_error!r}")
        if not isinstance(prompt, ProcessedPrompt):
            prompt = self.input_processor.process(prompt, sampling_params)
        request_id = request_id or f"req-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already running")
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._inbox.put(("add", request_id, prompt))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            if not finished:  # the consumer went away (client disconnect, cancellation): free its blocks
                self._inbox.put(("abort", request_id))

    def stats(self) -> "EngineStats":
        """A snapshot of the engine's load and counters (read from the caller's thread)."""
        return self.engine.stats()

    def drain_finished(self) -> list:
        """Finished requests' latencies since the last call (engine/stats.FinishedRequest), oldest first."""
        out = []
        while True:
            try:
                out.append(self.engine.finished.popleft())
            except IndexError:
                return out

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped.set()
        self._inbox.put(("stop",))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self.engine.shutdown()

    # ---- the engine thread -----------------------------------------------------------------------------------------

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._streams_lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.put_nowait, item)
            except RuntimeError:  # that event loop is closed
                pass

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                cmd = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if cmd[0] == "add":
                _, request_id, prompt = cmd
                try:
                    self.engine.add_request(prompt, request_id=request_id)
                except Exception as e:  # validated already; anything else fails this request alone
                    self._deliver(request_id, e)
            elif cmd[0] == "abort":
                out = self.engine.abort_request(cmd[1])
                if out is not None:
                    self._deliver(cmd[1], out)
            elif cmd[0] == "stop":
                return

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._drain_inbox(block=not self.engine.has_unfinished_requests())
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001
                # the step failed: fail the requests it was serving, keep serving new ones (unless the executor died)
                for rid in list(self.engine.requests):
                    self.engine.abort_request(rid)
                    self._deliver(rid, RuntimeError(f"engine step failed: {e!r}"))
                if self.engine.executor.is_dead:
                    self.dead_error = e
                    self._fail_streams(EngineDeadError(f"the engine died: {e!r}"))
                    return
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
        self._fail_streams(EngineDeadError("the engine was shut down"))

    def _fail_streams(self, error: BaseException) -> None:
        with self._streams_lock:
            ids = list(self._streams)
        for rid in ids:
            self._deliver(rid, error)
