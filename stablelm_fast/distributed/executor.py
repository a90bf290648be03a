"""TPExecutor: tensor parallelism across processes. The driver (rank 0, the engine's process) owns one shard.

Two ways to get the other ranks:

* spawn (one host, the default): the driver starts `tp_size - 1` worker processes (torch.multiprocessing "spawn",
  daemonic). Each gets two one-way pipes: driver -> worker (the worker exits at once when it reads EOF, i.e. when the
  driver process is gone, however it died) and worker -> driver (load status and error tracebacks). The driver
  hosts a TCPStore on a free localhost port and builds its process groups straight from it, so several executors
  can live in one process (no global `init_process_group`).
* attach (torchrun, several hosts; see `stablelm_fast.distributed.launch`): `torch.distributed` is already
  initialized; the driver is global rank 0 and the other ranks run `worker.run_attached`.

Every rank has two process groups:

* control (gloo, CPU tensors, a very long timeout: workers wait in it while the server is idle). Each step the
  driver broadcasts a fixed int64 header [cmd, sizes..., payload_len] and then one flat int64 payload holding every
  StepInput tensor; every rank then runs `runner.execute(step)`. This also works across hosts.
* compute (gloo on CPU, NCCL on CUDA, a finite timeout): the model's all-reduces and the lm_head all-gather.

Failures: a monitor thread watches the worker processes. When one dies it records why (its traceback if it sent
one, else its exit code / signal), marks the executor dead and kills the other workers, so that a collective the
driver is blocked in fails at once ("connection closed by peer"); the compute timeout is the last resort.
After that, `execute` raises RuntimeError immediately. Any exception during a step also kills the group: the
ranks are out of step and cannot be resynchronized.
"""

from __future__ import annotations

import atexit
import datetime
import multiprocessing.connection as mpc
import os
import signal
import threading
import time
import traceback
import weakref

import torch
import torch.distributed as dist

from stablelm_fast.config import ModelConfig
from stablelm_fast.engine.model_runner import ModelRunner
from stablelm_fast.engine.step_input import StepInput
from stablelm_fast.layers.parallel import TPInfo, head_shard, split_range

CMD_STEP, CMD_ALLOC, CMD_STOP = 1, 2, 3
HEADER_LEN = 8  # [cmd, T, B, max_blocks, S, is_decode, max_q_len, payload_len]

# Workers idle in a control broadcast for as long as the server has no request: effectively never time out.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


def compute_timeout() -> datetime.timedelta:
    """How long one model collective may wait for a peer (a hung, not crashed, rank). STABLELM_FAST_TP_TIMEOUT s."""
    return datetime.timedelta(seconds=float(os.environ.get("STABLELM_FAST_TP_TIMEOUT", "300")))


def load_timeout() -> float:
    return float(os.environ.get("STABLELM_FAST_TP_LOAD_TIMEOUT", "1800"))


# ---- wire format of one command ------------------------------------------------------------------------------------

def encode_step(step: StepInput) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (header [HEADER_LEN] int64, payload [N] int64) holding every tensor of the step."""
    b, max_blocks = step.block_tables.shape
    parts = [step.input_ids, step.positions, step.slot_mapping, step.block_tables.reshape(-1), step.cu_seqlens_q,
             step.context_lens, step.logits_indices]
    payload = torch.cat([p.to(torch.int64) for p in parts])
    header = torch.tensor([CMD_STEP, step.input_ids.numel(), b, max_blocks, step.logits_indices.numel(),
                           int(step.is_decode), step.max_q_len, payload.numel()], dtype=torch.int64)
    return header, payload


def decode_step(header: torch.Tensor, payload: torch.Tensor) -> StepInput:
    _, t, b, max_blocks, s, is_decode, max_q_len, _ = (int(x) for x in header.tolist())
    sizes = [t, t, t, b * max_blocks, b + 1, b, s]
    ids, pos, slots, tables, cu, ctx, logits_idx = torch.split(payload, sizes)
    return StepInput(input_ids=ids, positions=pos, slot_mapping=slots,
                     block_tables=tables.reshape(b, max_blocks).to(torch.int32),
                     cu_seqlens_q=cu.to(torch.int32), context_lens=ctx.to(torch.int32), logits_indices=logits_idx,
                     is_decode=bool(is_decode), max_q_len=max_q_len)


def command_header(cmd: int, *args: int) -> torch.Tensor:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0] = cmd
    for i, a in enumerate(args):
        header[1 + i] = a
    return header


# ---- the collectives ----------------------------------------------------------------------------------------------

class Comm:
    """One rank's two process groups. Created before the model (TPInfo needs its methods), connected after loading."""

    def __init__(self, rank: int, size: int, device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.control = None  # gloo: step headers/payloads, status flags
        self.compute = None  # gloo (CPU) / NCCL (CUDA): the model's collectives
        self._owns_groups = False

    def tp_info(self) -> TPInfo:
        return TPInfo(rank=self.rank, size=self.size, all_reduce=self.all_reduce, all_gather=self.all_gather)

    def connect_store(self, store: dist.Store) -> None:
        """Spawn mode: build both groups from the driver's TCPStore (no global process group)."""
        control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), self.rank, self.size, CONTROL_TIMEOUT)
        if self.device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = compute_timeout()
            compute = dist.ProcessGroupNCCL(dist.PrefixStore("compute", store), self.rank, self.size, opts)
        else:
            compute = dist.ProcessGroupGloo(dist.PrefixStore("compute", store), self.rank, self.size,
                                            compute_timeout())
        self.control, self.compute, self._owns_groups = control, compute, True

    def connect_world(self) -> None:
        """Attach mode: new groups over the world torchrun created (every rank calls this in the same order)."""
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.compute = dist.new_group(backend="nccl" if self.device.type == "cuda" else "gloo",
                                      timeout=compute_timeout())

    @property
    def connected(self) -> bool:
        return self.control is not None

    def broadcast(self, t: torch.Tensor) -> None:
        """Control group, from rank 0, in place."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self.control.broadcast([t], opts).wait()

    def sum_flags(self, value: int) -> int:
        """Control group: sum an int over ranks (e.g. how many ranks failed)."""
        t = torch.tensor([value], dtype=torch.int64)
        self.control.allreduce([t]).wait()
        return int(t.item())

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        self.compute.allreduce([x]).wait()  # in place: the model hands over a fresh partial sum
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., size * n], rank order."""
        if x.numel() == 0:  # every rank has the same (empty) shape: nothing to exchange
            return x.new_empty(*x.shape[:-1], x.shape[-1] * self.size)
        x = x.contiguous()
        outs = [torch.empty_like(x) for _ in range(self.size)]
        self.compute.allgather([outs], [x]).wait()
        return torch.cat(outs, dim=-1)

    def close(self) -> None:
        """Drop the groups (spawn mode; the world's groups belong to whoever initialized torch.distributed)."""
        for pg in (self.compute, self.control):
            if pg is not None and self._owns_groups and hasattr(pg, "shutdown"):
                try:
                    pg.shutdown()
                except Exception:
                    pass
        self.control = self.compute = None


def set_cpu_threads(device: torch.device, ranks_on_host: int) -> int | None:
    """On CPU the ranks share the host's cores: give each an equal part. -> the previous count (to restore)."""
    if device.type != "cpu":
        return None
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_on_host))
    return prev


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


_LIVE: "weakref.WeakSet[TPExecutor]" = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for ex in list(_LIVE):
        try:
            ex.shutdown()
        except Exception:
            pass


class TPExecutor:
    """The engine's executor when tensor_parallel_size > 1: same interface as ModelRunner (kv_bytes_per_block,
    allocate_kv_cache, execute), plus is_dead and shutdown()."""

    def __init__(self, config: ModelConfig, model_dir: str | None, load_format: str, dtype: torch.dtype,
                 device: torch.device, backend: str, tp_size: int, seed: int = 0) -> None:
        self.config, self.tp_size = config, tp_size
        self.is_dead = False
        self.dead_reason: str | None = None
        self._closed = False
        self._lock = threading.Lock()  # one command at a time on the control group
        self._procs: list = []  # spawn mode: worker rank r is self._procs[r - 1]
        self._to_workers: list = []
        self._from_workers: list = []
        self._worker_errors: dict[int, str] = {}
        self._loaded: set[int] = set()
        self._cond = threading.Condition()
        self._monitor: threading.Thread | None = None
        self._wake_r = self._wake_w = None
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
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            self.ranks_on_host = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        else:
            if device.type == "cuda":
                if torch.cuda.device_count() < tp_size:
                    raise ValueError(f"tensor_parallel_size {tp_size} needs {tp_size} GPUs; "
                                     f"{torch.cuda.device_count()} visible")
                device = torch.device("cuda", 0)
            self.ranks_on_host = tp_size
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        self.comm = Comm(0, tp_size, device)
        runner_args = dict(config=config, model_dir=model_dir, load_format=load_format, dtype=dtype,
                           device=device, backend=backend, seed=seed)
        _LIVE.add(self)
        try:
            if self.attached:
                self._start_attached(runner_args)
            else:
                self._start_spawned(runner_args)
        except BaseException as e:
            self._mark_dead(f"start-up failed: {e!r}")
            self.shutdown()
            raise

    # ---- start-up ---------------------------------------------------------------------------------------------------

    def _start_attached(self, runner_args: dict) -> None:
        self.comm.connect_world()
        self._prev_threads = set_cpu_threads(self.device, self.ranks_on_host)
        error = None
        try:
            self.runner = ModelRunner(tp=self.comm.tp_info(), **runner_args)
        except Exception as e:
            error = e
        failed = self.comm.sum_flags(int(error is not None))
        if error is not None:
            raise error
        if failed:
            self._mark_dead(f"{failed} tensor-parallel worker rank(s) failed to load the model (see their logs)")
            raise RuntimeError(self.dead_reason)

    def _start_spawned(self, runner_args: dict) -> None:
        import torch.multiprocessing as mp

        from stablelm_fast.distributed.worker import spawned_worker_main

        # port 0: the OS picks a free port, no race between choosing and binding it
        store = dist.TCPStore("127.0.0.1", 0, self.tp_size, True, timeout=datetime.timedelta(seconds=120),
                              wait_for_workers=False)
        ctx = mp.get_context("spawn")
        for rank in range(1, self.tp_size):
            to_w_r, to_w_w = ctx.Pipe(duplex=False)
            from_w_r, from_w_w = ctx.Pipe(duplex=False)
            dev = torch.device("cuda", rank) if self.device.type == "cuda" else self.device
            proc = ctx.Process(target=spawned_worker_main, name=f"stablelm-fast-tp{rank}", daemon=True,
                               args=(rank, self.tp_size, "127.0.0.1", store.port, to_w_r, from_w_w,
                                     dict(runner_args, device=dev)))
            proc.start()
            to_w_r.close()  # the worker holds the only read end: it sees EOF when this process goes away
            from_w_w.close()
            self._procs.append(proc)
            self._to_workers.append(to_w_w)
            self._from_workers.append(from_w_r)
        self._wake_r, self._wake_w = ctx.Pipe(duplex=False)
        self._monitor = threading.Thread(target=self._watch_workers, name="stablelm-fast-tp-monitor", daemon=True)
        self._monitor.start()
        self._prev_threads = set_cpu_threads(self.device, self.ranks_on_host)
        # the driver loads its shard while the workers load theirs
        self.runner = ModelRunner(tp=self.comm.tp_info(), **runner_args)
        deadline = time.monotonic() + load_timeout()
        with self._cond:
            while len(self._loaded) < self.tp_size - 1 and not self.is_dead:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._mark_dead(f"tensor-parallel workers did not load the model within {load_timeout():.0f} s")
                    break
                self._cond.wait(min(left, 1.0))
        if self.is_dead:
            raise RuntimeError(self.dead_reason)
        self.comm.connect_store(store)
        self._store = store  # keep the store server alive as long as the groups

    def _watch_workers(self) -> None:
        """Monitor thread (spawn mode): status messages and deaths of the workers."""
        conns = {c: r for r, c in enumerate(self._from_workers, start=1)}
        sentinels = {p.sentinel: r for r, p in enumerate(self._procs, start=1)}
        while True:
            waitables = list(conns) + list(sentinels) + [self._wake_r]
            try:
                ready = mpc.wait(waitables)
            except OSError:
                return
            if self._wake_r in ready or self._closed:
                return
            for obj in ready:
                if obj in conns:
                    self._read_status(obj, conns)
            for obj in ready:
                if obj in sentinels:
                    rank = sentinels.pop(obj)
                    self._on_worker_death(rank)

    def _read_status(self, conn, conns: dict) -> None:
        rank = conns[conn]
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            conns.pop(conn, None)
            return
        with self._cond:
            if msg[0] == "loaded":
                self._loaded.add(rank)
            elif msg[0] == "error":
                self._worker_errors.setdefault(rank, msg[1])
            self._cond.notify_all()

    def _on_worker_death(self, rank: int) -> None:
        if self._closed:
            return
        proc = self._procs[rank - 1]
        proc.join(timeout=1.0)
        conn = self._from_workers[rank - 1]
        try:  # a traceback it sent just before exiting
            while conn.poll(0):
                msg = conn.recv()
                if msg[0] == "error":
                    self._worker_errors.setdefault(rank, msg[1])
        except (EOFError, OSError):
            pass
        reason = (f"tensor-parallel worker rank {rank} (pid {proc.pid}) {_describe_exit(proc.exitcode)}"
                  + ("" if rank not in self._worker_errors else f":\n{self._worker_errors[rank]}"))
        self._mark_dead(reason)
        self._kill_workers()

    def _mark_dead(self, reason: str) -> None:
        with self._cond:
            if not self.is_dead:
                self.is_dead, self.dead_reason = True, reason
            self._cond.notify_all()

    def _kill_workers(self) -> None:
        for p in self._procs:
            if p.is_alive():
                try:
                    p.kill()
                except (OSError, ValueError):
                    pass

    # ---- the executor interface -------------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.is_dead:
            raise RuntimeError(f"the tensor-parallel executor is dead: {self.dead_reason}")
        if self._closed:
            raise RuntimeError("the tensor-parallel executor was shut down")

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

    def _run_command(self, header: torch.Tensor, payload: torch.Tensor | None, run, check_status: bool = False):
        self._check_alive()
        with self._lock:
            self._check_alive()
            try:
                self.comm.broadcast(header)
                if payload is not None:
                    self.comm.broadcast(payload)
                error = None
                try:
                    result = run()
                except Exception as e:
                    if not check_status:
                        raise
                    error, result = e, None
                if check_status:
                    failed = self.comm.sum_flags(int(error is not None))
                    if error is not None:
                        raise error
                    if failed:
                        raise RuntimeError(f"{failed} tensor-parallel worker rank(s) failed this command")
                return result
            except BaseException as e:
                self._fail(e)
                if not isinstance(e, Exception):
                    raise
                raise RuntimeError(f"tensor-parallel step failed: {self.dead_reason}") from e

    def _fail(self, exc: BaseException) -> None:
        """The ranks are out of step after any failure inside a command: the group cannot be used again."""
        if self._procs and not self.is_dead:
            # a peer's death usually shows up here first as "connection closed": let the monitor name the worker
            with self._cond:
                self._cond.wait_for(lambda: self.is_dead, timeout=2.0)
        self._mark_dead(f"rank 0 failed: {exc!r}")
        self._kill_workers()

    # ---- shutdown ------------------------------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def shutdown(self) -> None:
        """Stop the workers (stop command, then pipe EOF, then SIGTERM / SIGKILL) and drop the groups. Idempotent."""
        if self._closed:
            return
        healthy = not self.is_dead and self.comm.connected
        self._closed = True
        _LIVE.discard(self)
        if healthy and self._lock.acquire(timeout=5.0):
            try:
                self.comm.broadcast(command_header(CMD_STOP))
            except Exception:
                pass
            finally:
                self._lock.release()
        if self._wake_w is not None:
            try:
                self._wake_w.send(None)
            except OSError:
                pass
        for conn in self._to_workers:
            conn.close()  # EOF: a worker that missed the stop command exits on it
        for p in self._procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=2.0)
        for conn in self._from_workers:
            conn.close()
        if self._monitor is not None:
            self._monitor.join(timeout=2.0)
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


def format_exception(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip()
