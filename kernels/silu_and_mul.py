"""SiLU-and-multiply for the StableLM MLP: `silu(gate) * up`, standalone and fused into the gate/up GEMM epilogue.

`silu_and_mul(gate_up)`: elementwise over the packed [T, 2*I] GEMM output. Roofline (A100, ~2 TB/s, bf16): reads
2*I*2 bytes and writes I*2 bytes per token; StableLM-12B (I=13824) -> ~83 KB/token, ~170 MB for a 2048-token
prefill (~85 us). Purely memory-bound.

`gate_up_silu(x, W)`: a tiled GEMM that computes, for the same output tile, both x @ Wg^T and x @ Wu^T (W rows n and
I+n) with tl.dot over K tiles, and applies silu(g) * u in the epilogue, so the [T, 2*I] intermediate is never
written to HBM (saves 3*I*2 bytes/token of traffic and a launch). Prefill is compute-bound (2*T*H*2I flop vs
~312 TFLOP/s bf16); decode (small T) is weight-read-bound (2I*H*2 bytes: 12B -> ~283 MB/layer -> ~140 us).
NOTE: g and u are rounded to x.dtype before the SiLU, exactly like the unfused F.linear + silu_and_mul reference.

Not verified here: GPU performance and tile/num_stages tuning (only the Triton interpreter on CPU is available).
The interpreter computes tl.dot on bf16 inputs incorrectly (garbage values, triton 3.9), so when
TRITON_INTERPRET=1 the tiles are upcast to fp32 before tl.dot (exact products, same math as a bf16 MMA with fp32
accumulation); on a GPU the native bf16 tl.dot is used.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from stablelm_fast.kernels._common import upcast_dot


@triton.jit
def silu_and_mul_kernel(
    gate_up_ptr,  # [T, 2*I]: gate in columns [0, I), up in [I, 2I)
    out_ptr,  # [T, I]
    stride_in,  # row strides (elements)
    stride_out,
    I,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_ptr + row * stride_in + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u  # silu(g) * u in fp32
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2*I] -> [T, I] = silu(gate) * up (fp32 math, gate_up.dtype out)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 != 0:
        raise ValueError(f"gate_up must be [T, 2*I], got shape {tuple(gate_up.shape)}")
    if gate_up.stride(1) != 1:
        raise ValueError("gate_up must be contiguous in its last dim")
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((T, I), dtype=gate_up.dtype, device=gate_up.device)
    if T == 0 or I == 0:
        return out
    BLOCK = min(1024, triton.next_power_of_2(I))
    silu_and_mul_kernel[(T, triton.cdiv(I, BLOCK))](gate_up, out, gate_up.stride(0), out.stride(0), I, BLOCK=BLOCK)
    return out


@triton.jit
def gate_up_silu_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [2*I, K] (nn.Linear layout: gate rows [0, I), up rows [I, 2I))
    out_ptr,  # [M, I]
    M,
    I,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter workaround, see the header
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output column n uses W rows n (gate) and I + n (up)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < I
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BM, BK]
    # W tiles are loaded transposed ([BK, BN]) so that tl.dot(x, w) = x @ W^T.
    wg_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    wu_ptrs = wg_ptrs + I * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        # One x tile feeds both products: x is read once per (gate, up) column pair.
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        bg = tl.load(wg_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        bu = tl.load(wu_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
            acc_g += tl.dot(a, bg, input_precision="ieee")
            acc_u += tl.dot(a, bu, input_precision="ieee")
        else:
            acc_g += tl.dot(a, bg)
            acc_u += tl.dot(a, bu)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    # Epilogue: round g and u to the activation dtype (the unfused GEMM would store them so), then silu(g) * u in fp32.
    g = acc_g.to(out_ptr.dtype.element_ty).to(tl.float32)
    u = acc_u.to(out_ptr.dtype.element_ty).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gate_up_silu(
    x: torch.Tensor,
    gate_up_weight: torch.Tensor,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """x: [M, H]; gate_up_weight: [2*I, H] -> silu(x @ Wg^T) * (x @ Wu^T): [M, I] in x.dtype.

    block_* override the tile sizes (tests use 16 to keep the interpreter fast); tl.dot needs every tile dim >= 16.
    """
    if x.dim() != 2 or gate_up_weight.dim() != 2:
        raise ValueError(
            f"x must be [M, H] and gate_up_weight [2*I, H]; got {tuple(x.shape)}, {tuple(gate_up_weight.shape)}"
        )
    M, K = x.shape
    if gate_up_weight.shape[1] != K or gate_up_weight.shape[0] % 2 != 0:
        raise ValueError(f"gate_up_weight must be [2*I, {K}], got {tuple(gate_up_weight.shape)}")
    if x.dtype != gate_up_weight.dtype:
        raise ValueError(f"x and gate_up_weight dtypes differ: {x.dtype} vs {gate_up_weight.dtype}")
    if x.stride(1) != 1 or gate_up_weight.stride(1) != 1:
        raise ValueError("x and gate_up_weight must be contiguous in their last dim")
    I = gate_up_weight.shape[0] // 2
    out = torch.empty((M, I), dtype=x.dtype, device=x.device)
    if M == 0 or I == 0:
        return out
    # Small M (decode) is weight-bound: a short BLOCK_M wastes less of the MMA; large M wants big square tiles.
    # fp32 (ieee tl.dot on upcast tiles) holds twice the bytes per tile: BLOCK_K 32 and BLOCK_M <= 64, else ptxas
    # spills (up to 5 KB of stack at 128x64x64, found by gpu/aot_compile.py). 8 warps: two [BM, BN] fp32
    # accumulators at BM = 128 spill with 4 warps on sm_80.
    wide = x.dtype == torch.float32
    BM = block_m or (16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 or wide else 128)
    BN = block_n or 64
    BK = block_k or (32 if wide else 64)
    grid = (triton.cdiv(M, BM), triton.cdiv(I, BN))
    gate_up_silu_kernel[grid](
        x, gate_up_weight, out, M, I, K, x.stride(0), gate_up_weight.stride(0), out.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, UPCAST_DOT=upcast_dot(x.dtype), num_warps=8,
    )
    return out
