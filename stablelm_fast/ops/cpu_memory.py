"""Memory for the CPU backend's packed weights: what a decode step streams from DRAM, every token.

From 2 MiB up, a packed weight lives in 2 MiB-aligned anonymous memory advised to transparent huge pages
(torch.ops.stablelm_fast.cpu_weight_empty, csrc/cpu/memory.cpp): fewer TLB misses while the kernels stream it. Measured
on a 2-core Zen 4 VM (KVM), 1.6B shape, bf16, alternated runs: 32 x 128 / 64 throughput 33.1-33.7 -> 37.6-40.9
output tok/s (the GEMMs walk the weights faster), decode ~3%. Loading pays for it on such a VM: the first touch of
each 2 MiB page is slow (3 GiB: 10.8-17.9 s against 0.9 s in 4 KiB pages, no compaction: thp_fault_alloc only), so
loading the 1.6B in bf16 takes ~10-19 s instead of ~3 s. STABLELM_FAST_HUGE_PAGES=0 turns it off (plain
torch.empty): for short jobs that start often. Linux decides in any case: with THP "never" the pages stay small.
"""

from __future__ import annotations

import math
import os

import torch

_ops = torch.ops.stablelm_fast  # (weight_empty's callers, cpu_linear / cpu_quant, load the extension)


def enabled() -> bool:
    return os.environ.get("STABLELM_FAST_HUGE_PAGES", "1") != "0"


def weight_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor for a packed weight (huge-page memory from 2 MiB up, see above)."""
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
