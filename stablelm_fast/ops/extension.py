"""Python wrappers of the C++ extension's ops (torch.ops.stablelm_fast.*): allocate the outputs, pass them as
out-parameters. Device-agnostic: the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) register under the same
names, so the cpu and cuda backends both serve these ops through them.
"""

from __future__ import annotations

import torch

import stablelm_fast._C  # noqa: F401  (registers torch.ops.stablelm_fast)

_ops = torch.ops.stablelm_fast


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, features] with contiguous rows (what every kernel here takes): x itself when it already is, as
    in every call the model makes (no reshape: ~1.5 us each, a few hundred calls a step)."""
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    x2 = as_rows(x)
    out = torch.empty_like(x2, memory_format=torch.contiguous_format)
    _ops.layernorm(out, x2, weight, bias, eps)
    return out if x2 is x else out.view(x.shape)


def add_layernorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is None:
        return layernorm(x, weight, bias, eps), x
    x2 = as_rows(x)
    out = torch.empty_like(x2, memory_format=torch.contiguous_format)
    new_residual = torch.empty_like(x2, memory_format=torch.contiguous_format)
    _ops.add_layernorm(out, new_residual, x2, as_rows(residual), weight, bias, eps)
    return (out, new_residual) if x2 is x else (out.view(x.shape), new_residual.view(x.shape))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    g2 = as_rows(gate_up)
    out = torch.empty(g2.shape[0], g2.shape[1] // 2, dtype=gate_up.dtype, device=gate_up.device)
    _ops.silu_and_mul(out, g2)
    return out if g2 is gate_up else out.view(*gate_up.shape[:-1], -1)


def qk_norm_rope_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    q = torch.empty(qkv.shape[0], num_q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _ops.qk_norm_rope_cache(
        q, qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
        num_q_heads, num_kv_heads, head_dim,
    )
    return q


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
) -> torch.Tensor:
    out = torch.empty_like(q)
    _ops.paged_attention(out, q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)
    return out


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(q)
    _ops.paged_attention_decode(out, q, k_cache, v_cache, block_tables, context_lens, scale)
    return out
