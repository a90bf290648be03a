"""The `cpu` backend: the C++ extension's CPU kernels (csrc/cpu/), same signatures as ops/reference.py.

Norms, activation, rotary + cache write and attention are the extension's kernels (ops/extension.py wraps them).
`linear` and `gate_up_silu` run the C++ panel
GEMM on weights repacked at load (pack_linear_weight; every M); weights it does not take (not whole panels of 16
features) run the C++ row-major GEMV (small M) and packed GEMM (larger M); torch's GEMM only without AVX2 above a
measured M.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import stablelm_fast._C  # noqa: F401  (registers torch.ops.stablelm_fast)
from stablelm_fast.ops.extension import (  # noqa: F401  (this backend's ops: the C++ kernels, wrapped)
    add_layernorm,
    layernorm,
    paged_attention,
    paged_attention_decode,
    qk_norm_rope_cache,
    silu_and_mul,
)
from stablelm_fast.ops.registry import register_fake_impls

_ops = torch.ops.stablelm_fast


register_fake_impls()

# The C++ linear / gate_up_silu cover every M on AVX2 machines. Panel-packed weights (pack_linear_weight, every
# model weight that is whole panels) run csrc/cpu/panel_gemm.cpp; row-major ones the weight-streaming GEMV up to 12
# rows, then the row-major packed GEMM (csrc/cpu/gemm.cpp). Both beat torch's GEMM at every M measured on the 1.6B
# shapes (bench/kernels/bench_gemm.py prints all of them).
# NOTE: STABLELM_FAST_NO_AVX2=1 forces the C++ scalar paths, as in csrc/cpu/cpu_types.h.
HAS_AVX2 = (torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX")
            and not os.environ.get("STABLELM_FAST_NO_AVX2"))
# Without AVX2 the C++ ops are scalar: largest M (rows of x) they still win at (measured with
# bench/kernels/bench_gemv.py); torch above.
SCALAR_MAX_M = {torch.bfloat16: 128, torch.float16: 128, torch.float32: 16}
# Above SCALAR_MAX_M, half-precision GEMMs convert the weight to fp32 a slice of rows at a time and use torch's fp32
# GEMM: torch's own bf16 GEMM has no fast path without AVX-512-BF16/AMX (~10 GFLOP/s against ~130 for this path
# at M=128-512, N=11264, K=2048 on 2 AVX2 cores). A 1024-row slice (8 MB at K=2048) stays in cache.
CONVERT_ROWS = 1024


def _half_gemm_via_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: [M, K] bf16/fp16; weight: [N, K] -> [M, N] in x.dtype, accumulated in fp32."""
    x32 = x.float()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    for n0 in range(0, weight.shape[0], CONVERT_ROWS):
        n1 = min(n0 + CONVERT_ROWS, weight.shape[0])
        torch.mm(x32, weight[n0:n1].float().t(), out=out[:, n0:n1])
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype and x.dim() == 2:
        return _half_gemm_via_fp32(x, weight, bias)
    return F.linear(x, weight, bias)


def _use_ours(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.dtype == weight.dtype
        and x.dtype in SCALAR_MAX_M
        and (HAS_AVX2 or x.shape[0] <= SCALAR_MAX_M[x.dtype])
        and weight.dim() == 2
        and weight.stride(1) == 1
        and not x.requires_grad
        and not weight.requires_grad
    )


def pack_linear_weight(weight: torch.Tensor, halves: bool = False) -> torch.Tensor:
    """Load-time repacking of a linear weight [N, K] into panels [N / 16, K, 16] (csrc/cpu/panel.h), which
    linear / gate_up_silu read in place at every M. halves: a gate_up weight [Wg; Wu], packed only if each half is
    whole panels. Weights the panel GEMM does not take (no AVX2, N not a multiple of 16) come back unchanged.
    """
    rows = weight.shape[0] // 2 if halves else weight.shape[0]
    if not (HAS_AVX2 and weight.dim() == 2 and weight.dtype in SCALAR_MAX_M and rows > 0 and rows % 16 == 0
            and weight.device.type == "cpu" and not weight.requires_grad):
        return weight
    out = torch.empty(weight.shape[0] // 16, weight.shape[1], 16, dtype=weight.dtype)
    _ops.pack_linear_weight(out, weight.contiguous())
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] (or [..., K]); weight: [N, K] or its panels [N / 16, K, 16]; bias: [N] -> [M, N]."""
    lead = x.shape[:-1]
    x2 = _rows(x)
    if weight.dim() == 3:  # panel-packed: the C++ panel GEMM
        out = torch.empty(x2.shape[0], weight.shape[0] * 16, dtype=x.dtype, device=x.device)
        _ops.linear(out, x2, weight, bias)
        return out.view(*lead, out.shape[1])
    if not _use_ours(x2, weight):
        return _torch_linear(x2, weight, bias).view(*lead, weight.shape[0])
    out = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _ops.linear(out, x2, weight, bias)
    return out.view(*lead, weight.shape[0])


def gate_up_silu(x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
    """x: [M, H]; gate_up_weight: [2I, H] (or its panels) -> silu(x Wg^T) * (x Wu^T): [M, I]."""
    lead = x.shape[:-1]
    x2 = _rows(x)
    if gate_up_weight.dim() == 3:  # panel-packed: the C++ panel GEMM
        out = torch.empty(x2.shape[0], gate_up_weight.shape[0] * 8, dtype=x.dtype, device=x.device)
        _ops.gate_up_silu(out, x2, gate_up_weight)
        return out.view(*lead, -1)
    if not _use_ours(x2, gate_up_weight):
        return silu_and_mul(_torch_linear(x2, gate_up_weight, None)).view(*lead, -1)
    out = torch.empty(x2.shape[0], gate_up_weight.shape[0] // 2, dtype=x.dtype, device=x.device)
    _ops.gate_up_silu(out, x2, gate_up_weight)
    return out.view(*lead, -1)
