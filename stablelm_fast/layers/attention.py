"""StableLM self-attention over the paged KV cache, and the metadata the model runner builds for it."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from stablelm_fast.config import ModelConfig
from stablelm_fast.layers.parallel import HeadShard, TPInfo


@dataclass
class AttentionMetadata:
    """One step's flattened varlen batch (no padding). Built by the model runner, read by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot for each new token (-1 = don't write)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32: cached + new tokens per sequence
    is_decode: bool  # every sequence has exactly one new token
    max_q_len: int = 1


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, shard: HeadShard, tp: TPInfo, ops: ModuleType) -> None:
        super().__init__()
        self.ops, self.tp = ops, tp
        self.num_q, self.num_kv, self.head_dim = shard.num_q, shard.num_kv, config.head_dim
        self.eps = config.layer_norm_eps
        self.scale = config.head_dim ** -0.5
        d, h = self.head_dim, config.hidden_size
        # [(Hq + 2 * Hkv) * D, hidden]: q, k and v projections packed into one GEMM
        self.qkv_weight = nn.Parameter(torch.empty((self.num_q + 2 * self.num_kv) * d, h), requires_grad=False)
        self.qkv_bias = (nn.Parameter(torch.empty((self.num_q + 2 * self.num_kv) * d), requires_grad=False)
                         if config.use_qkv_bias else None)
        # [H, D]: StableLM 2 12B normalizes each head with its own LayerNorm weight (no bias)
        self.q_norm_weight = (nn.Parameter(torch.empty(self.num_q, d), requires_grad=False)
                              if config.qk_layernorm else None)
        self.k_norm_weight = (nn.Parameter(torch.empty(self.num_kv, d), requires_grad=False)
                              if config.qk_layernorm else None)
        self.o_weight = nn.Parameter(torch.empty(h, self.num_q * d), requires_grad=False)  # row-parallel

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T]
        cos_sin: torch.Tensor,  # [max_positions, rotary_dim]
        meta: AttentionMetadata,
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """-> [T, hidden], this rank's partial sum (the caller all-reduces)."""
        ops = self.ops
        qkv = ops.linear(x, self.qkv_weight, self.qkv_bias)
        q = ops.qk_norm_rope_cache(qkv, positions, cos_sin, self.q_norm_weight, self.k_norm_weight, self.eps,
                                   k_cache, v_cache, meta.slot_mapping, self.num_q, self.num_kv, self.head_dim)
        if meta.is_decode:
            o = ops.paged_attention_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale)
        else:
            o = ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.context_lens,
                                    self.scale)
        return ops.linear(o.reshape(o.shape[0], -1), self.o_weight)
