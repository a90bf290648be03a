"""Pre-quantized GPTQ / AWQ / compressed-tensors checkpoints: load this rank's slice of each packed tensor, convert it
at the end of loading into the canonical form (quantization/formats.py), repack for the backend.

The checkpoint's tensors arrive under the layer's HF names (`q_proj.qweight`, `q_proj.weight_packed`, ...): each goes
to a placeholder parameter of that name whose loader keeps this rank's slice (still packed) until the layer is
complete. Act-order (GPTQ desc_act, compressed-tensors actorder 'group'): the layer's q / k / v (gate / up) must share
one g_idx (they share their input, so AutoGPTQ and llm-compressor give them the same); K is permuted so groups are
contiguous and the layer permutes x the same way. A row-parallel layer (o_proj, down_proj) cannot do that exactly on a
slice of K: refused under tensor parallelism.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stablelm_fast.layers.weights import CheckpointTensor
from stablelm_fast.ops.quant_reference import DEFAULT_ZERO, pack_int4
from stablelm_fast.quantization.formats import (act_order_permutation, awq_to_canonical,
                                                compressed_tensors_to_canonical, gptq_to_canonical)
from stablelm_fast.quantization.linear_method import QuantLinearMethodBase

# part -> (dim of K, K per stored element, dim of N, N per stored element); K per element 'g': one per group, 'p':
# 32 / bits values packed per int32; dim of K None: metadata, read whole (compressed-tensors' weight_shape)
_LAYOUT = {
    "gptq": {"qweight": (0, 8, 1, 1), "qzeros": (0, "g", 1, 8), "scales": (0, "g", 1, 1), "g_idx": (0, 1, None, 1)},
    "awq": {"qweight": (0, 1, 1, 8), "qzeros": (0, "g", 1, 8), "scales": (0, "g", 1, 1)},
    "compressed-tensors": {"weight_packed": (1, "p", 0, 1), "weight_scale": (1, "g", 0, 1),
                           "weight_zero_point": (1, "g", 0, "p"), "weight_g_idx": (0, 1, None, 1),
                           "weight_shape": (None, None, None, None)},
}
_OPTIONAL = {"gptq": ("g_idx",), "awq": (), "compressed-tensors": ("weight_g_idx",)}


def layout(config: Any) -> dict[str, tuple]:
    """The checkpoint tensors of one quantized linear weight: part -> its _LAYOUT entry, 'p' resolved (compressed-
    tensors: a weight_zero_point only when asymmetric)."""
    per = 32 // config.bits
    return {part: tuple(per if v == "p" else v for v in spec) for part, spec in _LAYOUT[config.method].items()
            if not (part == "weight_zero_point" and config.sym)}


def optional_parts(config: Any) -> tuple[str, ...]:
    """The parts a checkpoint may leave out (GPTQ's g_idx, compressed-tensors' weight_g_idx)."""
    return _OPTIONAL[config.method]


def checkpoint_shapes(config: Any, n: int, k: int, where: str) -> dict[str, tuple[int, ...]]:
    """The packed tensors a checkpoint holds for the [n, k] linear weight named where, by part name."""
    if config.method == "compressed-tensors":
        for what, size, packed in (("input", k, True), ("output", n, not config.sym)):
            if packed and size % 32:
                raise ValueError(f"{where}: {size} {what} features are not a multiple of 32; compressed-tensors "
                                 f"versions pad their int32 packing differently there (not supported)")
    group = k if config.group_size == -1 else config.group_size
    shapes = {}
    for part, (k_dim, k_per, n_dim, n_per) in layout(config).items():
        if k_dim is None:
            shapes[part] = (2,)
            continue
        shape = [0] * (1 if n_dim is None else 2)
        shape[k_dim] = k // (group if k_per == "g" else k_per)
        if n_dim is not None:
            shape[n_dim] = n // n_per
        shapes[part] = tuple(shape)
    return shapes


class PrequantizedLinearMethod(QuantLinearMethodBase):
    def __init__(self, ops: Any, config: Any, prefix: str) -> None:
        super().__init__(ops, config.bits, config.group_size, config.sym, prefix)
        self.config = config
        self.layout = layout(config)

    def create_weights(self, layer: nn.Module) -> None:
        if self.config.desc_act and layer.splits_k and layer.tp.size > 1:
            raise ValueError(f"{self.prefix}: GPTQ act-order checkpoints (desc_act, compressed-tensors actorder "
                             f"'group') cannot be split by input features exactly; run with tensor_parallel_size=1 "
                             f"or use a checkpoint without act-order")
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
        if k_dim is None:
            t = loaded.read_all()
        elif layer.splits_k and (k_per != "g" or self.group_size != -1):
            per = self.group_size if k_per == "g" else k_per
            if k0 % per or k1 % per:
                raise ValueError(f"{self.prefix}: this rank's input features [{k0}, {k1}) do not fall on the "
                                 f"checkpoint's packing of {per} per stored element")
            t = loaded.read_slice(k_dim, k0 // per, k1 // per)
        elif n_dim is not None:
            _, first, rows = layer.shard_rows(shard_id)
            if first % n_per or rows % n_per:
                raise ValueError(f"{self.prefix}: this rank's output features [{first}, {first + rows}) do not "
                                 f"fall on the checkpoint's packing of {n_per} per int32")
            t = loaded.read_slice(n_dim, first // n_per, (first + rows) // n_per)
        else:
            t = loaded.read_all()
        parts = layer.raw_parts.setdefault(shard_id, {})
        parts[part] = t.to(getattr(layer, part).device, copy=True)
        if part == "weight_packed":
            parts["packed_shape"] = tuple(loaded.shape)  # the whole checkpoint tensor's, checked against weight_shape

    def _shard(self, layer: nn.Module, shard_id: Any, parts: dict) -> tuple:
        missing = [p for p in self.layout if p not in parts and p not in optional_parts(self.config)]
        if missing:
            raise ValueError(f"{self.prefix}: the checkpoint has no {missing[0]!r} for it")
        if self.config.method == "awq":
            return (*awq_to_canonical(parts["qweight"], parts["qzeros"], parts["scales"]), None)
        first_group = layer.k_range[0] // self.group_size if self.group_size != -1 else 0
        if self.config.method == "compressed-tensors":
            n, packed_k = parts["packed_shape"]
            if [int(v) for v in parts["weight_shape"].tolist()] != [n, packed_k * 32 // self.bits]:
                raise ValueError(f"{self.prefix}: weight_shape {parts['weight_shape'].tolist()} does not match its "
                                 f"weight_packed {[n, packed_k]} ({32 // self.bits} values per int32)")
            return compressed_tensors_to_canonical(parts["weight_packed"], parts["weight_scale"],
                                                   parts.get("weight_zero_point"), parts.get("weight_g_idx"),
                                                   self.bits, layer.w_group, first_group)
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
        scales = torch.cat([s[1] for s in shards])
        zeros = None if shards[0][2] is None else torch.cat([s[2] for s in shards])
        g_idx = [s[3] for s in shards]
        layer.x_perm = None
        if any(g is not None for g in g_idx):
            trivial = torch.arange(layer.in_features, device=q.device) // layer.w_group
            g_idx = [trivial if g is None else g for g in g_idx]
            if any(not torch.equal(g, g_idx[0]) for g in g_idx[1:]):
                raise ValueError(f"{self.prefix}: act-order with a different g_idx per packed projection "
                                 f"(q / k / v or gate / up) is not supported")
            perm = act_order_permutation(g_idx[0], layer.w_group, self.prefix)
            q, layer.x_perm = q[:, perm].contiguous(), perm
        if zeros is not None and self.sym and bool((zeros == DEFAULT_ZERO[self.bits]).all()):
            zeros = None  # symmetric: the canonical default zero point
        layer.w_q, layer.w_scales, layer.w_zeros = pack_int4(q) if self.bits == 4 else q, scales, zeros
        self.pack(layer)
