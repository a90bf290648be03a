"""StableLM self-attention over the paged KV cache, and the metadata the model runner builds for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stablelm_fast.config import ModelConfig
from stablelm_fast.layers.layernorm import PerHeadNormWeights
from stablelm_fast.layers.linear import QKVParallelLinear, RowParallelLinear
from stablelm_fast.layers.parallel import HeadShard, TPInfo


@dataclass
class AttentionMetadata:
    """One step's flattened varlen batch (no padding). Built by the model runner, read by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot for each new token (-1 = don't write)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32: cached + new tokens per sequence
    is_decode: bool  # every sequence has exactly one new token
    max_q_len: int = 1  # longest q run in the batch (host int: kernels size their grids without a device sync)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, shard: HeadShard, tp: TPInfo, ops: Any, quant: Any = None,
                 prefix: str = "self_attn") -> None:
        super().__init__()
        self.ops = ops
        self.num_q, self.num_kv, self.head_dim = shard.num_q, shard.num_kv, config.head_dim
        self.eps = config.layer_norm_eps
        self.scale = config.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, shard, config.use_qkv_bias, ops, tp,
                                          quant, f"{prefix}.qkv_proj")
        # StableLM 2 12B normalizes each head with its own LayerNorm weight (no bias)
        self.q_layernorm = PerHeadNormWeights(shard.q_start, shard.num_q, config.head_dim) if config.qk_layernorm \
            else None
        self.k_layernorm = PerHeadNormWeights(shard.kv_start, shard.num_kv, config.head_dim) if config.qk_layernorm \
            else None
        self.o_proj = RowParallelLinear(config.num_attention_heads * config.head_dim, config.hidden_size, ops, tp,
                                        "num_attention_heads * head_dim", quant, f"{prefix}.o_proj")

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T]
        cos_sin: torch.Tensor,  # [max_positions, rotary_dim] fp32
        meta: AttentionMetadata,
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """-> [T, hidden], this rank's partial sum (the caller all-reduces)."""
        ops = self.ops
        qkv = self.qkv_proj.forward(x)  # (forward: see model.DecoderLayer)
        q_norm = self.q_layernorm.weight if self.q_layernorm is not None else None
        k_norm = self.k_layernorm.weight if self.k_layernorm is not None else None
        q = ops.qk_norm_rope_cache(qkv, positions, cos_sin, q_norm, k_norm, self.eps, k_cache, v_cache,
                                   meta.slot_mapping, self.num_q, self.num_kv, self.head_dim)
        if meta.is_decode:
            o = ops.paged_attention_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale)
        else:
            o = ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.context_lens,
                                    self.scale, meta.max_q_len)
        return self.o_proj.forward(o.reshape(o.shape[0], -1))
