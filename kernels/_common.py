"""What every Triton kernel launcher here decides the same way."""

from __future__ import annotations

import os
import weakref

import torch


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether tl.dot tiles are upcast to fp32 (input_precision="ieee"): always for fp32 (no TF32), and under
    TRITON_INTERPRET=1, whose bf16 tl.dot is broken in Triton 3.9. On a GPU bf16/fp16 use the native MMA."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or dtype == torch.float32


_memo: dict[str, tuple] = {}


def host_value_once(name: str, t: torch.Tensor, compute) -> int:
    """int(compute(t)), read from the device once per tensor instead of once per call.

    Every layer of a step passes the same metadata tensor (e.g. cu_seqlens_q), so a launcher that needs a host-side
    value from it (a grid size) would otherwise synchronise the GPU once per layer. The value is kept with a weak
    reference to the tensor and its version counter: a different tensor (the next step's, even at the same
    address) or an in-place change recomputes it.
    """
    hit = _memo.get(name)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    value = int(compute(t))
    _memo[name] = (weakref.ref(t), t._version, value)
    return value
