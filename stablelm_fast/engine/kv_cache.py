"""KV-cache sizing (how many blocks), its allocation, and the one line the engine logs about it at load.

Default size, when neither num_kv_blocks nor kv_cache_memory_gb is given:
  * CPU: DEFAULT_CPU_KV_GIB (like vLLM's CPU backend, whose VLLM_CPU_KVCACHE_SPACE is a few GiB, not a share of
    the machine), at most CPU_RAM_FRACTION of the available RAM and what max_num_seqs full-length sequences need.
    Its pages are committed as they are written and the block manager takes the lowest free block first, so the
    resident part follows the peak use, not the size: one 4096-token sequence of StableLM-2-1.6B commits 768 MiB.
    (An earlier default of 2 x max_model_len tokens made 32 concurrent requests preempt each other: 0.59x HF's
    throughput in bench/compare.py.) Less or more: kv_cache_memory_gb / num_kv_blocks.
  * CUDA: GPU_MEMORY_FRACTION of the free device memory after the model is loaded (as vLLM does), never more than
    max_num_seqs full-length sequences need.
STABLELM_FAST_KV_FRACTION overrides the RAM / device-memory fraction.

Allocation: on the CPU the cache is torch.empty, so Linux commits its pages when they are first written (a new
sequence's K/V), not at load: resident memory grows with use, up to the cache size. Nothing reads a slot before
it is written (attention reads only each sequence's context; tests fill the rest with NaN), so no zero fill is
needed. On CUDA device memory is reserved whole anyway; it is zeroed there (cheap) so a CUDA-graph padding slot
never meets stale bits.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("stablelm_fast.engine")

DEFAULT_CPU_KV_GIB = 4.0
CPU_RAM_FRACTION = 0.3
GPU_MEMORY_FRACTION = 0.9


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def default_num_blocks(runner_bytes_per_block: int, block_size: int, max_model_len: int, max_num_seqs: int,
                       device: torch.device, kv_cache_memory_gb: float | None) -> int:
    """Blocks of the KV cache: kv_cache_memory_gb if given, else the default above (module docstring); never more
    than max_num_seqs full-length sequences need, never fewer than one block."""
    blocks_per_seq = -(-max_model_len // block_size)
    needed = max_num_seqs * blocks_per_seq
    if kv_cache_memory_gb is not None:
        if kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0; got {kv_cache_memory_gb}")
        return max(1, min(int(kv_cache_memory_gb * (1 << 30)) // runner_bytes_per_block, needed))
    default_fraction = CPU_RAM_FRACTION if device.type == "cpu" else GPU_MEMORY_FRACTION
    fraction = float(os.environ.get("STABLELM_FAST_KV_FRACTION", default_fraction))
    budget = int(available_memory_bytes(device) * fraction)
    if device.type == "cpu":
        budget = min(budget, int(DEFAULT_CPU_KV_GIB * (1 << 30)))
    return max(1, min(budget // runner_bytes_per_block, needed))


def allocate(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
             dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[layers, 2, num_blocks, block_size, Hkv, D] in one allocation -> per layer (k, v) views. CPU: uncommitted
    until written (torch.empty, no fill); CUDA: zeroed."""
    shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
    make = torch.empty if device.type == "cpu" else torch.zeros
    cache = make(shape, dtype=dtype, device=device)
    return [(cache[i, 0], cache[i, 1]) for i in range(num_layers)]


def describe(num_blocks: int, block_size: int, bytes_per_block: int, max_model_len: int, device: torch.device) -> str:
    """The load-time line: size, token capacity, and how many full-length sequences that is."""
    tokens = num_blocks * block_size
    commit = "committed as used" if device.type == "cpu" else "reserved"
    return (f"KV cache: {num_blocks * bytes_per_block / (1 << 30):.2f} GiB on {device.type}, {num_blocks} blocks x "
            f"{block_size} tokens = {tokens} tokens ({tokens / max_model_len:.1f} x max_model_len {max_model_len}), "
            f"{commit}; more with kv_cache_memory_gb / num_kv_blocks")
