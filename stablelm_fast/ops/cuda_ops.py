"""The `cuda` backend: the C++ extension's CUDA kernels (csrc/cuda/), same signatures as ops/reference.py.

Ops with a CUDA kernel: layernorm, add_layernorm, silu_and_mul, qk_norm_rope_cache, paged_attention_decode, served
through ops/extension.py's wrappers (the torch.ops are registered for CPU and CUDA alike). Each op here decides per
call between its kernel and the reference (dtypes/head sizes the kernel does not take). GEMMs are cuBLAS (F.linear);
prefill/extend attention (no CUDA varlen kernel yet) comes from the triton backend through registry.FALLBACK.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stablelm_fast.ops import extension as _wrappers
from stablelm_fast.ops import reference as _ref


def _kernel_ok(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.float32, torch.float16, torch.bfloat16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def gate_up_silu(x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
    return silu_and_mul(F.linear(x, gate_up_weight))


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    impl = _wrappers.layernorm if _kernel_ok(x) else _ref.layernorm
    return impl(x, weight, bias, eps)


def add_layernorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _wrappers.add_layernorm if _kernel_ok(x) else _ref.add_layernorm
    return impl(x, residual, weight, bias, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return (_wrappers.silu_and_mul if _kernel_ok(gate_up) else _ref.silu_and_mul)(gate_up)


def qk_norm_rope_cache(qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
                       num_q_heads, num_kv_heads, head_dim):
    ok = _kernel_ok(qkv) and k_cache.dtype == qkv.dtype and head_dim <= 256
    impl = _wrappers.qk_norm_rope_cache if ok else _ref.qk_norm_rope_cache
    return impl(qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
                num_q_heads, num_kv_heads, head_dim)


def paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale):
    ok = _kernel_ok(q) and k_cache.dtype == q.dtype and q.shape[-1] <= 256
    impl = _wrappers.paged_attention_decode if ok else _ref.paged_attention_decode
    return impl(q.contiguous() if ok else q, k_cache, v_cache, block_tables, context_lens, scale)
