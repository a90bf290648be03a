"""Memory for the CPU backend's packed weights: what a decode step streams from DRAM, every token.

With STABLELM_FAST_HUGE_PAGES=1, a packed weight from 2 MiB up lives in 2 MiB-aligned anonymous memory advised to
transparent huge pages (torch.ops.stablelm_fast.cpu_weight_empty, csrc/cpu/memory.cpp): fewer TLB misses while the
kernels stream it (~3% on the 1.6B's decode layers, a Zen 4 VM, within its noise). Off by default: where THP's defrag
setting is "madvise" (the usual default), each first touch of an advised 2 MiB page may compact memory synchronously,
and with the page cache full of checkpoint files that made loading the 1.6B in bf16 3.0 s -> 10-19 s (Zen 4 VM).
Linux decides in any case: with THP "never" the pages stay small, nothing else changes.
"""

from __future__ import annotations

import math
import os

import torch

_ops = torch.ops.stablelm_fast  # (weight_empty's callers, cpu_linear / cpu_quant, load the extension)


def enabled() -> bool:
    return os.environ.get("STABLELM_FAST_HUGE_PAGES", "0") == "1"


def weight_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor for a packed weight (opted in: huge-page memory from 2 MiB up)."""
    if not enabled():
        return torch.empty(shape, dtype=dtype)
    return _ops.cpu_weight_empty(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)


def to_weight_memory(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor t in weight memory."""
    out = weight_empty(t.shape, t.dtype)
    out.copy_(t)
    return out


def release_free_heap() -> None:
    """Give the heap memory freed during loading back to the OS (glibc's malloc_trim; a no-op elsewhere). Loading
    quantizes and repacks every weight through temporaries; glibc keeps what they freed in its arenas, and resident
    memory stays that much above the weights: int4 1.6B ~1.32-1.52 GB after load, 1.08 GB after the trim."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
