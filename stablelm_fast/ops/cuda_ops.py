"""The `cuda` backend: the C++ extension's CUDA kernels (csrc/cuda/), same signatures as ops/reference.py.

Ops with a CUDA kernel: layernorm, add_layernorm, silu_and_mul, qk_norm_rope_cache, paged_attention_decode.
The rest fall back to the torch reference (linear -> cuBLAS through F.linear; varlen paged_attention -> reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import stablelm_fast._C  # noqa: F401  (registers torch.ops.stablelm_fast)
import stablelm_fast.ops.cpu_ops  # noqa: F401  (registers the ops' fake impls)
from stablelm_fast.ops import reference as _ref

_ops = torch.ops.stablelm_fast

paged_attention = _ref.paged_attention  # no varlen CUDA kernel yet


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _kernel_ok(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.float32, torch.float16, torch.bfloat16)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    if not _kernel_ok(x):
        return _ref.layernorm(x, weight, bias, eps)
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _ops.layernorm(out, x2, weight, bias, eps)
    return out.view(x.shape)


def add_layernorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is None:
        return layernorm(x, weight, bias, eps), x
    if not _kernel_ok(x):
        return _ref.add_layernorm(x, residual, weight, bias, eps)
    x2, r2 = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _ops.add_layernorm(out, new_residual, x2, r2, weight, bias, eps)
    return out.view(x.shape), new_residual.view(x.shape)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if not _kernel_ok(gate_up):
        return _ref.silu_and_mul(gate_up)
    g2 = gate_up.reshape(-1, gate_up.shape[-1])
    out = torch.empty(g2.shape[0], g2.shape[1] // 2, dtype=gate_up.dtype, device=gate_up.device)
    _ops.silu_and_mul(out, g2)
    return out.view(*gate_up.shape[:-1], -1)


def gate_up_silu(x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
    return silu_and_mul(F.linear(x, gate_up_weight))


def qk_norm_rope_cache(
    qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
    num_q_heads, num_kv_heads, head_dim,
):
    if not _kernel_ok(qkv) or k_cache.dtype != qkv.dtype or head_dim > 256:
        return _ref.qk_norm_rope_cache(
            qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
            num_q_heads, num_kv_heads, head_dim,
        )
    q = torch.empty(qkv.shape[0], num_q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _ops.qk_norm_rope_cache(
        q, qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
        num_q_heads, num_kv_heads, head_dim,
    )
    return q


def paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale):
    if not _kernel_ok(q) or k_cache.dtype != q.dtype or q.shape[-1] > 256:
        return _ref.paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    q = q.contiguous()
    out = torch.empty_like(q)
    _ops.paged_attention_decode(out, q, k_cache, v_cache, block_tables, context_lens, scale)
    return out
