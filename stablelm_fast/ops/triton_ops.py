"""The `triton` backend: the Triton kernels in kernels/ (installed as stablelm_fast.kernels), torch GEMM for linear,
weight-only int8 / int4 GEMMs from kernels/quant_matmul.py (the cuda backend falls back to them).

Every function has the signature and semantics of stablelm_fast/ops/reference.py (see ops/__init__.py).

Attention may instead go through flash-attn (FlashAttention-2's paged-KV entry points) when it can run:
CUDA tensors, fp16/bf16, the `flash_attn` package importable, a head size it supports (multiple of 8, <= 256: 64, 80
and 160 all qualify) and a KV-cache page size that is a multiple of 256 (FA2's paged-KV requirement; with smaller
pages, e.g. the default 16, our Triton kernels are used). The cache layout [num_blocks, block_size, Hkv, D] is
exactly FA2's paged layout, and FA2's causal mask for q_len < k_len is bottom-right aligned, matching the reference.
Needs flash-attn >= 2.6 (block_table in flash_attn_varlen_func; flash_attn_with_kvcache has had it since 2.5).
NOT VERIFIED: the flash-attn path has never run (no GPU and no flash_attn here); on CPU it is never taken.
Set STABLELM_FAST_DISABLE_FLASH_ATTN=1 to force the Triton kernels.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from stablelm_fast.kernels._common import host_value_once
from stablelm_fast.kernels.add_layernorm import add_layernorm, layernorm  # noqa: F401
from stablelm_fast.kernels.paged_attention_decode import paged_attention_decode as _triton_paged_attention_decode
from stablelm_fast.kernels.paged_attention_prefill import paged_attention as _triton_paged_attention
from stablelm_fast.kernels.quant_matmul import (  # noqa: F401
    pack_quant_weight, quant_bits, quant_gate_up_silu, quant_linear)
from stablelm_fast.kernels.rope_qknorm_cache import qk_norm_rope_cache  # noqa: F401
from stablelm_fast.kernels.silu_and_mul import gate_up_silu, silu_and_mul  # noqa: F401

_FA_PAGE_MULTIPLE = 256  # flash-attn 2 paged KV: page_block_size must be a multiple of 256


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K]; weight: [N, K]; bias: [N] -> [M, N] (cuBLAS through torch: already at the GEMM roofline)."""
    return F.linear(x, weight, bias)


@functools.lru_cache(maxsize=None)
def _flash_attn_module():
    """The flash_attn module, or None if it is not installed / not usable (CPU-only machine)."""
    if os.environ.get("STABLELM_FAST_DISABLE_FLASH_ATTN", "0") == "1" or not torch.cuda.is_available():
        return None
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None
    return flash_attn


def flash_attn_available(head_dim: int) -> bool:
    """True if flash-attn is importable on a CUDA machine and supports this head size (FA2: multiple of 8, <= 256)."""
    return _flash_attn_module() is not None and head_dim % 8 == 0 and head_dim <= 256


def _use_flash_attn(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and k_cache.shape[1] % _FA_PAGE_MULTIPLE == 0
        and flash_attn_available(q.shape[-1])
    )


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    context_lens: torch.Tensor,  # [B] int32, including the new tokens
    scale: float,
    max_q_len: int | None = None,  # longest q run (host int): no device sync to size the grid
) -> torch.Tensor:
    """Causal paged varlen attention (prefill / chunked prefill / prefix extend). Returns [T, Hq, D]."""
    if _use_flash_attn(q, k_cache):
        from flash_attn import flash_attn_varlen_func

        # Paged K/V: k and v are the whole caches, cu_seqlens_k the cumulative context lengths.
        cu_seqlens_k = F.pad(torch.cumsum(context_lens, 0, dtype=torch.int32), (1, 0))
        # max_q: the caller's host int when given; else (like max_k) read once per step, not once per layer
        max_q = max_q_len if max_q_len is not None else host_value_once(
            "max_seqlen_q", cu_seqlens_q, lambda cu: (cu[1:] - cu[:-1]).max().item())
        max_k = host_value_once("max_seqlen_k", context_lens, lambda c: c.max().item())
        return flash_attn_varlen_func(
            q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_q, max_k,
            softmax_scale=scale, causal=True, block_table=block_tables,
        )
    return _triton_paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                   max_seqlen_q=max_q_len)


def paged_attention_decode(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    context_lens: torch.Tensor,  # [B] int32, including the new token
    scale: float,
) -> torch.Tensor:
    """Decode attention (one new token per sequence). Returns [B, Hq, D]."""
    if _use_flash_attn(q, k_cache):
        from flash_attn import flash_attn_with_kvcache

        # The new token's K/V is already in the cache (rope kernel), so no k/v append: cache_seqlens = context_lens.
        out = flash_attn_with_kvcache(
            q.unsqueeze(1), k_cache, v_cache, cache_seqlens=context_lens, block_table=block_tables,
            softmax_scale=scale, causal=True,
        )
        return out.squeeze(1)
    return _triton_paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
