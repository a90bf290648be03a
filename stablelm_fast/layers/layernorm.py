"""LayerNorm with bias (fused with the residual add), and the 12B's per-head QK LayerNorm weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stablelm_fast.layers.weights import CheckpointTensor, make_param


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops: Any) -> None:
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = make_param(hidden_size)
        self.bias = make_param(hidden_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (layernorm(x + residual), x + residual); with residual None the new residual is x."""
        return self.ops.add_layernorm(x, residual, self.weight, self.bias, self.eps)


class PerHeadNormWeights(nn.Module):
    """[heads, head_dim]: one LayerNorm weight (no bias) per head of this rank, applied inside qk_norm_rope_cache.
    The checkpoint has one tensor per head (`q_layernorm.norms.{h}.weight`); shard_id is h, a global head index."""

    def __init__(self, first_head: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.first_head = first_head
        self.weight = make_param(num_heads, head_dim, loader=self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: Any = None) -> None:
        head = int(shard_id) - self.first_head
        if 0 <= head < param.shape[0]:  # another rank's head otherwise
            param.data[head].copy_(loaded.read_all())
