"""The `cuda` backend: the C++ extension's CUDA kernels (csrc/cuda/), same signatures as ops/reference.py.

Ops with a CUDA kernel: layernorm, add_layernorm, silu_and_mul, qk_norm_rope_cache, paged_attention_decode. The
torch.ops are registered for CPU and CUDA alike, so the Python wrappers (output allocation) are cpu_ops' own; this
module only decides, per call, between the kernel and a fallback: cuBLAS (F.linear) for GEMMs, the Triton varlen
kernel for prefill/extend attention (the torch reference if Triton is missing), the reference for unsupported dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stablelm_fast.ops import cpu_ops as _wrappers
from stablelm_fast.ops import reference as _ref

try:  # NOTE: no varlen CUDA kernel in csrc/ yet; the Triton one is the fast path on GPUs.
    from stablelm_fast.kernels.paged_attention_prefill import paged_attention as _triton_paged_attention
except ImportError:  # pragma: no cover  (triton is installed wherever CUDA is)
    _triton_paged_attention = None


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


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
    impl = _triton_paged_attention if (_triton_paged_attention is not None and q.is_cuda) else _ref.paged_attention
    return impl(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)
