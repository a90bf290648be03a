"""KV-cache sizing: how many blocks fit the memory budget."""

from __future__ import annotations

import os

import torch


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
    """KV-cache size: kv_cache_memory_gb if given; else CPU: 30% of available RAM, CUDA: 90% of free memory
    (after the model is loaded), never more than max_num_seqs full-length sequences need."""
    if kv_cache_memory_gb is not None:
        if kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0; got {kv_cache_memory_gb}")
        budget = int(kv_cache_memory_gb * (1 << 30))
    else:
        fraction = float(os.environ.get("STABLELM_FAST_KV_FRACTION", "0.3" if device.type == "cpu" else "0.9"))
        budget = int(available_memory_bytes(device) * fraction)
    needed = max_num_seqs * -(-max_model_len // block_size)
    return max(1, min(budget // runner_bytes_per_block, needed))
