"""Tensor-parallel placement: which slice of each weight a rank owns. Pure arithmetic, no process group.

Megatron layout (as vLLM does it): q/k/v and gate/up are column-parallel (split by output), o_proj and down_proj are
row-parallel (split by input, followed by one all-reduce). KV heads are split across ranks, and replicated when
there are more ranks than KV heads. The vocabulary is split in equal padded parts for embedding and lm_head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Collective = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1
    all_reduce: Collective | None = None  # sums a tensor over ranks (None: single process)
    all_gather: Collective | None = None  # concatenates [.., n] tensors over ranks along the last dim

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.size == 1 or self.all_reduce is None else self.all_reduce(x)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.size == 1 or self.all_gather is None else self.all_gather(x)


@dataclass(frozen=True)
class HeadShard:
    """The q and kv heads one rank owns."""

    q_start: int
    num_q: int
    kv_start: int
    num_kv: int


def head_shard(num_q_heads: int, num_kv_heads: int, tp: TPInfo) -> HeadShard:
    if num_q_heads % tp.size:
        raise ValueError(f"tensor_parallel_size {tp.size} must divide num_attention_heads {num_q_heads}")
    if tp.size > num_kv_heads and tp.size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {tp.size} > num_key_value_heads {num_kv_heads} must be a multiple of it")
    if tp.size <= num_kv_heads and num_kv_heads % tp.size:
        raise ValueError(f"tensor_parallel_size {tp.size} must divide num_key_value_heads {num_kv_heads}")
    num_q = num_q_heads // tp.size
    group = num_q_heads // num_kv_heads
    num_kv = max(1, num_kv_heads // tp.size)
    # NOTE: with more ranks than kv heads, each rank keeps the one kv head its q heads read (replicated).
    return HeadShard(q_start=tp.rank * num_q, num_q=num_q, kv_start=(tp.rank * num_q) // group, num_kv=num_kv)


def split_range(total: int, tp: TPInfo, what: str) -> tuple[int, int]:
    if total % tp.size:
        raise ValueError(f"tensor_parallel_size {tp.size} must divide {what} {total}")
    part = total // tp.size
    return tp.rank * part, (tp.rank + 1) * part


def vocab_range(vocab_size: int, tp: TPInfo) -> tuple[int, int, int]:
    """-> (start, stop, padded part size) of this rank's vocabulary rows."""
    part = -(-vocab_size // tp.size)
    start = min(tp.rank * part, vocab_size)
    return start, min(start + part, vocab_size), part
