"""SwiGLU MLP: down(silu(gate(x)) * up(x)), with gate and up packed into one weight."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, ops: ModuleType) -> None:
        super().__init__()
        self.ops = ops
        # [2 * I, hidden]: gate rows first, then up rows (column-parallel: I is this rank's part)
        self.gate_up_weight = nn.Parameter(torch.empty(2 * intermediate_size, hidden_size), requires_grad=False)
        self.down_weight = nn.Parameter(torch.empty(hidden_size, intermediate_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden], this rank's partial sum (the caller all-reduces)."""
        return self.ops.linear(self.ops.gate_up_silu(x, self.gate_up_weight), self.down_weight)
