"""Shared helpers of the kernel benchmarks: timing, memory-bandwidth measurement, table printing."""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

# NOTE: SLF_BENCH_THREADS=1 gives stable numbers on a busy machine: with every core in use, a 2-thread parallel
# region waits for a descheduled thread and times quantize to scheduler slices.
if os.environ.get("SLF_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["SLF_BENCH_THREADS"]))


# NOTE: SLF_BENCH_CPU_TIME=1 times with the process's CPU time instead of the wall clock: on a machine shared with
# other work, a compute-bound kernel then reads about as it would alone (waiting threads count for OpenMP's spin
# time, so use it with SLF_BENCH_THREADS=1 for clean figures).
CLOCK = time.process_time if os.environ.get("SLF_BENCH_CPU_TIME") else time.perf_counter


def timeit(fn, min_time: float = 0.3, max_iters: int = 200) -> float:
    """Median seconds per call of fn() (after a warm-up call)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (time.perf_counter() - start < min_time or len(times) < 3):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    times.sort()
    return times[len(times) // 2]


def memory_bandwidth_gbs(mb: int = 512) -> float:
    """Read bandwidth in GB/s with torch's thread pool: sum of a large fp32 tensor (best of a few runs)."""
    a = torch.ones(mb * 1024 * 1024 // 4)
    best = min(timeit(lambda: a.sum(), min_time=0.5, max_iters=8) for _ in range(2))
    return a.numel() * 4 / best / 1e9


def header(title: str) -> float:
    bw = memory_bandwidth_gbs()
    print(f"== {title}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"measured read bandwidth {bw:.1f} GB/s")
    return bw


def row(name: str, t_ref: float, t_ours: float, nbytes: int | None = None, bw: float | None = None,
        flops: float | None = None) -> None:
    line = f"{name:<44} ref {t_ref * 1e3:9.3f} ms   C++ {t_ours * 1e3:8.3f} ms   speedup {t_ref / t_ours:6.2f}x"
    if nbytes is not None and bw:
        gbs = nbytes / t_ours / 1e9
        line += f"   {gbs:6.1f} GB/s ({100 * gbs / bw:4.0f}% of {bw:.1f})"
    if flops is not None:
        line += f"   {flops / t_ours / 1e9:6.1f} GFLOP/s (ref {flops / t_ref / 1e9:.1f})"
    print(line, flush=True)


def cpu_model() -> str:
    """The CPU model name (/proc/cpuinfo), or the platform's processor string elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def cpu_flags() -> str:
    """The ISA flags that pick the CPU kernels (avx2, fma, avx512*, amx*) from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    keep = [f for f in flags if f in ("avx2", "fma", "f16c") or f.startswith(("avx512", "amx"))]
                    return " ".join(keep)
    except OSError:
        pass
    return "unknown"
