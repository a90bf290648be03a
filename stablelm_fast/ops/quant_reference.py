"""Torch references of the weight-only quantized linear ops (int8, int6 and int4), and the reference quantizer.

Canonical form of a quantized linear weight W [N, K] (what the reference ops read, what load-time code produces, and
what each backend's `pack_quant_weight` starts from):

    bits 8:  qweight int8  [N, K]        q in [-128, 127]; zero point 0 when zeros is None
    bits 4:  qweight uint8 [N, K / 2]    two values in [0, 15] per byte: k even in the low nibble, k odd in the high
                                         nibble; zero point 8 when zeros is None
    bits 6:  qweight uint8 [N, K]        q in [0, 63]; zero point 32 when zeros is None (the lm_head of int4
                                         models, as llama.cpp's Q4_0 files keep their output layer in Q6_K)
    scales   float32 [N, K / G]          one per output feature and group of G = group_size consecutive k; the
                                         quantizer here makes them fp16 values (the CPU backend stores fp16)
    zeros    uint8 [N, K / G] or None    asymmetric zero points, in quantized units

    W[n, k] = (q[n, k] - zero[n, k // G]) * scales[n, k // G]

G divides K (per-output-channel int8 is G = K). GPTQ's act-order (g_idx not k // G) is turned into this form at load
by permuting K (the layer then permutes x's features the same way before the op).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_ZERO = {8: 0, 6: 32, 4: 8}


def check_quant_args(bits: int, group_size: int, k: int) -> None:
    if bits not in DEFAULT_ZERO:
        raise ValueError(f"bits must be 8, 6 or 4, got {bits}")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size must divide K = {k}; got {group_size}")


def check_quantize_args(bits: int, group_size: int, k: int, symmetric: bool) -> None:
    """What every quantize_weight implementation accepts (ValueError otherwise)."""
    check_quant_args(bits, group_size, k)
    if bits == 8 and not symmetric:
        raise ValueError("asymmetric int8 is not supported: int8 is symmetric per channel or per group")


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] -> uint8 [N, K] (low nibble first)."""
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] with values in [0, 15], K even -> uint8 [N, K / 2] (k even in the low nibble)."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 weights need an even K, got {q.shape[-1]}")
    q = q.to(torch.uint8).view(q.shape[0], -1, 2)
    return q[..., 0] | (q[..., 1] << 4)


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      group_size: int) -> torch.Tensor:
    """Canonical quantized weight -> float32 [N, K]."""
    q = (unpack_int4(qweight) if bits == 4 else qweight).float()
    n, k = q.shape
    check_quant_args(bits, group_size, k)
    zero = zeros.float()[..., None] if zeros is not None else float(DEFAULT_ZERO[bits])
    w = (q.view(n, k // group_size, group_size) - zero) * scales.float()[..., None]
    return w.view(n, k)


FP16_SMALLEST, FP16_MAX = 2.0**-24, 65504.0  # the smallest positive and the largest fp16 values


def fp16_grid(scales: torch.Tensor) -> torch.Tensor:
    """Positive fp32 scales -> the nearest fp16 values (as fp32), kept within fp16's positive range (never 0 or inf).
    The CPU kernels store scales in fp16 (half the bytes of fp32: ~3% of an int4 g128 weight); rounding them here,
    before the weights are rounded against them, makes that storage exact."""
    return scales.clamp(FP16_SMALLEST, FP16_MAX).half().float()


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest quantization of W [N, K] (any float dtype) into the canonical form above.

    symmetric: scale = max|w| / qmax over each group (int8: 127, int6: 31, stored as q + 32, int4: 7, stored as
    q + 8), zeros None. Scales are rounded to fp16 values (fp16_grid) before the weights are rounded against them.
    Asymmetric (int6 / int4): scale = (max - min) / (2^bits - 1) over each group (the range widened to hold 0),
    zero = round(-min / scale), zeros returned (uint8)."""
    n, k = weight.shape
    check_quantize_args(bits, group_size, k, symmetric)
    w = weight.float().view(n, k // group_size, group_size)
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scales = w.abs().amax(dim=-1) / qmax
        scales = fp16_grid(torch.where(scales > 0, scales, torch.ones_like(scales)))
        q = torch.round(w / scales[..., None]).clamp(-qmax - 1, qmax) + DEFAULT_ZERO[bits]
        zeros = None
    else:
        levels = (1 << bits) - 1
        lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
        scales = (hi - lo) / levels
        scales = fp16_grid(torch.where(scales > 0, scales, torch.ones_like(scales)))
        zero = torch.round(-lo / scales).clamp(0, levels)
        q = torch.round(w / scales[..., None] + zero[..., None]).clamp(0, levels)
        zeros = zero.to(torch.uint8)
    q = q.view(n, k)
    qweight = pack_int4(q) if bits == 4 else q.to(torch.int8 if bits == 8 else torch.uint8)
    return qweight, scales.contiguous(), zeros


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """x: [M, K] -> [M, N] = x W^T + bias with W dequantized (fp32 math, returned in x.dtype)."""
    w = dequantize_weight(qweight, scales, zeros, bits, group_size)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def quant_gate_up_silu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bits: int, group_size: int) -> torch.Tensor:
    """x: [M, H]; a quantized [Wg; Wu] ([2I, H]) -> silu(x Wg^T) * (x Wu^T) [M, I], fp32 math, in x.dtype."""
    w = dequantize_weight(qweight, scales, zeros, bits, group_size)
    gate, up = F.linear(x.float(), w).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def quant_bits() -> tuple[int, ...]:
    """The weight bit widths a backend's quant_linear runs with its own kernels (the reference: all of them)."""
    return (8, 6, 4)


def pack_quant_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      group_size: int, halves: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Load-time repacking of a canonical quantized weight into a backend's layout; the reference keeps it as is.
    halves: a gate_up weight [Wg; Wu] whose halves must stay apart."""
    return qweight, scales, zeros
