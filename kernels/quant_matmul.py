"""Weight-only int8 / int4 matmul: `quant_linear` (x W^T + bias) and `quant_gate_up_silu` (silu(x Wg^T) * (x Wu^T)),
with W dequantized tile by tile inside the K loop and fp32 accumulation (torch reference: ops/quant_reference.py).

Weight layout: the canonical form of ops/quant_reference.py, unchanged (pack_quant_weight only checks it and makes
it contiguous). int8 [N, K]; int4 uint8 [N, K/2], k even in the low nibble; fp32 scales [N, K/G]; uint8 zeros
[N, K/G] or None (zero 0 / 8). Each program reads W rows n of its output tile along K, which is the contiguous
direction of that layout (16-byte vector loads of 16 int8 k or 32 int4 k); a transposed or interleaved repack
would only pay off with a hand-placed tensor-core fragment layout (Marlin-style), which tl.dot does not expose.

int4 without unpacking into K order: a byte tile [BK/2, BN] gives two [BK/2, BN] tiles, the low nibbles (k even)
and the high nibbles (k odd); x is loaded as its even and odd columns, and acc += x_even @ lo + x_odd @ hi. Same
MMA work as one BK-deep dot, no shuffles.

Scales: when the largest power of two dividing G is a legal BLOCK_K, BLOCK_K divides G and a K tile lies inside one
group: one scale (and zero) per column, loaded once per tile (SCALE_PER_TILE). Otherwise (G = K odd, G = 48...) they
are gathered per element (k // G), correct for any G, cached by L1.

Configurations:
  * M <= 16 (decode): weight-read-bound. BLOCK_M 16 (the smallest MMA), narrow BLOCK_N 32 and a deep BLOCK_K, and
    split-K so that ~2 waves of programs cover the SMs even when N / BLOCK_N is small (o_proj / down_proj of the
    1.6B: 64 column tiles on 132 SMs). Each split writes fp32 partial sums to a [S, M, N] workspace; a second small
    kernel sums the splits and applies the epilogue (bias, or silu(g) * u).
  * M > 16 (prefill): square tiles as in kernels/silu_and_mul.py, no split; epilogue fused.
gate_up (HALVES): output column n reads W rows n (gate) and I + n (up) into two accumulators, like
kernels/silu_and_mul.gate_up_silu; [M, 2I] is never written (except as fp32 split-K partials in decode).

Under TRITON_INTERPRET=1 tiles are upcast to fp32 before tl.dot (its bf16 dot is broken, see kernels/_common.py).
NOT VERIFIED on a GPU here: performance and tile choices (gpu/aot_compile.py checks they compile without spills).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from stablelm_fast.kernels._common import upcast_dot


@triton.jit
def _dequant(q, s_ptr, z_ptr, rows, mask_n, kk, mask_k, k0, G, stride_sn, DEFAULT_ZERO: tl.constexpr,
             HAS_ZEROS: tl.constexpr, SCALE_PER_TILE: tl.constexpr):
    """q: [BKq, BN] integer tile of W^T (k indices kk, rows `rows`) -> fp32 (q - zero) * scale."""
    q = q.to(tl.float32)
    if SCALE_PER_TILE:  # the whole tile lies in group k0 // G
        off = rows.to(tl.int64) * stride_sn + k0 // G
        s = tl.load(s_ptr + off, mask=mask_n, other=0.0)[None, :]
        z = tl.load(z_ptr + off, mask=mask_n, other=0).to(tl.float32)[None, :] if HAS_ZEROS else DEFAULT_ZERO
    else:
        off = rows[None, :].to(tl.int64) * stride_sn + (kk // G)[:, None]
        m = mask_k[:, None] & mask_n[None, :]
        s = tl.load(s_ptr + off, mask=m, other=0.0)
        z = tl.load(z_ptr + off, mask=m, other=0).to(tl.float32) if HAS_ZEROS else DEFAULT_ZERO
    return (q - z) * s


@triton.jit
def _tile_product(acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, mask_m, rows, mask_n, k0, k_end, G, stride_xm, stride_qn,
                  stride_sn, BITS: tl.constexpr, BLOCK_K: tl.constexpr, HAS_ZEROS: tl.constexpr,
                  SCALE_PER_TILE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + x[:, k0:k0+BK] @ dequant(W[rows, k0:k0+BK])^T."""
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    q_rows = qw_ptr + rows[None, :].to(tl.int64) * stride_qn
    if BITS == 8:
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < k_end
        a = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = tl.load(q_rows + kk[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0)
        w = _dequant(q, s_ptr, z_ptr, rows, mask_n, kk, mask_k, k0, G, stride_sn, 0, HAS_ZEROS, SCALE_PER_TILE)
        if UPCAST_DOT:
            acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
    else:
        j = tl.arange(0, BLOCK_K // 2)
        k_lo = k0 + 2 * j  # k of the low nibbles; the high nibbles hold k_lo + 1 (K is even)
        mask_k = k_lo < k_end
        a_lo = tl.load(x_rows + k_lo[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a_hi = tl.load(x_rows + (k_lo + 1)[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(q_rows + (k0 // 2 + j)[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0).to(tl.int32)
        w_lo = _dequant(b & 15, s_ptr, z_ptr, rows, mask_n, k_lo, mask_k, k0, G, stride_sn, 8, HAS_ZEROS,
                        SCALE_PER_TILE)
        w_hi = _dequant(b >> 4, s_ptr, z_ptr, rows, mask_n, k_lo + 1, mask_k, k0, G, stride_sn, 8, HAS_ZEROS,
                        SCALE_PER_TILE)
        if UPCAST_DOT:
            acc += tl.dot(a_lo.to(tl.float32), w_lo, input_precision="ieee")
            acc += tl.dot(a_hi.to(tl.float32), w_hi, input_precision="ieee")
        else:
            acc += tl.dot(a_lo, w_lo.to(a_lo.dtype))
            acc += tl.dot(a_hi, w_hi.to(a_hi.dtype))
    return acc


@triton.jit
def quant_matmul_kernel(
    x_ptr,  # [M, K] activations
    qw_ptr,  # int8 [N, K] or uint8 [N, K/2]
    s_ptr,  # fp32 [N, K/G]
    z_ptr,  # uint8 [N, K/G] (only read when HAS_ZEROS)
    bias_ptr,  # [N] (only read when HAS_BIAS)
    out_ptr,  # [M, NOUT] in x.dtype, or (SPLIT) the fp32 workspace [S, M, N]
    M, NOUT, K, G,
    K_PER_SPLIT,  # K range of one split (a multiple of BLOCK_K)
    stride_xm, stride_qn, stride_sn, stride_om, stride_os,
    BITS: tl.constexpr,
    HALVES: tl.constexpr,  # gate_up: W = [Wg; Wu], NOUT = I, out = silu(gate) * up
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,  # write fp32 partial sums (epilogue in quant_splitk_reduce_kernel)
    SCALE_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < NOUT
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        acc = _tile_product(acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, mask_m, offs_n, mask_n, k0, k_end, G,
                            stride_xm, stride_qn, stride_sn, BITS, BLOCK_K, HAS_ZEROS, SCALE_PER_TILE, UPCAST_DOT)
        if HALVES:
            acc_u = _tile_product(acc_u, x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, mask_m, offs_n + NOUT, mask_n, k0,
                                  k_end, G, stride_xm, stride_qn, stride_sn, BITS, BLOCK_K, HAS_ZEROS,
                                  SCALE_PER_TILE, UPCAST_DOT)
    mask = mask_m[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if SPLIT:
        out_ptrs += pid_s.to(tl.int64) * stride_os
        tl.store(out_ptrs, acc, mask=mask)
        if HALVES:
            tl.store(out_ptrs + NOUT, acc_u, mask=mask)
    else:
        if HALVES:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_u
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def quant_splitk_reduce_kernel(
    ws_ptr,  # fp32 [S, M, N] partial sums (N = 2 * NOUT when HALVES)
    bias_ptr,
    out_ptr,  # [M, NOUT]
    NOUT, S, stride_ws, stride_wm, stride_om,
    HALVES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < NOUT
    ptrs = ws_ptr + row * stride_wm + cols
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        if HALVES:
            acc_u += tl.load(ptrs + NOUT, mask=mask, other=0.0)
        ptrs += stride_ws
    if HALVES:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """SM count of a CUDA device; 132 (an H100 / H200) for CPU tensors, i.e. the interpreter and gpu/aot_compile.py."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def choose_config(m: int, n_out: int, k: int, group_size: int, bits: int, dtype: torch.dtype, halves: bool,
                  num_sms: int = 132) -> dict:
    """Tile sizes, split-K and warps for one call (see the header). Returns BLOCK_M/N/K, SCALE_PER_TILE,
    K_PER_SPLIT, splits and num_warps."""
    # Chosen so that ptxas does not spill on sm_80 / sm_90 (gpu/aot_compile.py): fp32 tiles (ieee tl.dot on upcast
    # tiles, not a speed target) hold twice the bytes, and gate_up holds two weight tiles and two accumulators.
    wide = dtype == torch.float32
    if wide:
        bm, bn, bk, warps = (16, 32, 32, 4) if m <= 16 else (32, 32, 32, 4) if halves else (32, 64, 32, 8)
    elif m <= 16:
        bm, bn, bk, warps = (16, 32, 64, 8) if halves else (16, 32, 128, 4)
    elif m <= 64:
        bm, bn, bk, warps = 32 if m <= 32 else 64, 64, 64, 8
    else:
        bm, bn, bk, warps = 64 if halves else 128, 64, 64, 8
    min_bk = 32 if bits == 4 else 16  # tl.dot needs every dim >= 16; int4 splits BK in two halves
    bk = max(min_bk, min(bk, triton.next_power_of_2(k)))
    g_pow2 = group_size & -group_size  # largest power of two dividing G
    per_tile = g_pow2 >= min_bk
    if per_tile:
        bk = min(bk, g_pow2)
    k_tiles = triton.cdiv(k, bk)
    splits = 1
    if m <= 16:  # decode: enough programs for ~2 waves even when there are few column tiles
        tiles = triton.cdiv(m, bm) * triton.cdiv(n_out, bn)
        splits = min(k_tiles, max(1, triton.cdiv(2 * num_sms, tiles)))
    k_per_split = triton.cdiv(k_tiles, splits) * bk
    splits = triton.cdiv(k, k_per_split)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SCALE_PER_TILE=per_tile, K_PER_SPLIT=k_per_split,
                splits=splits, num_warps=warps)


def check_quant_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                       group_size: int) -> tuple[int, int]:
    """Validate the canonical form (ops/quant_reference.py); -> (N, K)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    want = torch.int8 if bits == 8 else torch.uint8
    if qweight.dim() != 2 or qweight.dtype != want:
        raise ValueError(f"qweight must be a 2-D {want} tensor for bits={bits}, got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1)
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size must divide K = {k}; got {group_size}")
    if scales.shape != (n, k // group_size) or scales.dtype != torch.float32:
        raise ValueError(f"scales must be float32 [{n}, {k // group_size}], got {scales.dtype} {tuple(scales.shape)}")
    if zeros is not None and (zeros.shape != scales.shape or zeros.dtype != torch.uint8):
        raise ValueError(f"zeros must be uint8 {tuple(scales.shape)} or None, got {zeros.dtype} {tuple(zeros.shape)}")
    return n, k


def quant_bits() -> tuple[int, ...]:
    """The bit widths these kernels run (int6 weights: the reference; the lm_head stays int8 here)."""
    return (8, 4)


def pack_quant_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      group_size: int, halves: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The kernels read the canonical form itself (see the header): checked and made contiguous."""
    n, _ = check_quant_weight(qweight, scales, zeros, bits, group_size)
    if halves and n % 2:
        raise ValueError(f"a gate_up weight needs an even number of rows [Wg; Wu], got {n}")
    return qweight.contiguous(), scales.contiguous(), None if zeros is None else zeros.contiguous()


def _quant_matmul(x, qweight, scales, zeros, bias, bits, group_size, halves, config=None):
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be a 2-D tensor contiguous in its last dim, got shape {tuple(x.shape)}")
    n, k = check_quant_weight(qweight, scales, zeros, bits, group_size)
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features but the quantized weight has K = {k}")
    if not (qweight.is_contiguous() and scales.is_contiguous() and (zeros is None or zeros.is_contiguous())):
        raise ValueError("qweight / scales / zeros must be contiguous (pack_quant_weight makes them so)")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    m, n_out = x.shape[0], n // 2 if halves else n
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0 or n_out == 0:
        return out
    cfg = dict(config or choose_config(m, n_out, k, group_size, bits, x.dtype, halves, _num_sms(x.device)))
    splits, warps = cfg.pop("splits"), cfg.pop("num_warps")
    split = splits > 1
    target = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if split else out
    zp = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    bp = bias if bias is not None else scales
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n_out, cfg["BLOCK_N"]), splits)
    quant_matmul_kernel[grid](
        x, qweight, scales, zp, bp, target, m, n_out, k, group_size, cfg.pop("K_PER_SPLIT"),
        x.stride(0), qweight.stride(0), scales.stride(0), target.stride(-2), target.stride(0) if split else 0,
        BITS=bits, HALVES=halves, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, SPLIT=split,
        UPCAST_DOT=upcast_dot(x.dtype), num_warps=warps, **cfg)
    if split:
        block = min(1024, triton.next_power_of_2(n_out))
        quant_splitk_reduce_kernel[(m, triton.cdiv(n_out, block))](
            target, bp, out, n_out, splits, target.stride(0), target.stride(1), out.stride(0),
            HALVES=halves, HAS_BIAS=bias is not None, BLOCK=block)
    return out


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group_size: int, config: dict | None = None) -> torch.Tensor:
    """x [M, K] -> x W^T + bias [M, N] in x.dtype (W: canonical int8 / int4; fp32 accumulation).
    config: a choose_config() result to force (tests)."""
    return _quant_matmul(x, qweight, scales, zeros, bias, bits, group_size, False, config)


def quant_gate_up_silu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bits: int, group_size: int, config: dict | None = None) -> torch.Tensor:
    """x [M, H], quantized [Wg; Wu] [2I, H] -> silu(x Wg^T) * (x Wu^T) [M, I] in x.dtype (fp32 math)."""
    if qweight.shape[0] % 2:
        raise ValueError(f"a gate_up weight needs an even number of rows [Wg; Wu], got {qweight.shape[0]}")
    return _quant_matmul(x, qweight, scales, zeros, None, bits, group_size, True, config)
