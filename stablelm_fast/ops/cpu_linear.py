"""The `cpu` backend's linear layers: load-time packing and the C++ GEMMs that read packed weights in place.

`pack_linear_weight` repacks a weight once, after loading, into the layout of the ISA this process runs
(`cpu_isa()`: probed once in C++, csrc/cpu/isa.h, capped by STABLELM_FAST_ISA=amx|avx512bf16|avx2|scalar;
STABLELM_FAST_NO_AVX2=1 is STABLELM_FAST_ISA=scalar). The layout, and so the ISA it was packed for, is the packed
tensor's shape (csrc/cpu/packed.h):

    [N, K, 1]      panels of 16 features (AVX2 kernel; the scalar kernel without AVX2); any float dtype
    [N, K / 2, 2]  vnni pairs along K (AVX512-BF16 kernel, vdpbf16ps); bf16 weights with K even

N need not be a multiple of 16 (the last panel holds the rest), so every weight takes the packed path. The packed
weight is a plain tensor: it lives as an nn.Parameter's .data. `linear` / `gate_up_silu` on a weight that was not
packed (2-D) use torch (half precision through fp32, see _torch_linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import stablelm_fast._C  # noqa: F401  (registers torch.ops.stablelm_fast)
from stablelm_fast.ops import cpu_memory
from stablelm_fast.ops.extension import as_rows, silu_and_mul

_ops = torch.ops.stablelm_fast
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# Row-major half-precision weights (not packed) above this many rows of x go through fp32 1024 rows of W at a time:
# torch's own bf16 GEMM is slow without AMX (bench/kernels/bench_gemm.py prints it next to ours).
CONVERT_ROWS = 1024


def cpu_isa() -> str:
    """The ISA of the CPU kernels in this process: "amx", "avx512bf16", "avx2" or "scalar"."""
    return _ISA


_ISA = _ops.cpu_isa()


def packed_layout(weight: torch.Tensor) -> str | None:
    """"panels", "vnni", or None for a weight that is not packed."""
    if weight.dim() != 3:
        return None
    return "vnni" if weight.shape[2] == 2 else "panels"


def pack_linear_weight(weight: torch.Tensor, halves: bool = False) -> torch.Tensor:
    """Load-time repacking of a linear weight [N, K] for this process's ISA (layouts above); linear /
    gate_up_silu read it in place at every M. halves: a gate_up weight [Wg; Wu], whose halves are packed apart.
    Weights the kernels do not take (not a 2-D float tensor on the CPU, or one that needs grad) come back unchanged.
    """
    if not (weight.dim() == 2 and weight.dtype in _FLOATS and weight.device.type == "cpu"
            and not weight.requires_grad and weight.numel() > 0):
        return weight
    n, k = weight.shape
    if halves and n % 2:
        raise ValueError(f"a gate_up weight (halves=True) needs an even number of rows, got {n}")
    if _ISA in ("avx512bf16", "amx") and weight.dtype == torch.bfloat16 and k % 2 == 0:
        out = cpu_memory.weight_empty((n, k // 2, 2), weight.dtype)
    else:
        out = cpu_memory.weight_empty((n, k, 1), weight.dtype)
    _ops.pack_linear_weight(out, weight.contiguous(), halves)
    return out


def _check(x: torch.Tensor, packed: torch.Tensor) -> None:
    if x.dtype != packed.dtype:
        raise ValueError(f"x is {x.dtype} but the packed weight is {packed.dtype}: both must have the same dtype")
    k = packed.shape[1] * packed.shape[2]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the packed weight takes K = {k}")


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torch on a row-major weight; half precision converted to fp32 1024 rows of W at a time (fp32 accumulation)."""
    if not (x.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype):
        return F.linear(x, weight, bias)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    x32 = x.float()
    for n0 in range(0, weight.shape[0], CONVERT_ROWS):
        n1 = min(n0 + CONVERT_ROWS, weight.shape[0])
        torch.mm(x32, weight[n0:n1].float().t(), out=out[:, n0:n1])
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] (or [..., K]); weight: [N, K] or packed by pack_linear_weight; bias: [N] -> [M, N]."""
    x2 = as_rows(x)
    if weight.dim() != 3:
        out = _torch_linear(x2, weight, bias)
    else:
        _check(x, weight)
        out = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        _ops.linear(out, x2, weight, bias)
    return out if x2 is x else out.view(*x.shape[:-1], weight.shape[0])


def gate_up_silu(x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
    """x: [M, H]; gate_up_weight: [2I, H] (or packed with halves=True) -> silu(x Wg^T) * (x Wu^T): [M, I]."""
    x2 = as_rows(x)
    inter = gate_up_weight.shape[0] // 2
    if gate_up_weight.dim() != 3:
        out = silu_and_mul(_torch_linear(x2, gate_up_weight, None))
    else:
        _check(x, gate_up_weight)
        out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
        _ops.gate_up_silu(out, x2, gate_up_weight)
    return out if x2 is x else out.view(*x.shape[:-1], inter)
