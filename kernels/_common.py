"""What every Triton kernel launcher here decides the same way."""

from __future__ import annotations

import os

import torch


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether tl.dot tiles are upcast to fp32 (input_precision="ieee"): always for fp32 (no TF32), and under
    TRITON_INTERPRET=1, whose bf16 tl.dot is broken in Triton 3.9. On a GPU bf16/fp16 use the native MMA."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or dtype == torch.float32
