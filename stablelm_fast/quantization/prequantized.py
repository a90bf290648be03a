"""Pre-quantized GPTQ / AWQ checkpoints: load this rank's slice of each packed tensor, convert it at the end of
loading into the canonical form (quantization/formats.py), repack for the backend.

The checkpoint's tensors arrive under the layer's HF names (`q_proj.qweight`, ...): each goes to a placeholder
parameter of that name whose loader keeps this rank's slice (still packed, 4-bit) until the layer is complete.
Act-order (GPTQ desc_act): the layer's q / k / v (gate / up) must share one g_idx (they share their input, so
AutoGPTQ gives them the same); K is permuted so groups are contiguous and the layer permutes x the same way. A
row-parallel layer (o_proj, down_proj) cannot do that exactly on a slice of K: refused under tensor parallelism.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stablelm_fast.layers.weights import CheckpointTensor
from stablelm_fast.ops.quant_reference import pack_int4
from stablelm_fast.quantization.formats import act_order_permutation, awq_to_canonical, gptq_to_canonical
from stablelm_fast.quantization.linear_method import QuantLinearMethodBase

# part -> (dim of K, K per stored element: 'g' = one per group, dim of N, N per stored element)
_LAYOUT = {
    "gptq": {"qweight": (0, 8, 1, 1), "qzeros": (0, "g", 1, 8), "scales": (0, "g", 1, 1), "g_idx": (0, 1, None, 1)},
    "awq": {"qweight": (0, 1, 1, 8), "qzeros": (0, "g", 1, 8), "scales": (0, "g", 1, 1)},
}
OPTIONAL_PARTS = {"gptq": ("g_idx",), "awq": ()}


def checkpoint_shapes(method: str, group_size: int, n: int, k: int) -> dict[str, tuple[int, ...]]:
    """The packed tensors a GPTQ / AWQ checkpoint holds for one [n, k] linear weight, by part name."""
    groups = 1 if group_size == -1 else k // group_size
    shapes = {"qweight": (k // 8, n) if method == "gptq" else (k, n // 8), "qzeros": (groups, n // 8),
              "scales": (groups, n)}
    if method == "gptq":
        shapes["g_idx"] = (k,)
    return shapes


class PrequantizedLinearMethod(QuantLinearMethodBase):
    def __init__(self, ops: Any, config: Any, prefix: str) -> None:
        super().__init__(ops, 4, config.group_size, config.method == "gptq" and config.sym, prefix)
        self.config = config
        self.layout = _LAYOUT[config.method]

    def create_weights(self, layer: nn.Module) -> None:
        if self.config.desc_act and layer.splits_k and layer.tp.size > 1:
            raise ValueError(f"{self.prefix}: GPTQ act-order (desc_act) checkpoints cannot be split by input "
                             f"features exactly; run with tensor_parallel_size=1 or use a desc_act=false checkpoint")
        layer.w_group = self.check_group(layer, layer.in_features)
        if self.config.group_size != -1 and layer.k_range[0] % self.config.group_size:
            raise ValueError(f"{self.prefix}: this rank's input features start at {layer.k_range[0]}, not at a "
                             f"group boundary (group_size {self.config.group_size})")
        layer.raw_parts = {}
        for part in self.layout:
            p = nn.Parameter(torch.empty(0), requires_grad=False)
            p.weight_loader = lambda param, loaded, shard_id=None, part=part: self.receive(layer, part, loaded,
                                                                                          shard_id)
            setattr(layer, part, p)

    def receive(self, layer: nn.Module, part: str, loaded: CheckpointTensor, shard_id: Any) -> None:
        """Keep this rank's slice of one packed checkpoint tensor (converted when the layer is complete)."""
        k_dim, k_per, n_dim, n_per = self.layout[part]
        k0, k1 = layer.k_range
        if layer.splits_k and (k_per != "g" or self.group_size != -1):
            per = self.group_size if k_per == "g" else k_per
            t = loaded.read_slice(k_dim, k0 // per, k1 // per)
        elif n_dim is not None:
            _, first, rows = layer.shard_rows(shard_id)
            if first % n_per or rows % n_per:
                raise ValueError(f"{self.prefix}: this rank's output features [{first}, {first + rows}) do not "
                                 f"fall on the checkpoint's packing of {n_per} per int32")
            t = loaded.read_slice(n_dim, first // n_per, (first + rows) // n_per)
        else:
            t = loaded.read_all()
        layer.raw_parts.setdefault(shard_id, {})[part] = t.to(getattr(layer, part).device, copy=True)

    def _shard(self, layer: nn.Module, shard_id: Any, parts: dict) -> tuple:
        missing = [p for p in self.layout if p not in parts and p not in OPTIONAL_PARTS[self.config.method]]
        if missing:
            raise ValueError(f"{self.prefix}: the checkpoint has no {missing[0]!r} for it")
        if self.config.method == "awq":
            return (*awq_to_canonical(parts["qweight"], parts["qzeros"], parts["scales"]), None)
        first_group = layer.k_range[0] // self.group_size if self.group_size != -1 else 0
        return gptq_to_canonical(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"),
                                 layer.w_group, self.config.zero_offset, first_group)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        order = sorted(layer.raw_parts, key=lambda sid: layer.shard_rows(sid)[0])
        shards = [self._shard(layer, sid, layer.raw_parts[sid]) for sid in order]
        layer.raw_parts = {}
        for part in self.layout:
            delattr(layer, part)
        q = torch.cat([s[0] for s in shards])
        if q.shape != (layer.out_features, layer.in_features):
            raise ValueError(f"{self.prefix}: loaded {list(q.shape)} weights, expected "
                             f"{[layer.out_features, layer.in_features]}")
        scales, zeros = torch.cat([s[1] for s in shards]), torch.cat([s[2] for s in shards])
        g_idx = [s[3] for s in shards]
        layer.x_perm = None
        if any(g is not None for g in g_idx):
            trivial = torch.arange(layer.in_features, device=q.device) // layer.w_group
            g_idx = [trivial if g is None else g for g in g_idx]
            if any(not torch.equal(g, g_idx[0]) for g in g_idx[1:]):
                raise ValueError(f"{self.prefix}: act-order GPTQ with a different g_idx per packed projection "
                                 f"(q / k / v or gate / up) is not supported")
            perm = act_order_permutation(g_idx[0], layer.w_group, self.prefix)
            q, layer.x_perm = q[:, perm].contiguous(), perm
        if self.sym and bool((zeros == 8).all()):
            zeros = None  # symmetric: the canonical default zero point
        layer.w_q, layer.w_scales, layer.w_zeros = pack_int4(q), scales, zeros
        self.pack(layer)
