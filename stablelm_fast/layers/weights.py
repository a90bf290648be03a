"""How a parameter receives its checkpoint tensor: a `weight_loader` attached to each parameter (as nano-vllm / vLLM).

A checkpoint tensor arrives as a `CheckpointTensor`: its shape, and reads of the whole tensor or of one slice along
one dim (memory-mapped safetensors: a tensor-parallel rank reads only its rows), and where the checkpoint is a file
on disk in the right byte order, `mapped()`: the tensor as a view of the file's pages, read as they are touched. A weight loader copies what its
parameter owns into it, converting the dtype; `shard_id` says which part of a packed parameter (q / k / v of
qkv_proj, 0 / 1 of gate_up_proj, the head of a per-head norm) the tensor is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn


@dataclass
class CheckpointTensor:
    shape: tuple[int, ...]
    read_all: Callable[[], torch.Tensor]
    read_slice: Callable[[int, int, int], torch.Tensor]  # (dim, start, stop) -> that slice only
    # -> the whole tensor backed by the file's pages (a private mapping: nothing read until used), or None where
    # the file cannot be mapped so (an unaligned offset, a big-endian machine)
    mapped: Optional[Callable[[], Optional[torch.Tensor]]] = None


def from_tensor(t: torch.Tensor) -> CheckpointTensor:
    """An in-memory tensor as a CheckpointTensor (tests, converters)."""
    def read_slice(dim: int, start: int, stop: int) -> torch.Tensor:
        return t.narrow(dim, start, stop - start)
    return CheckpointTensor(tuple(t.shape), lambda: t, read_slice)


WeightLoader = Callable[[nn.Parameter, CheckpointTensor, Any], None]


def default_weight_loader(param: nn.Parameter, loaded: CheckpointTensor, shard_id: Any = None) -> None:
    """Replicated parameter: the whole tensor."""
    param.data.copy_(loaded.read_all())


def make_param(*shape: int, loader: WeightLoader = default_weight_loader) -> nn.Parameter:
    """An inference parameter (no grad) of the default dtype/device, with its weight loader attached."""
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


def process_weights_after_loading(model: nn.Module) -> None:
    """After every tensor is loaded (or dummy-initialized): each layer's load-time repacking, once."""
    for module in model.modules():
        hook = getattr(module, "process_weights_after_loading", None)
        if hook is not None and module is not model:
            hook()
