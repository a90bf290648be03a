"""The `cpu` backend's weight-only int8 / int6 / int4 linear layers: load-time packing and the C++ kernels
(torch.ops.stablelm_fast.cpu_quant_linear, csrc/cpu/quant_*.cpp) that read the packed weights in place.

`pack_quant_weight` turns the canonical form (ops/quant_reference.py) into the layout of csrc/cpu/quant.h, chosen
once per process from the ISA (`quant_layout()`: "vnni" with AVX512-VNNI, else "avx2", or "scalar"; capped by
STABLELM_FAST_ISA like every CPU kernel): panels of 16 output features, 4 bytes of k per feature side by side (the
operand of vpdpbusd / vpmaddubsw); int8 stored + 128 as uint8 for vpdpbusd ("vnni"), signed for vpmaddubsw's sign
trick ("avx2", "scalar"); int4 as two nibbles per byte, k and k + 4; int6 per 16 k as two int4-style rows of the
low nibbles and one row of the top two bits of all 16 k. A packed qweight is 3-D ([N, R, 4]), scales (fp16) and
zeros keep their canonical shapes: scales quantized here are fp16 values already (quant_reference.fp16_grid), GPTQ /
AWQ ones are fp16 in their files; others (a checkpoint's bf16 / fp32) round to the nearest fp16. Weights the
kernels do not take (group size not a multiple of 4 for int8 / 8 for int4 / 32 for int6, not on the CPU) stay
canonical, and quant_linear / quant_gate_up_silu run the reference on them.

The kernels quantize x to int8 per block of k (decode, and every M on AVX2 or for fp32 / fp16 x; `act_block`: 32 k
as llama.cpp does for its Q8_0 / Q4_0 dot products, up to 128 for int4 / int6 on AVX512-VNNI); bf16 x above 4
tokens on AVX512-BF16 machines goes through dequantized bf16 blocks instead (csrc/cpu/quant_linear.cpp).
`activation_error_bound` is the bound on what quantizing x adds.
"""

from __future__ import annotations

import torch

import stablelm_fast._C  # noqa: F401  (registers torch.ops.stablelm_fast)
from stablelm_fast.ops import cpu_memory
from stablelm_fast.ops import quant_reference as qref
from stablelm_fast.ops.extension import as_rows

_ops = torch.ops.stablelm_fast
_PANEL = 16
_LAYOUT = _ops.cpu_quant_layout()
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def quant_layout() -> str:
    """The layout this process packs int8 / int4 weights into: "vnni", "avx2" or "scalar"."""
    return _LAYOUT


def quant_bits() -> tuple[int, ...]:
    """The weight bit widths the kernels of this process run: all three, in every layout."""
    return (8, 6, 4)


def act_block(group_size: int, bits: int) -> int:
    """k per int8 block of x in the int-activation kernels (csrc/cpu/quant_linear.cpp act_block): the largest of 128,
    64, 32, 16, 8, 4 dividing the group size, at most 32 for int8 weights and outside the "vnni" layout."""
    most = 128 if _LAYOUT == "vnni" and bits != 8 else 32
    return next(b for b in (128, 64, 32, 16, 8, 4) if b <= most and group_size % b == 0)


def activation_error_bound(x: torch.Tensor, weight: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """[M, N]: the most that quantizing x to int8 (round to nearest, per block of B = act_block(group_size, bits) k,
    scale max|x_block| / 127) can move x @ weight^T: |x - x_q| <= scale / 2 element-wise, so the error of y[m, n] is
    at most sum over blocks b of scale[m, b] / 2 * sum_{k in b} |W[n, k]|. weight: the dequantized [N, K] (fp32)."""
    m, k = x.shape
    b = act_block(group_size, bits)
    half_scale = x.float().abs().view(m, k // b, b).amax(-1) / 127 / 2  # [M, K / B]
    wabs = weight.float().abs().view(weight.shape[0], k // b, b).sum(-1)  # [N, K / B]
    return half_scale @ wabs.t()


def _panel_order(a: torch.Tensor) -> torch.Tensor:
    """[n, R, C] rows of features -> the same elements in panel order (quant.h): full panels [R][16][C], then the
    tail [R][n % 16][C]; returned with a's shape."""
    n = a.shape[0]
    full = n - n % _PANEL
    parts = [a[:full].reshape(full // _PANEL, _PANEL, *a.shape[1:]).permute(0, 2, 1, 3).reshape(-1)]
    if full < n:
        parts.append(a[full:].permute(1, 0, 2).reshape(-1))
    return torch.cat(parts).view(a.shape)


def _pack_one(qweight, scales, zeros, bits: int, group_size: int):
    n = qweight.shape[0]
    if bits == 8:
        quads = qweight.view(n, -1, 4)
        if _LAYOUT == "vnni":
            quads = (quads.to(torch.int16) + 128).to(torch.uint8)
    elif bits == 4:
        u = qref.unpack_int4(qweight).view(n, -1, 2, 4)
        quads = u[:, :, 0] | (u[:, :, 1] << 4)
    else:  # per 16 k: low nibbles of k 0-7 (as int4), of k 8-15, then the top two bits of each k (quant.h)
        u = qweight.view(n, -1, 4, 4)  # [n, K / 16, 4 runs of 4 k, 4]
        lo, hi = u & 15, u >> 4
        quads = torch.stack([lo[:, :, 0] | (lo[:, :, 1] << 4), lo[:, :, 2] | (lo[:, :, 3] << 4),
                             hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)], dim=2)
        quads = quads.view(n, -1, 4)
    packed_q = _panel_order(quads.contiguous())
    scales16 = scales.float().clamp(-qref.FP16_MAX, qref.FP16_MAX).half()
    packed_s = _panel_order(scales16.contiguous().unsqueeze(-1)).view(scales.shape)
    packed_z = None if zeros is None else _panel_order(zeros.contiguous().unsqueeze(-1)).view(zeros.shape)
    return packed_q, packed_s, packed_z


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """quant_reference.quantize_weight (the canonical form), bit for bit, in one C++ pass over each group
    (csrc/cpu/quantize.cpp): the reference's ~10 fp32 passes took ~25 s of loading the 1.6B in int4."""
    n, k = weight.shape
    qref.check_quantize_args(bits, group_size, k, symmetric)
    if weight.device.type != "cpu" or weight.dtype not in _FLOATS or (bits == 4 and k % 2):
        return qref.quantize_weight(weight, bits, group_size, symmetric)
    qweight = torch.empty(n, k // 2 if bits == 4 else k, dtype=torch.int8 if bits == 8 else torch.uint8)
    scales = torch.empty(n, k // group_size, dtype=torch.float32)
    zeros = None if symmetric else torch.empty(n, k // group_size, dtype=torch.uint8)
    _ops.cpu_quantize_weight(qweight, scales, zeros, as_rows(weight), bits, group_size)
    return qweight, scales, zeros


def pack_quant_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      group_size: int, halves: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Canonical (qweight, scales, zeros) -> this process's layout (module docstring). halves: a gate_up weight
    [Wg; Wu] whose halves are packed apart."""
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    qref.check_quant_args(bits, group_size, k)
    if scales.shape != (n, k // group_size) or (zeros is not None and zeros.shape != scales.shape):
        raise ValueError(f"scales / zeros must be [N, K / group_size] = [{n}, {k // group_size}], got "
                         f"{tuple(scales.shape)} / {None if zeros is None else tuple(zeros.shape)}")
    if halves and n % 2:
        raise ValueError(f"a gate_up weight (halves=True) needs an even number of rows, got {n}")
    if (qweight.device.type != "cpu" or qweight.dim() != 2 or group_size % {8: 4, 6: 32, 4: 8}[bits]
            or qweight.dtype != (torch.int8 if bits == 8 else torch.uint8)):
        return qweight, scales, zeros
    zeros = None if zeros is None else zeros.to(torch.uint8)
    if not halves:
        packed = _pack_one(qweight, scales, zeros, bits, group_size)
    else:
        h = n // 2
        parts = [_pack_one(qweight[i * h:(i + 1) * h], scales[i * h:(i + 1) * h],
                           None if zeros is None else zeros[i * h:(i + 1) * h], bits, group_size) for i in range(2)]
        packed = (torch.cat([parts[0][0], parts[1][0]]), torch.cat([parts[0][1], parts[1][1]]),
                  None if zeros is None else torch.cat([parts[0][2], parts[1][2]]))
    return tuple(None if t is None else cpu_memory.to_weight_memory(t) for t in packed)


def _run(x, qweight, scales, zeros, bias, bits, group_size, gate_up: bool) -> torch.Tensor:
    if x.dtype not in _FLOATS:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    k = qweight.shape[1] * qweight.shape[2] * 8 // bits
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the packed weight takes K = {k}")
    n_out = qweight.shape[0] // 2 if gate_up else qweight.shape[0]
    x2 = as_rows(x)
    out = torch.empty(x2.shape[0], n_out, dtype=x.dtype)
    _ops.cpu_quant_linear(out, x2, qweight, scales, zeros, bias, bits, group_size, gate_up)
    return out if x2 is x else out.view(*x.shape[:-1], n_out)


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """x: [..., K]; a weight packed by pack_quant_weight (or canonical: the reference) -> [..., N]."""
    if qweight.dim() != 3:
        return qref.quant_linear(x, qweight, scales, zeros, bias, bits, group_size)
    return _run(x, qweight, scales, zeros, bias, bits, group_size, False)


def quant_gate_up_silu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bits: int, group_size: int) -> torch.Tensor:
    """x: [..., H]; [Wg; Wu] packed with halves=True (or canonical) -> silu(x Wg^T) * (x Wu^T): [..., I]."""
    if qweight.dim() != 3:
        return qref.quant_gate_up_silu(x, qweight, scales, zeros, bits, group_size)
    return _run(x, qweight, scales, zeros, None, bits, group_size, True)


def _register_fake() -> None:
    try:
        torch.library.register_fake("stablelm_fast::cpu_quant_linear")(lambda *args, **kwargs: None)
    except RuntimeError:  # already registered (module re-imported)
        pass


_register_fake()
