"""TPExecutor: tensor parallelism across processes, behind the engine's Executor protocol (engine/executor.py).

The driver (rank 0, the engine's process) owns one shard. Two ways to get the other ranks:

* spawn (one host, the default): the driver starts `tp_size - 1` worker processes, fresh interpreters running
  `python -m stablelm_fast.distributed.worker` (so a user's script needs no main guard: it is never re-imported).
  Each worker's stdin is its lifeline (it exits at once at EOF, i.e. when the driver process is gone, however it
  died) and a status pipe carries its load status and error tracebacks, watched by a WorkerMonitor (monitor.py).
  The driver hosts a TCPStore on a free localhost port and builds the process groups (comm.py) straight from it, so
  several executors can live in one process.
* attach (torchrun, several hosts; see `stablelm_fast.distributed.launch`): `torch.distributed` is already
  initialized; the driver is global rank 0 and the other ranks run `worker.run_attached`.

Each step the driver broadcasts the StepInput (distributed/protocol.py) and every rank runs `runner.execute(step)`.
Any exception during a command marks the group dead (the ranks are out of step); after that `execute` raises
RuntimeError immediately.
"""

from __future__ import annotations

import atexit
import datetime
import os
import threading
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist

from stablelm_fast.config import ModelConfig, resolve_device
from stablelm_fast.distributed.comm import Comm, local_rank, local_world_size, set_cpu_threads
from stablelm_fast.distributed.monitor import WorkerMonitor, spawn_worker
from stablelm_fast.distributed.protocol import CMD_ALLOC, CMD_STOP, command_header, encode_step
from stablelm_fast.engine.model_runner import ModelRunner
from stablelm_fast.engine.step_input import StepInput
from stablelm_fast.layers.parallel import TPInfo, head_shard, split_range


def load_timeout() -> float:
    """How long the driver waits for spawned workers to load their shards. STABLELM_FAST_TP_LOAD_TIMEOUT s."""
    return float(os.environ.get("STABLELM_FAST_TP_LOAD_TIMEOUT", "1800"))


_LIVE: "weakref.WeakSet[TPExecutor]" = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for ex in list(_LIVE):
        try:
            ex.shutdown()
        except Exception:
            pass


class TPExecutor:
    """The engine's executor when tensor_parallel_size > 1 (the Executor protocol, as ModelRunner)."""

    def __init__(self, config: ModelConfig, model_dir: str | None, load_format: str, dtype: torch.dtype,
                 device: torch.device, backend: str, tp_size: int, seed: int = 0,
                 quantization: dict | None = None) -> None:
        self.config, self.tp_size = config, tp_size
        self.monitor = WorkerMonitor()
        self._closed = False
        self._lock = threading.Lock()  # one command at a time on the control group
        self._prev_threads = None
        self._store = None
        # NOTE: sharding errors (tp_size not dividing heads, ...) surface here, before any process is started.
        head_shard(config.num_attention_heads, config.num_key_value_heads, TPInfo(0, tp_size))
        split_range(config.intermediate_size, TPInfo(0, tp_size), "intermediate_size")

        self.attached = dist.is_available() and dist.is_initialized()
        if self.attached:
            if dist.get_rank() != 0 or dist.get_world_size() != tp_size:
                raise ValueError(f"torch.distributed is initialized with rank {dist.get_rank()} of "
                                 f"{dist.get_world_size()}: the engine runs on rank 0 of a world of "
                                 f"tensor_parallel_size={tp_size} processes")
            device = resolve_device(device.type, local_rank())
            self.ranks_on_host = local_world_size()
        else:
            if device.type == "cuda" and torch.cuda.device_count() < tp_size:
                raise ValueError(f"tensor_parallel_size {tp_size} needs {tp_size} GPUs; "
                                 f"{torch.cuda.device_count()} visible")
            device = resolve_device(device.type, 0)
            self.ranks_on_host = tp_size
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        self.comm = Comm(0, tp_size, device)
        runner_args = dict(config=config, model_dir=model_dir, load_format=load_format, dtype=dtype,
                           device=device, backend=backend, seed=seed, quantization=quantization)
        _LIVE.add(self)
        try:
            if self.attached:
                self._start_attached(runner_args)
            else:
                self._start_spawned(runner_args)
        except BaseException as e:
            self.monitor.mark_dead(f"start-up failed: {e!r}")
            self.shutdown()
            raise

    @property
    def is_dead(self) -> bool:
        return self.monitor.is_dead

    @property
    def dead_reason(self) -> str | None:
        return self.monitor.dead_reason

    # ---- start-up ---------------------------------------------------------------------------------------------------

    def _start_attached(self, runner_args: dict) -> None:
        self.comm.connect_world()
        self._prev_threads = set_cpu_threads(self.device, self.ranks_on_host)
        self.runner, failed = self.comm.run_counting_failures(
            lambda: ModelRunner(tp=self.comm.tp_info(), **runner_args))
        if failed:
            self.monitor.mark_dead(f"{failed} tensor-parallel worker rank(s) failed to load the model "
                                   f"(see their logs)")
            raise RuntimeError(self.dead_reason)

    def _start_spawned(self, runner_args: dict) -> None:
        # port 0: the OS picks a free port, no race between choosing and binding it
        store = dist.TCPStore("127.0.0.1", 0, self.tp_size, True, timeout=datetime.timedelta(seconds=120),
                              wait_for_workers=False)
        for rank in range(1, self.tp_size):
            args = dict(runner_args, device=resolve_device(self.device.type, rank))
            self.monitor.workers.append(spawn_worker(rank, self.tp_size, store.port, args))
        self.monitor.start()
        self._prev_threads = set_cpu_threads(self.device, self.ranks_on_host)
        # the driver loads its shard while the workers load theirs
        self.runner = ModelRunner(tp=self.comm.tp_info(), **runner_args)
        self.monitor.wait_loaded(load_timeout())
        self.comm.connect_store(store)
        self._store = store  # keep the store server alive as long as the groups

    # ---- the executor interface -------------------------------------------------------------------------------------

    def enable_cuda_graphs(self, max_batch: int, max_blocks_per_seq: int) -> None:
        """Not yet under tensor parallelism: every rank runs the model eagerly."""

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one block costs in the memory the budget is taken from: on CPU every rank of this host takes its
        part from the same RAM; on CUDA each rank has its own GPU."""
        per_rank = self.runner.kv_bytes_per_block(block_size)
        return per_rank * (self.ranks_on_host if self.device.type == "cpu" else 1)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self._run_command(command_header(CMD_ALLOC, num_blocks, block_size), None,
                          lambda: self.runner.allocate_kv_cache(num_blocks, block_size), check_status=True)
        self.num_blocks = num_blocks

    def execute(self, step: StepInput) -> torch.Tensor | None:
        header, payload = encode_step(step)
        return self._run_command(header, payload, lambda: self.runner.execute(step))

    def _check_alive(self) -> None:
        if self.is_dead:
            raise RuntimeError(f"the tensor-parallel executor is dead: {self.dead_reason}")
        if self._closed:
            raise RuntimeError("the tensor-parallel executor was shut down")

    def _run_command(self, header: torch.Tensor, payload: torch.Tensor | None, run: Callable[[], Any],
                     check_status: bool = False) -> Any:
        """Broadcast the command, run it here as the workers do; check_status: all ranks then agree it worked."""
        self._check_alive()
        with self._lock:
            self._check_alive()
            try:
                self.comm.broadcast(header)
                if payload is not None:
                    self.comm.broadcast(payload)
                if not check_status:
                    return run()
                result, failed = self.comm.run_counting_failures(run)
                if failed:
                    raise RuntimeError(f"{failed} tensor-parallel worker rank(s) failed this command")
                return result
            except BaseException as e:
                self.monitor.fail(f"rank 0 failed: {e!r}")
                if not isinstance(e, Exception):
                    raise
                raise RuntimeError(f"tensor-parallel step failed: {self.dead_reason}") from e

    # ---- shutdown ------------------------------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.monitor.procs]

    def shutdown(self) -> None:
        """Stop the workers (stop command, then pipe EOF, then SIGTERM / SIGKILL) and drop the groups. Idempotent."""
        if self._closed:
            return
        healthy = not self.is_dead and self.comm.connected
        self._closed = True
        self.monitor.close()
        _LIVE.discard(self)
        if healthy and self._lock.acquire(timeout=5.0):
            try:
                self.comm.broadcast(command_header(CMD_STOP))
            except Exception:
                pass
            finally:
                self._lock.release()
        self.monitor.stop_workers()
        self.comm.close()
        self._store = None
        if self._prev_threads is not None:
            torch.set_num_threads(self._prev_threads)
            self._prev_threads = None

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
