"""Comm: one rank's two process groups and the collectives over them.

* control (gloo, CPU tensors, a very long timeout: workers wait in it while the server is idle): the driver's command
  broadcasts (distributed/protocol.py) and status flags. Gloo also works across hosts.
* compute (gloo on CPU, NCCL on CUDA, a finite timeout): the model's all-reduces and the lm_head all-gather, handed to
  the model as a TPInfo.

Spawn mode builds both groups from the driver's TCPStore (several executors can live in one process: no global
`init_process_group`); attach mode (torchrun) makes new groups over the world torchrun created.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from stablelm_fast.layers.parallel import TPInfo

# Workers idle in a control broadcast for as long as the server has no request: effectively never time out.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


def compute_timeout() -> datetime.timedelta:
    """How long one model collective may wait for a peer (a hung, not crashed, rank). STABLELM_FAST_TP_TIMEOUT s."""
    return datetime.timedelta(seconds=float(os.environ.get("STABLELM_FAST_TP_TIMEOUT", "300")))


def local_rank() -> int:
    """This process's rank on its host under torchrun (LOCAL_RANK; 0 elsewhere): the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """How many ranks torchrun started on this host (LOCAL_WORLD_SIZE; 1 elsewhere)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def set_cpu_threads(device: torch.device, ranks_on_host: int) -> int | None:
    """On CPU the ranks share the host's cores: give each an equal part. -> the previous count (to restore)."""
    if device.type != "cpu":
        return None
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_on_host))
    return prev


class Comm:
    """One rank's two process groups. Created before the model (TPInfo needs its methods), connected after loading."""

    def __init__(self, rank: int, size: int, device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.control = None  # gloo: command headers/payloads, status flags
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

    def run_counting_failures(self, run: Callable[[], Any]) -> tuple[Any, int]:
        """Every rank runs `run()`, then all join one status all-reduce, so the ranks stay in step whatever happens:
        -> (run's result, how many ranks failed). This rank's own exception is re-raised after the all-reduce."""
        error, result = None, None
        try:
            result = run()
        except Exception as e:
            error = e
        failed = self.sum_flags(int(error is not None))
        if error is not None:
            raise error
        return result, failed

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
