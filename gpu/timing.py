"""GPU timing shared by the GPU benchmarks: seconds of a callable by CUDA events."""

from __future__ import annotations

import torch


def cuda_times(fn, repeats: int, warmup: bool = False) -> list[float]:
    """Sorted seconds of `repeats` calls of fn(), each between two CUDA events (warmup: one untimed call first,
    which also compiles a Triton kernel)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)
