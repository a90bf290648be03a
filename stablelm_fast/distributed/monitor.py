"""Whether the tensor-parallel group can still run, and (spawn mode) the thread that watches the worker processes.

A monitor thread waits on every worker's status pipe and process sentinel. When a worker dies it records why (the
traceback the worker sent, else its exit code / signal), marks the group dead and kills the other workers, so that a
collective the driver is blocked in fails at once ("connection closed by peer"); the compute timeout is the last
resort. Whatever failed, `is_dead` stays True from then on: the ranks are out of step and cannot be resynchronized.
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any


def describe_exit(code: int | None) -> str:
    """A process's exit code as words: 'exited with code 1', 'was killed by signal SIGKILL'."""
    if code is None:
        return "is gone"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def format_exception(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip()


@dataclass
class WorkerHandle:
    """The driver's end of one spawned worker."""

    rank: int
    proc: Any  # multiprocessing.Process
    to_worker: Any  # Connection, write end: the worker exits when it sees EOF (this end closed or the driver gone)
    from_worker: Any  # Connection, read end: ("loaded",) once the shard is loaded, ("error", traceback) on failure


class WorkerMonitor:
    """The group's health (is_dead, dead_reason) and, in spawn mode, the watch over the worker processes."""

    def __init__(self) -> None:
        self.workers: list[WorkerHandle] = []
        self.is_dead = False
        self.dead_reason: str | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._loaded: set[int] = set()
        self._errors: dict[int, str] = {}
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = None

    @property
    def procs(self) -> list:
        return [w.proc for w in self.workers]

    def start(self, ctx: Any) -> None:
        """Start watching self.workers (ctx: the multiprocessing context that made them)."""
        self._wake_r, self._wake_w = ctx.Pipe(duplex=False)
        self._thread = threading.Thread(target=self._watch, name="stablelm-fast-tp-monitor", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float) -> None:
        """Block until every worker reported its shard loaded; RuntimeError if one died or `timeout` s passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._loaded) < len(self.workers) and not self.is_dead:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.mark_dead(f"tensor-parallel workers did not load the model within {timeout:.0f} s")
                    break
                self._cond.wait(min(left, 1.0))
        if self.is_dead:
            raise RuntimeError(self.dead_reason)

    def mark_dead(self, reason: str) -> None:
        """The first reason given is kept."""
        with self._cond:
            if not self.is_dead:
                self.is_dead, self.dead_reason = True, reason
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        """A command failed on the driver: the group cannot be used again. A peer's death usually shows up there
        first as "connection closed": wait briefly for the monitor to name the worker, else keep `reason`."""
        if self.workers and not self.is_dead:
            with self._cond:
                self._cond.wait_for(lambda: self.is_dead, timeout=2.0)
        self.mark_dead(reason)
        self.kill_workers()

    def kill_workers(self) -> None:
        for p in self.procs:
            if p.is_alive():
                try:
                    p.kill()
                except (OSError, ValueError):
                    pass

    def close(self) -> None:
        """Shutting down: deaths from now on are expected, not failures."""
        self._closed = True

    def stop_workers(self) -> None:
        """Stop watching, then end every worker: pipe EOF, then SIGTERM, then SIGKILL. Call close() first."""
        if self._wake_w is not None:
            try:
                self._wake_w.send(None)
            except OSError:
                pass
        for w in self.workers:
            w.to_worker.close()  # EOF: a worker that missed the stop command exits on it
        for p in self.procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=2.0)
        for w in self.workers:
            w.from_worker.close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    # ---- the monitor thread ------------------------------------------------------------------------------------------

    def _watch(self) -> None:
        conns = {w.from_worker: w for w in self.workers}
        sentinels = {w.proc.sentinel: w for w in self.workers}
        while True:
            try:
                ready = mpc.wait(list(conns) + list(sentinels) + [self._wake_r])
            except OSError:
                return
            if self._wake_r in ready or self._closed:
                return
            for obj in ready:
                if obj in conns:
                    self._read_status(obj, conns)
            for obj in ready:
                if obj in sentinels:
                    self._on_death(sentinels.pop(obj))

    def _read_status(self, conn: Any, conns: dict) -> None:
        rank = conns[conn].rank
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            conns.pop(conn, None)
            return
        with self._cond:
            if msg[0] == "loaded":
                self._loaded.add(rank)
            elif msg[0] == "error":
                self._errors.setdefault(rank, msg[1])
            self._cond.notify_all()

    def _on_death(self, worker: WorkerHandle) -> None:
        if self._closed:
            return
        worker.proc.join(timeout=1.0)
        try:  # a traceback it sent just before exiting
            while worker.from_worker.poll(0):
                msg = worker.from_worker.recv()
                if msg[0] == "error":
                    self._errors.setdefault(worker.rank, msg[1])
        except (EOFError, OSError):
            pass
        error = self._errors.get(worker.rank)
        self.mark_dead(f"tensor-parallel worker rank {worker.rank} (pid {worker.proc.pid}) "
                       f"{describe_exit(worker.proc.exitcode)}" + ("" if error is None else f":\n{error}"))
        self.kill_workers()
