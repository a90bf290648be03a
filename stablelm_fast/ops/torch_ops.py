"""The `torch` backend: the plain-torch references, plus torch's own GEMM for linear layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stablelm_fast.ops.reference import (  # noqa: F401  (re-exported as this backend's ops)
    add_layernorm,
    gate_up_silu,
    layernorm,
    paged_attention,
    paged_attention_decode,
    qk_norm_rope_cache,
    silu_and_mul,
)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K]; weight: [N, K]; bias: [N] -> [M, N]."""
    return F.linear(x, weight, bias)
