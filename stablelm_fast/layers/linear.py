"""Linear layers that load and shard their own weights, and the per-layer linear method that runs them.

Megatron placement (as vLLM / nano-vllm): ColumnParallelLinear splits the output features over ranks (qkv and gate_up
are packed column-parallel layers whose loaders place q / k / v and gate / up rows), RowParallelLinear splits the
input features (its partial sums are reduced by the caller, so the 12B's parallel residual needs one all-reduce).

A `LinearMethod` owns what the weight looks like at run time: `UnquantizedLinearMethod` keeps the checkpoint layout
and lets the backend repack it once after loading (cpu: the ISA's layout, ops/cpu_linear.py); quantized methods plug in
here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stablelm_fast.layers.parallel import HeadShard, TPInfo, split_range
from stablelm_fast.layers.weights import CheckpointTensor, make_param


class UnquantizedLinearMethod:
    """Weights as in the checkpoint ([N, K], model dtype); the backend's pack_linear_weight (if any) repacks them."""

    def __init__(self, ops: Any) -> None:
        self.ops = ops

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        pack = getattr(self.ops, "pack_linear_weight", None)
        if pack is not None:
            layer.weight.data = pack(layer.weight.data, halves=layer.packed_halves)

    def apply(self, layer: "LinearBase", x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, layer.weight, layer.bias)

    def apply_silu_mul(self, layer: "LinearBase", x: torch.Tensor) -> torch.Tensor:
        """A packed [gate; up] layer fused with SwiGLU: silu(x Wg^T) * (x Wu^T)."""
        return self.ops.gate_up_silu(x, layer.weight)


class LinearBase(nn.Module):
    packed_halves = False  # gate_up: the two halves must stay apart when repacked

    def __init__(self, in_features: int, out_features: int, bias: bool, ops: Any, tp: TPInfo) -> None:
        super().__init__()
        self.in_features, self.out_features, self.tp = in_features, out_features, tp  # this rank's sizes
        self.weight = make_param(out_features, in_features, loader=self.weight_loader)
        self.bias = make_param(out_features, loader=self.weight_loader) if bias else None
        self.linear_method = UnquantizedLinearMethod(ops)

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: Any = None) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self) -> None:
        self.linear_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x)


class RowParallelLinear(LinearBase):
    """y = x W^T with W [out, in] split along in; the caller all-reduces the partial sums."""

    def __init__(self, in_features: int, out_features: int, ops: Any, tp: TPInfo, what: str) -> None:
        self.start, self.stop = split_range(in_features, tp, what)
        super().__init__(self.stop - self.start, out_features, False, ops, tp)

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: Any = None) -> None:
        param.data.copy_(loaded.read_slice(1, self.start, self.stop))


class QKVParallelLinear(LinearBase):
    """q, k and v projections packed into one [(Hq + 2 Hkv) * D, hidden] weight; this rank's heads only."""

    def __init__(self, hidden_size: int, head_dim: int, shard: HeadShard, bias: bool, ops: Any, tp: TPInfo) -> None:
        self.shard, self.head_dim = shard, head_dim
        q, kv = shard.num_q * head_dim, shard.num_kv * head_dim
        # shard_id -> (offset in the packed weight, first row in the checkpoint tensor, rows)
        self.parts = {"q": (0, shard.q_start * head_dim, q), "k": (q, shard.kv_start * head_dim, kv),
                      "v": (q + kv, shard.kv_start * head_dim, kv)}
        super().__init__(hidden_size, q + 2 * kv, bias, ops, tp)

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: Any = None) -> None:
        offset, first, rows = self.parts[shard_id]
        param.data[offset: offset + rows].copy_(loaded.read_slice(0, first, first + rows))


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel projections of the same input packed in one weight (gate_up: [Wg; Wu])."""

    def __init__(self, in_features: int, out_sizes: list[int], ops: Any, tp: TPInfo, what: str) -> None:
        self.ranges = [split_range(n, tp, what) for n in out_sizes]
        parts = [stop - start for start, stop in self.ranges]
        self.offsets = [sum(parts[:i]) for i in range(len(parts))]
        self.packed_halves = len(parts) == 2
        super().__init__(in_features, sum(parts), False, ops, tp)

    def forward_silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """gate_up only: silu(gate(x)) * up(x) in one fused op."""
        return self.linear_method.apply_silu_mul(self, x)

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: Any = None) -> None:
        start, stop = self.ranges[shard_id]
        offset = self.offsets[shard_id]
        param.data[offset: offset + stop - start].copy_(loaded.read_slice(0, start, stop))
