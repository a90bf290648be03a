"""Paged causal varlen attention for prefill, chunked prefill and prefix-cache extends (FlashAttention-2 style).

What it does (reference.paged_attention): the T new tokens of B sequences are packed in q ([T, Hq, D], sequence b owns
q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]). Sequence b's new tokens sit at positions ctx_b - q_len_b .. ctx_b - 1 and
attend causally to every cached position up to their own. ALL K/V (cached prefix and the new tokens, which the
rope kernel has already written) is read through block_tables, so prefix hits and chunked prefill need no special
case. GQA: q head h reads kv head h // (Hq / Hkv).

Grid (cdiv(max_q_len, BLOCK_M), B, Hq): one program owns BLOCK_M query rows of one head; it streams BLOCK_N-token
K/V tiles (page looked up per token, so BLOCK_N is independent of block_size) up to its last row's causal limit,
with an fp32 online softmax (exp2 domain). Rows of the tile past q_len are computed on valid data and not stored.

Roofline (A100: ~312 TFLOP/s bf16 MMA, ~2 TB/s HBM): a full prefill of L tokens costs ~2 * 2 * L^2/2 * Hq * D flop
and reads K/V ~L/BLOCK_M times (mostly from L2). StableLM-12B (Hq=32, D=160), L=4096: ~172 GFLOP/layer -> ~0.55 ms
at peak vs ~21 MB of unique K/V (~10 us): compute-bound, so the MMAs (tl.dot) and skipping fully-masked tiles matter;
for short chunks appended to a long cached prefix (ctx >> q_len) it tends toward the decode (memory-bound) regime.
Possible improvement not done here: pack the GROUP q heads of one kv head into the M rows to load K/V once per group.

Not verified here: GPU performance and tile choices (only the Triton interpreter on CPU is available). The
interpreter computes tl.dot on bf16 inputs incorrectly (triton 3.9), so under TRITON_INTERPRET=1 (and for fp32, to
avoid TF32) tiles are upcast to fp32 with input_precision="ieee"; on a GPU bf16/fp16 use the native MMA.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from stablelm_fast.kernels._common import host_value_once, upcast_dot

from stablelm_fast.kernels.paged_attention_decode import check_paged_kv


@triton.jit
def paged_attention_prefill_kernel(
    q_ptr,  # [T, Hq, D] contiguous
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D] contiguous
    v_cache_ptr,
    block_tables_ptr,  # [B, max_blocks_per_seq] int32
    cu_seqlens_q_ptr,  # [B + 1] int32
    context_lens_ptr,  # [B] int32
    out_ptr,  # [T, Hq, D]
    stride_bt,
    qk_scale,  # scale * log2(e)
    Hq,
    Hkv,
    D,
    block_size,
    GROUP: tl.constexpr,  # Hq // Hkv
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    mt = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    if mt * BLOCK_M >= q_len:  # this sequence has fewer query tiles than the longest one
        return
    ctx = tl.load(context_lens_ptr + b)
    kvh = h // GROUP

    m_rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence's new tokens
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    row_mask = m_rows < q_len
    d_mask = d < D
    q_pos = ctx - q_len + m_rows  # absolute positions of the queries (rows past q_len: >= ctx, harmless)
    q_offs = ((q_start + m_rows).to(tl.int64) * Hq + h)[:, None] * D + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    # Causal limit of the tile's last valid row; tiles entirely past it are never loaded.
    kv_end = tl.minimum(ctx, ctx - q_len + tl.minimum((mt + 1) * BLOCK_M, q_len))
    for n0 in range(0, kv_end, BLOCK_N):
        kv_pos = n0 + n
        n_mask = kv_pos < kv_end
        blk = tl.load(bt_row + kv_pos // block_size, mask=n_mask, other=0).to(tl.int64)
        slot = blk * block_size + kv_pos % block_size
        kv_offs = (slot * Hkv + kvh)[:, None] * D + d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # Masked loads: unused cache slots may hold NaN/garbage and 0 * NaN = NaN.
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        if UPCAST_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        allowed = n_mask[None, :] & (kv_pos[None, :] <= q_pos[:, None])
        s = tl.where(allowed, s * qk_scale, float("-inf"))
        # Position 0 is visible to every row, so after the first tile m_i is finite for all rows (no NaN from
        # -inf - -inf); later tiles may be fully masked for some rows, which then just get p = 0.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if UPCAST_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D], all sequences' new tokens, flattened (varlen)
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32: sequence b's new tokens are q[cu[b]:cu[b+1]]
    context_lens: torch.Tensor,  # [B] int32: tokens in the cache for b, including its new ones
    scale: float,
    max_seqlen_q: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Causal paged varlen attention. Returns [T, Hq, D] in q.dtype.

    max_seqlen_q: the longest q_len, if the caller knows it; else read from cu_seqlens_q once per tensor (a
    device->host sync per step instead of per layer).
    block_m / block_n: tile sizes (tests use 16; tl.dot needs >= 16).
    """
    check_paged_kv(q, k_cache, v_cache, block_tables)
    T, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    B = block_tables.shape[0]
    if cu_seqlens_q.shape != (B + 1,) or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens_q must be [B+1={B + 1}] int32, got {tuple(cu_seqlens_q.shape)} {cu_seqlens_q.dtype}"
        )
    if context_lens.shape != (B,) or context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens must be [B={B}] int32, got {tuple(context_lens.shape)} {context_lens.dtype}")
    cu_seqlens_q = cu_seqlens_q.contiguous()
    context_lens = context_lens.contiguous()
    out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    if max_seqlen_q is None:  # one device->host read per step, not per layer (same cu_seqlens_q tensor)
        max_seqlen_q = host_value_once("max_seqlen_q", cu_seqlens_q, lambda cu: (cu[1:] - cu[:-1]).max().item())
    if max_seqlen_q <= 0:
        return out
    BLOCK_D = triton.next_power_of_2(D)
    # Tiles that stay in registers (no ptxas spills on sm_80 / sm_90, checked by gpu/aot_compile.py): D=256-padded
    # tiles take a smaller M; fp32 (upcast, ieee tl.dot) tiles take M=32 over 8 warps, and N=16 at D=256.
    wide = q.dtype == torch.float32
    BLOCK_M = block_m or (32 if wide or BLOCK_D > 128 else 64)
    BLOCK_N = block_n or (16 if wide and BLOCK_D > 128 else 32)
    num_warps = 8 if wide else 4
    grid = (triton.cdiv(max_seqlen_q, BLOCK_M), B, Hq)
    paged_attention_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        block_tables.stride(0), scale * 1.4426950408889634,
        Hq, Hkv, D, block_size,
        GROUP=Hq // Hkv,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        UPCAST_DOT=upcast_dot(q.dtype),
        num_warps=num_warps,
    )
    return out
