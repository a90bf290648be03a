"""Op backends. Every backend module exposes the same functions with the signatures of `reference.py`:

    linear(x, weight, bias)                       -> F.linear semantics; x: [M, K], weight: [N, K]
    gate_up_silu(x, gate_up_weight)               -> silu(x Wg^T) * (x Wu^T), [M, I]
    layernorm(x, weight, bias, eps)
    add_layernorm(x, residual, weight, bias, eps) -> (normed, new_residual)
    silu_and_mul(gate_up)
    qk_norm_rope_cache(qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache,
                       slot_mapping, num_q_heads, num_kv_heads, head_dim) -> q
    paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)
    paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale)

Backends: "torch" (ops.torch_ops, the reference), "cpu" (ops.cpu_ops, the C++ extension), "triton"
(ops.triton_ops, kernels/), "cuda" (ops.cuda_ops, the C++ extension's CUDA kernels).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend for the device, and check that a named one can run there."""
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of 'auto', {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "cuda" if extension_has_cuda() else "triton"
        return "cpu" if extension_available() and importlib.util.find_spec("stablelm_fast.ops.cpu_ops") else "torch"
    if backend == "cpu" and not extension_available():
        raise ValueError("backend='cpu' needs the C++ extension stablelm_fast._C, which is not built")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError("backend='cpu' runs on device='cpu' only")
    if backend == "cuda" and (device.type != "cuda" or not extension_has_cuda()):
        raise ValueError("backend='cuda' needs a CUDA device and the extension built with CUDA")
    return backend


def extension_available() -> bool:
    try:
        importlib.import_module("stablelm_fast._C")
    except ImportError:
        return False
    return True


def extension_has_cuda() -> bool:
    return extension_available() and torch.cuda.is_available() and hasattr(torch.ops.stablelm_fast, "cuda_available")


def get_ops(backend: str) -> ModuleType:
    """The module implementing `backend` (already resolved by resolve_backend)."""
    return importlib.import_module(f"stablelm_fast.ops.{backend}_ops")
