"""The `cpu` backend: the C++ extension's CPU kernels (csrc/cpu/), same signatures as ops/reference.py.

Outputs are allocated here and passed to the ops as out-parameters. `linear`, `gate_up_silu` and
`pack_linear_weight` live in ops/cpu_linear.py (the C++ GEMMs on weights packed at load for the ISA in use).
"""

from __future__ import annotations

import torch

import stablelm_fast._C  # noqa: F401  (registers torch.ops.stablelm_fast)

_ops = torch.ops.stablelm_fast


def _register_fake_impls() -> None:
    """Fake (meta) kernels so that torch.compile / FakeTensor tracing and torch.library.opcheck see the ops.

    Every op writes only its out-parameters (marked Tensor! in the schema) and returns nothing.
    """

    def _none(*args, **kwargs):
        return None

    for name in ("layernorm", "add_layernorm", "silu_and_mul", "qk_norm_rope_cache", "paged_attention",
                 "paged_attention_decode", "linear", "gate_up_silu", "pack_linear_weight"):
        try:
            torch.library.register_fake(f"stablelm_fast::{name}")(_none)
        except RuntimeError:  # already registered (module re-imported)
            pass


_register_fake_impls()

from stablelm_fast.ops.cpu_linear import gate_up_silu, linear, pack_linear_weight  # noqa: E402,F401


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _ops.layernorm(out, x2, weight, bias, eps)
    return out.view(x.shape)


def add_layernorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is None:
        return layernorm(x, weight, bias, eps), x
    x2, r2 = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _ops.add_layernorm(out, new_residual, x2, r2, weight, bias, eps)
    return out.view(x.shape), new_residual.view(x.shape)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    g2 = gate_up.reshape(-1, gate_up.shape[-1])
    out = torch.empty(g2.shape[0], g2.shape[1] // 2, dtype=gate_up.dtype, device=gate_up.device)
    _ops.silu_and_mul(out, g2)
    return out.view(*gate_up.shape[:-1], -1)


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
