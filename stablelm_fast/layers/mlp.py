"""SwiGLU MLP: down(silu(gate(x)) * up(x)), with gate and up packed into one column-parallel weight."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stablelm_fast.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from stablelm_fast.layers.parallel import TPInfo


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, ops: Any, tp: TPInfo, quant: Any = None,
                 prefix: str = "mlp") -> None:
        super().__init__()
        # [2 * I / tp, hidden]: gate rows first, then up rows
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, ops, tp,
                                                       "intermediate_size", quant, f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, ops, tp, "intermediate_size", quant,
                                           f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden], this rank's partial sum (the caller all-reduces)."""
        return self.down_proj.forward(self.gate_up_proj.forward_silu_mul(x))  # (forward: see model.DecoderLayer)
