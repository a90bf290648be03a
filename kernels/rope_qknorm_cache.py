"""Fused per-head QK LayerNorm + partial NeoX rotary + paged KV-cache write, one token per Triton program.

What it fuses (reference.qk_norm_rope_cache): slicing q/k/v out of the packed QKV projection, the optional per-head
LayerNorm of q and k (no bias, weight [H, D]; StableLM-2-12B), the NeoX rotary on the first rotary_dim = D/4 dims
(pairs (i, i + rotary_dim/2)), and the scatter of k and v into the paged cache through slot_mapping (-1 = skip).
Unfused that is ~6 kernels each re-reading [T, (Hq + 2Hkv) D]; fused it is one read of qkv and one write each of
q (to the attention input) and k/v (to the cache).

Roofline (A100, ~2 TB/s HBM, bf16): per token (Hq + 2Hkv)*D*2 bytes read + the same written. StableLM-12B
(Hq=32, Hkv=8, D=160): ~15 KB in + ~15 KB out per token per layer, so a 4096-token prefill moves ~125 MB (~60 us);
decode batches are launch-bound. Compute (norm + a few FMAs per element) is negligible: memory-bound.
Each program holds all heads of one token as [heads, D_pow2] tiles; D = 80/160 are not powers of two, so D is padded
to 128/256 with masks. The rotary partner of dim d (d +- rotary_dim/2) is loaded as a second, shifted tile rather than
permuted in registers (Triton has no cheap register gather); it hits L1, so HBM traffic is unchanged.

Not verified here: GPU performance / num_warps (only the Triton interpreter on CPU is available).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_heads(
    src_ptr,  # row of this token, first element of the first head of this group (q or k)
    w_ptr,  # [NH, D] per-head LayerNorm weight (ignored unless HAS_NORM)
    cos_ptr,  # cos_sin row of this token's position: [rotary_dim] = cos | sin
    NH,
    D,
    eps,
    ROT_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """-> [BLOCK_H, BLOCK_D] fp32: normed (and rounded to the activation dtype) then rotated heads of one token."""
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NH) & (d[None, :] < D)
    # Rotary partner of dim d: d + half for the first half, d - half for the second half, itself past rotary_dim.
    in_first = d < ROT_HALF
    in_rot = d < 2 * ROT_HALF
    partner = tl.where(in_first, d + ROT_HALF, tl.where(in_rot, d - ROT_HALF, d))
    offs = heads[:, None] * D + d[None, :]
    offs_p = heads[:, None] * D + partner[None, :]
    x_raw = tl.load(src_ptr + offs, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    xp = tl.load(src_ptr + offs_p, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        mean = tl.sum(x, axis=1) / D  # [BLOCK_H]
        diff = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / D + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + offs_p, mask=mask, other=0.0).to(tl.float32)
        # The unfused model rounds the normed q/k to the activation dtype before rotary; so do we.
        x = (diff * rstd[:, None] * w).to(x_raw.dtype).to(tl.float32)
        xp = ((xp - mean[:, None]) * rstd[:, None] * wp).to(x_raw.dtype).to(tl.float32)
    freq = tl.where(in_first, d, d - ROT_HALF)  # frequency index of the pair containing d
    cos = tl.load(cos_ptr + freq, mask=in_rot, other=1.0)  # past rotary_dim: cos = 1, sin = 0 -> unchanged
    sin = tl.load(cos_ptr + ROT_HALF + freq, mask=in_rot, other=0.0)
    sin = tl.where(in_first, -sin, sin)  # x1' = x1 c - x2 s ; x2' = x2 c + x1 s
    return x * cos[None, :] + xp * sin[None, :]


@triton.jit
def rope_qknorm_cache_kernel(
    qkv_ptr,  # [T, (Hq + 2*Hkv) * D]
    pos_ptr,  # [T] int64/int32
    cos_sin_ptr,  # [max_positions, rotary_dim] fp32
    qw_ptr,  # [Hq, D] (ignored unless HAS_NORM)
    kw_ptr,  # [Hkv, D]
    q_out_ptr,  # [T, Hq, D] contiguous
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D] contiguous
    v_cache_ptr,
    slot_ptr,  # [T] int64, -1 = skip
    stride_qkv,  # qkv row stride (elements)
    stride_cs,  # cos_sin row stride
    Hq,
    Hkv,
    D,
    eps,
    ROT_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    row = qkv_ptr + t * stride_qkv
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cs_row = cos_sin_ptr + pos * stride_cs
    d = tl.arange(0, BLOCK_D)

    # q: norm + rotary -> q_out (rounded to the activation dtype).
    q = _norm_rope_heads(row, qw_ptr, cs_row, Hq, D, eps, ROT_HALF, HAS_NORM, BLOCK_HQ, BLOCK_D)
    hq = tl.arange(0, BLOCK_HQ)
    q_mask = (hq[:, None] < Hq) & (d[None, :] < D)
    tl.store(q_out_ptr + t * Hq * D + hq[:, None] * D + d[None, :], q.to(q_out_ptr.dtype.element_ty), mask=q_mask)

    # k and v go only to the cache; padding tokens (slot -1) skip the write entirely.
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        k_row = row + Hq * D
        k = _norm_rope_heads(k_row, kw_ptr, cs_row, Hkv, D, eps, ROT_HALF, HAS_NORM, BLOCK_HKV, BLOCK_D)
        hk = tl.arange(0, BLOCK_HKV)
        kv_mask = (hk[:, None] < Hkv) & (d[None, :] < D)
        kv_offs = hk[:, None] * D + d[None, :]
        v = tl.load(k_row + Hkv * D + kv_offs, mask=kv_mask, other=0.0)
        # slot * Hkv * D: a contiguous cache's slot s starts at element s * Hkv * D (block * block_size + offset).
        dst = slot * Hkv * D + kv_offs
        # Round k to the activation dtype first (as the reference), then to the cache dtype.
        k = k.to(qkv_ptr.dtype.element_ty)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)


def qk_norm_rope_cache(
    qkv: torch.Tensor,  # [T, (Hq + 2 * Hkv) * D], the packed q/k/v projection output (bias already added)
    positions: torch.Tensor,  # [T] int64
    cos_sin: torch.Tensor,  # [max_positions, rotary_dim] fp32, from rotary_cos_sin
    q_norm_weight: torch.Tensor | None,  # [Hq, D] per-head LayerNorm weight, or None (no QK-norm)
    k_norm_weight: torch.Tensor | None,  # [Hkv, D]
    eps: float,
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], written in place
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], written in place
    slot_mapping: torch.Tensor,  # [T] int64; -1 = skip
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """Per-head QK LayerNorm (optional), partial NeoX rotary, and the K/V write into the paged cache.

    Returns q: [T, Hq, D] in qkv.dtype (normed and rotated). k and v go only to the cache.
    """
    Hq, Hkv, D = num_q_heads, num_kv_heads, head_dim
    if qkv.dim() != 2 or qkv.shape[1] != (Hq + 2 * Hkv) * D:
        raise ValueError(f"qkv must be [T, (Hq + 2*Hkv)*D] = [T, {(Hq + 2 * Hkv) * D}], got {tuple(qkv.shape)}")
    if qkv.stride(1) != 1:
        raise ValueError("qkv must be contiguous in its last dim")
    T = qkv.shape[0]
    if positions.shape != (T,) or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"positions must be [T={T}] int64/int32, got {tuple(positions.shape)} {positions.dtype}")
    if slot_mapping.shape != (T,) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"slot_mapping must be [T={T}] int64/int32, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if cos_sin.dim() != 2 or cos_sin.dtype != torch.float32 or cos_sin.stride(1) != 1:
        raise ValueError("cos_sin must be a [max_positions, rotary_dim] fp32 tensor, contiguous in its last dim")
    rotary_dim = cos_sin.shape[1]
    if rotary_dim % 2 != 0 or rotary_dim > D:
        raise ValueError(f"rotary_dim must be even and <= head_dim={D}, got {rotary_dim}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.shape[2:] != (Hkv, D):
            raise ValueError(f"{name} must be [num_blocks, block_size, {Hkv}, {D}], got {tuple(cache.shape)}")
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous (slot addressing assumes it)")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache must have the same shape and dtype")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight must both be given or both be None")
    has_norm = q_norm_weight is not None
    if has_norm:
        if q_norm_weight.shape != (Hq, D) or not q_norm_weight.is_contiguous():
            raise ValueError(f"q_norm_weight must be a contiguous [{Hq}, {D}] tensor, got {tuple(q_norm_weight.shape)}")
        if k_norm_weight.shape != (Hkv, D) or not k_norm_weight.is_contiguous():
            raise ValueError(
                f"k_norm_weight must be a contiguous [{Hkv}, {D}] tensor, got {tuple(k_norm_weight.shape)}"
            )
    positions = positions.contiguous()
    slot_mapping = slot_mapping.contiguous()

    q_out = torch.empty((T, Hq, D), dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return q_out
    BLOCK_D = triton.next_power_of_2(D)
    rope_qknorm_cache_kernel[(T,)](
        qkv, positions, cos_sin,
        q_norm_weight if has_norm else cos_sin,
        k_norm_weight if has_norm else cos_sin,
        q_out, k_cache, v_cache, slot_mapping,
        qkv.stride(0), cos_sin.stride(0),
        Hq, Hkv, D, eps,
        ROT_HALF=rotary_dim // 2,
        HAS_NORM=has_norm,
        BLOCK_HQ=triton.next_power_of_2(Hq),
        BLOCK_HKV=triton.next_power_of_2(Hkv),
        BLOCK_D=BLOCK_D,
        num_warps=4 if Hq * BLOCK_D <= 4096 else 8,
    )
    return q_out
