"""Vocab-parallel token embedding and lm_head: each rank owns an equal (padded) slice of the vocabulary."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from stablelm_fast.layers.parallel import TPInfo, vocab_range


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPInfo) -> None:
        super().__init__()
        self.tp = tp
        self.start, self.stop, self.part = vocab_range(vocab_size, tp)
        self.weight = nn.Parameter(torch.zeros(self.part, hidden_size), requires_grad=False)  # [V / tp, hidden]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(input_ids, self.weight)
        mine = (input_ids >= self.start) & (input_ids < self.stop)
        local = torch.where(mine, input_ids - self.start, 0)
        out = nn.functional.embedding(local, self.weight) * mine[:, None].to(self.weight.dtype)
        return self.tp.reduce(out)


class LMHead(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPInfo, ops: ModuleType) -> None:
        super().__init__()
        self.tp, self.ops, self.vocab_size = tp, ops, vocab_size
        self.start, self.stop, self.part = vocab_range(vocab_size, tp)
        self.weight = nn.Parameter(torch.zeros(self.part, hidden_size), requires_grad=False)  # [V / tp, hidden]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, hidden] -> logits [B, vocab] in fp32, gathered from all ranks."""
        logits = self.ops.linear(x, self.weight).float()
        return self.tp.gather(logits)[:, : self.vocab_size]
