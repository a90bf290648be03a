"""The tensor-parallel worker: a rank > 0. It holds one shard of the model and its KV cache and mirrors the driver:

    loop: receive a header from rank 0 (control group broadcast)
          STEP  -> receive the payload, run runner.execute(step) (joining the model's collectives), repeat
          ALLOC -> allocate the KV cache, report success in a status all-reduce, repeat
          STOP  -> return

The logits are only used on the driver; a worker's copy is dropped. Any exception ends the worker (after telling the
driver why): the ranks would be out of step, and the driver's monitor turns the death into a clear error.
"""

from __future__ import annotations

import os
import sys
import threading

import torch

from stablelm_fast.config import resolve_device
from stablelm_fast.distributed.comm import Comm, local_rank, local_world_size, set_cpu_threads
from stablelm_fast.distributed.monitor import format_exception
from stablelm_fast.distributed.protocol import (CMD_ALLOC, CMD_STEP, CMD_STOP, HEADER_LEN, PAYLOAD_LEN, decode_step,
                                                decode_worker_spec, status_line)
from stablelm_fast.engine.model_runner import ModelRunner


def worker_loop(runner: ModelRunner, comm: Comm) -> None:
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    while True:
        comm.broadcast(header)
        cmd = int(header[0])
        if cmd == CMD_STOP:
            return
        if cmd == CMD_STEP:
            payload = torch.empty(int(header[PAYLOAD_LEN]), dtype=torch.int64)
            comm.broadcast(payload)
            runner.execute(decode_step(header, payload))
        elif cmd == CMD_ALLOC:  # the driver learns from the status all-reduce whether every rank succeeded
            num_blocks, block_size = int(header[1]), int(header[2])
            comm.run_counting_failures(lambda: runner.allocate_kv_cache(num_blocks, block_size))
        else:
            raise RuntimeError(f"unknown tensor-parallel command {cmd}")


def _watch_driver(stream) -> None:
    """Exit as soon as the driver's end of stdin closes (driver shut down, crashed or was killed)."""
    try:
        while stream.read(4096):
            pass
    except (OSError, ValueError):
        pass
    os._exit(0)


def spawned_worker_main(rank: int, size: int, host: str, port: int, status_fd: int, runner_args: dict) -> None:
    """A worker started by TPExecutor (spawn mode): load the shard, say so, serve the driver until STOP."""
    import torch.distributed as dist

    driver_pid = os.getppid()
    threading.Thread(target=_watch_driver, args=(sys.stdin.buffer,), name="stablelm-fast-driver-watch",
                     daemon=True).start()
    device = runner_args["device"]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    set_cpu_threads(device, size)
    comm = Comm(rank, size, device)
    try:
        runner = ModelRunner(tp=comm.tp_info(), **runner_args)
    except BaseException as e:
        _report(status_fd, f"failed to load the model:\n{format_exception(e)}")
        os._exit(1)
    os.write(status_fd, status_line("loaded"))
    try:
        store = dist.TCPStore(host, port, size, False)
        comm.connect_store(store)
        worker_loop(runner, comm)
    except BaseException as e:
        if os.getppid() != driver_pid:  # the driver is gone (its sockets closed first): nobody to tell
            os._exit(0)
        _report(status_fd, format_exception(e))
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # NOTE: skip interpreter teardown: the peers' sockets may already be gone


def _report(status_fd: int, text: str) -> None:
    try:
        os.write(status_fd, status_line("error", text))
    except OSError:
        pass
    print(f"stablelm-fast tensor-parallel worker: {text}", file=sys.stderr, flush=True)


def main() -> None:
    """`python -m stablelm_fast.distributed.worker`, started by the driver: the spec is the first line of stdin."""
    spec = decode_worker_spec(sys.stdin.buffer.readline())
    spawned_worker_main(spec["rank"], spec["size"], spec["host"], spec["port"], spec["status_fd"],
                        spec["runner_args"])


def run_attached(model_dir: str, dtype: str = "auto", device: str = "auto", load_format: str = "auto",
                 backend: str = "auto", seed: int = 0, quantization: str | None = None,
                 quantization_config: dict | None = None) -> None:
    """A rank > 0 under torchrun (torch.distributed already initialized): load the shard, serve the driver."""
    import torch.distributed as dist

    from stablelm_fast.config import ModelConfig, resolve_dtype
    from stablelm_fast.ops import resolve_backend
    from stablelm_fast.quantization import resolve_quant_config

    rank, size = dist.get_rank(), dist.get_world_size()
    config = ModelConfig.from_pretrained(model_dir)
    # NOTE: resolved exactly as LLMEngine does on rank 0, so every rank builds the same model
    dev = resolve_device(device, local_rank())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch_dtype = resolve_dtype(dtype, config, dev)
    backend = resolve_backend(backend, dev)
    quant = resolve_quant_config(quantization, quantization_config, model_dir, load_format)
    comm = Comm(rank, size, dev)
    comm.connect_world()
    set_cpu_threads(dev, local_world_size())
    runner, failed = comm.run_counting_failures(
        lambda: ModelRunner(config, None if load_format == "dummy" else model_dir, load_format, torch_dtype, dev,
                            backend, tp=comm.tp_info(), seed=seed,
                            quantization=quant.to_dict() if quant else None))
    if failed:
        raise SystemExit(f"rank {rank}: {failed} rank(s) failed to load the model")
    worker_loop(runner, comm)


if __name__ == "__main__":
    main()
