"""Linear layers that load and shard their own weights, and the per-layer linear method that runs them.

Megatron placement (as vLLM / nano-vllm): ColumnParallelLinear splits the output features over ranks (qkv and gate_up
are packed column-parallel layers whose loaders place q / k / v and gate / up rows), RowParallelLinear splits the
input features (its partial sums are reduced by the caller, so the 12B's parallel residual needs one all-reduce).

A `LinearMethod` owns what the weight looks like at run time: `UnquantizedLinearMethod` keeps the checkpoint layout
and lets the backend repack it once after loading (cpu: the ISA's layout, ops/cpu_linear.py); the quantized methods
(stablelm_fast/quantization/) create their own parameters (`create_weights`) and read the checkpoint through the
layer's `read_local` (this rank's rows / columns of one checkpoint tensor) and `shard_rows` / `k_range`.
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

    def create_weights(self, layer: "LinearBase") -> None:
        layer.weight = make_param(layer.out_features, layer.in_features, loader=layer.weight_loader)

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
    splits_k = False  # row-parallel: each rank holds a slice of the input features

    k_range: tuple[int, int]  # this rank's input features in the checkpoint tensor

    def __init__(self, in_features: int, out_features: int, bias: bool, ops: Any, tp: TPInfo, quant: Any = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features, self.tp = in_features, out_features, tp  # this rank's sizes
        self.prefix = prefix  # the HF module name (errors, quantization choices)
        method = quant.linear_method(ops, prefix) if quant is not None else None
        self.linear_method = method or UnquantizedLinearMethod(ops)
        self.linear_method.create_weights(self)
        self.bias = make_param(out_features, loader=self.weight_loader) if bias else None

    def shard_rows(self, shard_id: Any) -> tuple[int, int, int]:
        """-> (offset in this layer's packed output features, first row in the checkpoint tensor, rows)."""
        return 0, 0, self.out_features

    def read_local(self, loaded: CheckpointTensor, shard_id: Any = None) -> tuple[int, torch.Tensor]:
        """This rank's part of a checkpoint weight (or bias) -> (offset in the packed output features, tensor)."""
        offset, first, rows = self.shard_rows(shard_id)
        return offset, loaded.read_slice(0, first, first + rows)

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: Any = None) -> None:
        offset, t = self.read_local(loaded, shard_id)
        param.data[offset: offset + t.shape[0]].copy_(t)

    def process_weights_after_loading(self) -> None:
        self.linear_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x)


class RowParallelLinear(LinearBase):
    """y = x W^T with W [out, in] split along in; the caller all-reduces the partial sums."""

    splits_k = True

    def __init__(self, in_features: int, out_features: int, ops: Any, tp: TPInfo, what: str, quant: Any = None,
                 prefix: str = "") -> None:
        self.start, self.stop = split_range(in_features, tp, what)
        self.k_range = (self.start, self.stop)
        super().__init__(self.stop - self.start, out_features, False, ops, tp, quant, prefix)

    def read_local(self, loaded: CheckpointTensor, shard_id: Any = None) -> tuple[int, torch.Tensor]:
        return 0, loaded.read_slice(1, self.start, self.stop)


class QKVParallelLinear(LinearBase):
    """q, k and v projections packed into one [(Hq + 2 Hkv) * D, hidden] weight; this rank's heads only."""

    def __init__(self, hidden_size: int, head_dim: int, shard: HeadShard, bias: bool, ops: Any, tp: TPInfo,
                 quant: Any = None, prefix: str = "") -> None:
        self.shard, self.head_dim = shard, head_dim
        q, kv = shard.num_q * head_dim, shard.num_kv * head_dim
        # shard_id -> (offset in the packed weight, first row in the checkpoint tensor, rows)
        self.parts = {"q": (0, shard.q_start * head_dim, q), "k": (q, shard.kv_start * head_dim, kv),
                      "v": (q + kv, shard.kv_start * head_dim, kv)}
        self.k_range = (0, hidden_size)
        super().__init__(hidden_size, q + 2 * kv, bias, ops, tp, quant, prefix)

    def shard_rows(self, shard_id: Any) -> tuple[int, int, int]:
        return self.parts[shard_id]


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel projections of the same input packed in one weight (gate_up: [Wg; Wu])."""

    def __init__(self, in_features: int, out_sizes: list[int], ops: Any, tp: TPInfo, what: str, quant: Any = None,
                 prefix: str = "") -> None:
        self.ranges = [split_range(n, tp, what) for n in out_sizes]
        parts = [stop - start for start, stop in self.ranges]
        self.offsets = [sum(parts[:i]) for i in range(len(parts))]
        self.packed_halves = len(parts) == 2
        self.k_range = (0, in_features)
        super().__init__(in_features, sum(parts), False, ops, tp, quant, prefix)

    def forward_silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """gate_up only: silu(gate(x)) * up(x) in one fused op."""
        return self.linear_method.apply_silu_mul(self, x)

    def shard_rows(self, shard_id: Any) -> tuple[int, int, int]:
        start, stop = self.ranges[shard_id]
        return self.offsets[shard_id], start, stop - start
