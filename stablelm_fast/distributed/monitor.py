"""Whether the tensor-parallel group can still run, and (spawn mode) starting the worker processes and watching them.

spawn_worker starts a rank as a fresh interpreter (`python -m stablelm_fast.distributed.worker`). A monitor thread waits on every worker's status pipe and process sentinel. When a worker dies it records why (the
traceback the worker sent, else its exit code / signal), marks the group dead and kills the other workers, so that a
collective the driver is blocked in fails at once ("connection closed by peer"); the compute timeout is the last
resort. Whatever failed, `is_dead` stays True from then on: the ranks are out of step and cannot be resynchronized.
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

from stablelm_fast.distributed.protocol import encode_worker_spec, parse_status


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


class WorkerHandle:
    """The driver's end of one spawned worker process (`python -m stablelm_fast.distributed.worker`).

    Its stdin is the worker's lifeline (closing it, or the driver dying, makes the worker exit); its status pipe
    carries JSON lines (protocol.status_line); a pidfd (where the OS has them) becomes readable when it exits."""

    def __init__(self, rank: int, proc: subprocess.Popen, status_fd: int) -> None:
        self.rank, self.proc, self.status_fd = rank, proc, status_fd
        os.set_blocking(status_fd, False)
        self.sentinel: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                self.sentinel = os.pidfd_open(proc.pid)
            except OSError:  # an old kernel: the status pipe's EOF tells of the exit instead
                pass
        self._buf = b""
        self.status_open = True

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def join(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        self.proc.kill()

    def terminate(self) -> None:
        self.proc.terminate()

    def read_status(self) -> list[tuple[str, str | None]]:
        """The complete status lines that have arrived (never blocks); status_open turns False at EOF."""
        out = []
        while self.status_open:
            try:
                data = os.read(self.status_fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self.status_open = False
                break
            self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            try:
                out.append(parse_status(line))
            except ValueError:
                pass
        return out

    def close(self) -> None:
        for fd in (self.status_fd, self.sentinel):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.status_fd = self.sentinel = None


def spawn_worker(rank: int, size: int, port: int, runner_args: dict) -> WorkerHandle:
    """Start tensor-parallel rank `rank` as a fresh interpreter running the worker module, so that the user's main
    module is never re-imported (a script needs no `if __name__ == "__main__":` guard)."""
    status_r, status_w = os.pipe()
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds stablelm_fast/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "stablelm_fast.distributed.worker"], stdin=subprocess.PIPE,
                                pass_fds=(status_w,), env=env)
    finally:
        os.close(status_w)  # the worker holds the only write end: EOF when it exits
    try:
        proc.stdin.write(encode_worker_spec(rank, size, "127.0.0.1", port, status_w, runner_args))
        proc.stdin.flush()
    except OSError:
        pass  # it died at once: the monitor reports its exit
    return WorkerHandle(rank, proc, status_r)


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
    def procs(self) -> list[WorkerHandle]:
        return list(self.workers)

    def start(self) -> None:
        """Start watching self.workers."""
        self._wake_r, self._wake_w = os.pipe()
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
        """Stop watching, then end every worker: stdin EOF, then SIGTERM, then SIGKILL. Call close() first."""
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        for w in self.workers:
            try:
                w.proc.stdin.close()  # EOF: a worker that missed the stop command exits on it
            except OSError:
                pass
        for w in self.workers:
            w.join(timeout=5.0)
            if w.is_alive():
                w.terminate()
                w.join(timeout=2.0)
            if w.is_alive():
                w.kill()
                w.join(timeout=2.0)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        for w in self.workers:
            w.close()
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None

    # ---- the monitor thread ------------------------------------------------------------------------------------------

    def _watch(self) -> None:
        status = {w.status_fd: w for w in self.workers}
        sentinels = {w.sentinel: w for w in self.workers if w.sentinel is not None}
        while True:
            try:
                ready = mpc.wait(list(status) + list(sentinels) + [self._wake_r])
            except OSError:
                return
            if self._wake_r in ready or self._closed:
                return
            for fd in ready:
                if fd in status:
                    worker = status[fd]
                    self._record(worker, worker.read_status())
                    if not worker.status_open:
                        status.pop(fd)
                        if worker.sentinel is None:  # no pidfd: the pipe's EOF is the exit
                            self._on_death(worker)
            for fd in ready:
                if fd in sentinels:
                    self._on_death(sentinels.pop(fd))

    def _record(self, worker: WorkerHandle, messages: list[tuple[str, str | None]]) -> None:
        with self._cond:
            for kind, text in messages:
                if kind == "loaded":
                    self._loaded.add(worker.rank)
                elif kind == "error":
                    self._errors.setdefault(worker.rank, text or "")
            self._cond.notify_all()

    def _on_death(self, worker: WorkerHandle) -> None:
        if self._closed:
            return
        worker.join(timeout=1.0)
        self._record(worker, worker.read_status())  # a traceback it sent just before exiting
        error = self._errors.get(worker.rank)
        self.mark_dead(f"tensor-parallel worker rank {worker.rank} (pid {worker.pid}) "
                       f"{describe_exit(worker.exitcode)}" + ("" if error is None else f":\n{error}"))
        self.kill_workers()
