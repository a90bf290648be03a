"""Weight-only quantized linear methods: the quantized weights a layer keeps and the ops that run them.

Every quantized layer holds its weight in the canonical form of ops/quant_reference.py, repacked once by the backend's
`pack_quant_weight`: `layer.w_q`, `layer.w_scales`, `layer.w_zeros` (None: symmetric), `layer.w_group` (group size
along this rank's K) and `layer.x_perm` (GPTQ act-order: the input features' order the weight was permuted to; None
otherwise). The layer then runs `ops.quant_linear` / `ops.quant_gate_up_silu` (never a backend's packed layout here).

`QuantizedLinearMethod` quantizes a full-precision checkpoint at load (round to nearest: the backend's
`quantize_weight`, quant_reference's or the cpu backend's same in C++), one checkpoint tensor at a time as it
arrives: no layer ever holds a full-precision copy of its weight (the lm_head, loaded whole by its vocab-parallel
loader, is quantized right after loading).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ROW_CHUNK = 4096  # output rows quantized at once (bounds the fp32 temporaries of a 12B's largest weight)


class QuantLinearMethodBase:
    def __init__(self, ops: Any, bits: int, group_size: int, sym: bool, prefix: str) -> None:
        self.ops, self.bits, self.group_size, self.sym, self.prefix = ops, bits, group_size, sym, prefix

    def check_group(self, layer: nn.Module, k: int) -> int:
        """-> the group size along this rank's k input features; ValueError naming the layer if it does not fit."""
        g = k if self.group_size == -1 else self.group_size
        if k % g:
            tp = layer.tp.size if hasattr(layer, "tp") else 1
            where = f" (this rank's part with tensor_parallel_size={tp})" if tp > 1 and getattr(layer, "splits_k",
                                                                                                 False) else ""
            raise ValueError(f"{self.prefix}: {k} input features{where} are not divisible by the quantization "
                             f"group_size {g}; pick a group_size that divides {k}")
        return g

    def alloc(self, layer: nn.Module, n: int, k: int, device: torch.device | None = None) -> None:
        """Empty canonical buffers for an [n, k] weight (device None: the current default device)."""
        layer.w_group = g = self.check_group(layer, k)
        layer.w_q = torch.empty(n, k // 2 if self.bits == 4 else k, dtype=torch.int8 if self.bits == 8 else torch.uint8,
                                device=device)
        layer.w_scales = torch.empty(n, k // g, dtype=torch.float32, device=device)
        layer.w_zeros = None if self.sym else torch.empty(n, k // g, dtype=torch.uint8, device=device)
        layer.x_perm = None

    def pack(self, layer: nn.Module) -> None:
        layer.w_q, layer.w_scales, layer.w_zeros = self.ops.pack_quant_weight(
            layer.w_q, layer.w_scales, layer.w_zeros, self.bits, layer.w_group,
            halves=getattr(layer, "packed_halves", False))

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer.x_perm is not None:
            x = x.index_select(-1, layer.x_perm)
        return self.ops.quant_linear(x, layer.w_q, layer.w_scales, layer.w_zeros, layer.bias, self.bits,
                                     layer.w_group)

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer.x_perm is not None:
            x = x.index_select(-1, layer.x_perm)
        return self.ops.quant_gate_up_silu(x, layer.w_q, layer.w_scales, layer.w_zeros, self.bits, layer.w_group)


class QuantizedLinearMethod(QuantLinearMethodBase):
    """int8 / int4 quantized at load from a bf16 / fp16 / fp32 checkpoint."""

    def create_weights(self, layer: nn.Module) -> None:
        n, k = layer.out_features, layer.in_features
        self.alloc(layer, n, k)
        # NOTE: `weight` stays the name the checkpoint routes to, but holds nothing: its loader quantizes each
        # incoming tensor (q / k / v, gate / up, this rank's slice) straight into the canonical buffers.
        stub = nn.Parameter(torch.empty(0), requires_grad=False)
        stub.weight_loader = lambda p, loaded, shard_id=None: self.store_rows(layer, *layer.read_local(loaded,
                                                                                                     shard_id))
        stub.dummy_shape = (n, k)  # load_format='dummy': the random [n, k] weight an unquantized layer would get
        stub.dummy_loader = lambda w: self.store_rows(layer, 0, w)
        layer.weight = stub

    def store_rows(self, layer: nn.Module, offset: int, w: torch.Tensor) -> None:
        """Quantize rows [offset, offset + len(w)) of the layer's weight into its canonical buffers."""
        dev = layer.w_scales.device
        for i in range(0, w.shape[0], ROW_CHUNK):
            q, s, z = self.ops.quantize_weight(w[i: i + ROW_CHUNK].to(dev), self.bits, layer.w_group, self.sym)
            rows = slice(offset + i, offset + i + q.shape[0])
            layer.w_q[rows] = q
            layer.w_scales[rows] = s
            if z is not None:
                layer.w_zeros[rows] = z

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not hasattr(layer, "w_q"):  # the lm_head: loaded in full precision by its own loader, quantized now
            weight = layer.weight.data
            self.alloc(layer, *weight.shape, device=weight.device)
            self.store_rows(layer, 0, weight)
            del layer.weight
        self.pack(layer)
