"""Vocab-parallel token embedding and lm_head: each rank owns an equal (padded) slice of the vocabulary."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stablelm_fast.layers.linear import UnquantizedLinearMethod
from stablelm_fast.layers.parallel import TPInfo, vocab_range
from stablelm_fast.layers.weights import CheckpointTensor, make_param


class _VocabParallel(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPInfo) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.start, self.stop, self.part = vocab_range(vocab_size, tp)
        self.weight = make_param(self.part, hidden_size, loader=self.weight_loader)  # [V / tp, hidden]

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: Any = None) -> None:
        rows = loaded.read_slice(0, self.start, self.stop)
        param.data.zero_()  # the last rank's padding rows
        param.data[: rows.shape[0]].copy_(rows)


class VocabEmbedding(_VocabParallel):
    """On the CPU the table stays in the checkpoint file's pages (mapped, not copied) when its dtype is the model's:
    a step reads only the rows of its tokens, so the 1.6B's 411 MB bf16 table costs resident memory only for the
    tokens a deployment meets (llama.cpp maps its whole file the same way)."""

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: Any = None) -> None:
        table = loaded.mapped() if loaded.mapped is not None and param.device.type == "cpu" else None
        if table is not None and table.dtype == param.dtype and self.stop - self.start == self.part:
            param.data = table.narrow(0, self.start, self.stop - self.start)
            return
        super().weight_loader(param, loaded, shard_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(input_ids, self.weight)
        mine = (input_ids >= self.start) & (input_ids < self.stop)
        local = torch.where(mine, input_ids - self.start, 0)
        out = nn.functional.embedding(local, self.weight) * mine[:, None].to(self.weight.dtype)
        return self.tp.reduce(out)


class LMHead(_VocabParallel):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPInfo, ops: Any, quant: Any = None) -> None:
        super().__init__(vocab_size, hidden_size, tp)
        self.bias = None
        self.packed_halves = False
        self.prefix = "lm_head"
        method = quant.linear_method(ops, self.prefix, in_features=hidden_size) if quant is not None else None
        self.linear_method = method or UnquantizedLinearMethod(ops)  # a quantized one quantizes after loading

    def process_weights_after_loading(self) -> None:
        self.linear_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, hidden] -> logits [B, vocab] in fp32, gathered from all ranks."""
        logits = self.linear_method.apply(self, x).float()
        return self.tp.gather(logits)[:, : self.vocab_size]
