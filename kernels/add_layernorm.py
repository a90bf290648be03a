"""Fused residual-add + LayerNorm (with bias), and plain LayerNorm, one row per Triton program.

What it fuses: `s = x + residual` (rounded to x.dtype, exactly like the unfused model, see reference.add_layernorm),
the store of `s` as the new residual, and LayerNorm(s) * weight + bias computed in fp32. Unfused this is 3 kernels and
~5 passes over [T, H]; fused it is one read of x and residual and one write of normed and new_residual.

Roofline (A100, ~2 TB/s HBM, bf16): per token 2*H*2 bytes read + 2*H*2 bytes written (+ weight/bias, cached in L2).
For StableLM-12B (H=5120) that is ~40 KB/token: a 4096-token prefill moves ~170 MB -> ~85 us per norm; at decode
(T ~ 64) it is launch-bound (~5 us). Compute (~10 flop/element) is negligible, so the kernel is purely memory-bound:
one row per program, the whole row in registers (BLOCK_H = next_pow2(H) <= 8192 elements), one pass.

Not verified here: GPU performance / num_warps choice (only the Triton interpreter on CPU is available).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def add_layernorm_kernel(
    x_ptr,  # [T, H]
    res_ptr,  # [T, H] (ignored unless HAS_RESIDUAL)
    w_ptr,  # [H]
    b_ptr,  # [H] (ignored unless HAS_BIAS)
    out_ptr,  # [T, H] normed, x.dtype
    new_res_ptr,  # [T, H] x + residual, x.dtype (ignored unless HAS_RESIDUAL)
    stride_x,  # row strides (elements); the last dim is contiguous
    stride_res,
    stride_out,
    stride_new_res,
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: T * H can exceed 2**31 for long prefills with big H
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # Round the sum to the activation dtype before the norm: the unfused model stores it that way.
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_res_ptr + row * stride_new_res + cols, s, mask=mask)
        s = s.to(tl.float32)
    else:
        s = x.to(tl.float32)
    mean = tl.sum(s, axis=0) / H
    diff = tl.where(mask, s - mean, 0.0)  # padded lanes must not enter the variance
    var = tl.sum(diff * diff, axis=0) / H  # biased variance, as F.layer_norm
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = diff * rstd * w
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    H = x.shape[1]
    if x.stride(1) != 1:
        raise ValueError("x must be contiguous in its last dim")
    if weight.shape != (H,) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{H}] tensor, got {tuple(weight.shape)}")
    if bias is not None and (bias.shape != (H,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{H}] tensor, got {tuple(bias.shape)}")
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError("x, weight and bias must be on the same device")


def _launch(x, residual, weight, bias, eps, out, new_res) -> None:
    T, H = x.shape
    if T == 0:
        return
    BLOCK_H = triton.next_power_of_2(H)
    num_warps = 4 if BLOCK_H <= 2048 else 8 if BLOCK_H <= 8192 else 16
    has_res = residual is not None
    add_layernorm_kernel[(T,)](
        x,
        residual if has_res else x,
        weight,
        bias if bias is not None else weight,
        out,
        new_res if has_res else out,
        x.stride(0),
        residual.stride(0) if has_res else 0,
        out.stride(0),
        new_res.stride(0) if has_res else 0,
        H,
        eps,
        HAS_RESIDUAL=has_res,
        HAS_BIAS=bias is not None,
        BLOCK_H=BLOCK_H,
        num_warps=num_warps,
    )


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: [T, H]; weight, bias: [H] -> [T, H] in x.dtype (fp32 math)."""
    _check(x, weight, bias)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x, None, weight, bias, eps, out, None)
    return out


def add_layernorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H] -> (layernorm(x + residual), x + residual). With residual None the new residual is x."""
    _check(x, weight, bias)
    if residual is None:
        return layernorm(x, weight, bias, eps), x
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1:
        raise ValueError(
            f"residual must match x (shape {tuple(x.shape)}, dtype {x.dtype}, last dim contiguous); "
            f"got shape {tuple(residual.shape)}, dtype {residual.dtype}"
        )
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    new_res = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x, residual, weight, bias, eps, out, new_res)
    return out, new_res
