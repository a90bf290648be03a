"""Paged decode attention (one new token per sequence), GQA-aware, split-K over the context (flash-decoding).

What it does (reference.paged_attention_decode): for each sequence b and q head h, softmax(q K^T * scale) V over the
context_lens[b] cached tokens, read through block_tables[b]; q head h reads kv head h // (Hq / Hkv).

Kernel 1 (`paged_attention_decode_kernel`), grid (B, Hkv, num_partitions): one program owns one kv head and one
PARTITION_SIZE-token slice of the context. It loads each K/V tile ONCE and uses it for all Hq/Hkv q heads of the
group (the group is padded to >= 16 rows so the scores and P@V are tl.dot MMAs), keeps an fp32 online softmax
(running max m, running sum l, unnormalised acc), and writes (m, l, acc) for its partition.
Kernel 2 (`paged_attention_decode_reduce_kernel`), grid (B, Hq): rescales the partitions by exp(m_p - max m) and
divides. Split-K keeps the GPU busy when B * Hkv is small (decode of a few long sequences: 1 * 8 programs would use 8
of 108 SMs). With a single partition kernel 1 writes the final output directly and kernel 2 is skipped.
The number of partitions is derived from block_tables.shape[1] (no host sync on context_lens: CUDA-graph friendly);
programs past a sequence's end exit at once and the reduction ignores their (never written) partitions.

Roofline (A100, ~2 TB/s HBM, bf16): decode attention reads 2 * ctx * Hkv * D * 2 bytes per sequence per layer (K and
V once each, thanks to the GQA grouping) and does ~4 * ctx * Hq * D flop: ~1 flop/byte * group, far below the A100
ridge (~150 flop/byte), so it is memory-bound. StableLM-12B (Hkv=8, D=160), ctx=4096: 21 MB/seq/layer -> ~10 us;
a batch of 32 such sequences over 40 layers: ~13 ms per decode step from KV reads alone. The partial results
(B * Hq * P * (D + 2) * 4 bytes) are tiny in comparison.

Not verified here: GPU performance, partition/tile/num_warps choices (only the Triton interpreter on CPU exists here).
The interpreter computes tl.dot on bf16 inputs incorrectly (triton 3.9), so under TRITON_INTERPRET=1 (and for fp32,
to avoid TF32) tiles are upcast to fp32 with input_precision="ieee"; on a GPU bf16/fp16 use the native MMA.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from stablelm_fast.kernels._common import upcast_dot

DEFAULT_PARTITION_SIZE = 512  # tokens per split-K partition (a multiple of BLOCK_N)


@triton.jit
def paged_attention_decode_kernel(
    q_ptr,  # [B, Hq, D] contiguous
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D] contiguous
    v_cache_ptr,
    block_tables_ptr,  # [B, max_blocks_per_seq] int32
    context_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, D]: final output (only when SINGLE_PARTITION)
    m_ptr,  # [B, Hq, P] fp32 partition running max (split-K only)
    l_ptr,  # [B, Hq, P] fp32 partition running sum
    acc_ptr,  # [B, Hq, P, D] fp32 partition unnormalised output
    stride_bt,  # block_tables row stride
    qk_scale,  # scale * log2(e): the softmax uses exp2
    Hq,
    Hkv,
    D,
    block_size,
    num_partitions,
    GROUP: tl.constexpr,  # Hq // Hkv
    BLOCK_G: tl.constexpr,  # max(16, next_pow2(GROUP)): tl.dot rows
    BLOCK_N: tl.constexpr,  # context tokens per tile
    BLOCK_D: tl.constexpr,  # next_pow2(D)
    PARTITION_SIZE: tl.constexpr,
    SINGLE_PARTITION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    start = part * PARTITION_SIZE
    if start >= ctx:  # partition past this sequence's end: nothing to do (the reduction skips it)
        return
    end = tl.minimum(start + PARTITION_SIZE, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    g_mask = g < GROUP
    d_mask = d < D
    heads = kvh * GROUP + g  # the q heads sharing this kv head
    q_offs = (b * Hq + heads)[:, None].to(tl.int64) * D + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + n  # logical token positions of this tile
        n_mask = pos < end
        # Per-token page lookup, so BLOCK_N need not equal block_size (tl.dot wants >= 16; pages may be 8).
        blk = tl.load(bt_row + pos // block_size, mask=n_mask, other=0).to(tl.int64)
        slot = blk * block_size + pos % block_size
        kv_offs = (slot * Hkv + kvh)[:, None] * D + d[None, :]  # [BLOCK_N, BLOCK_D]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # Masked loads (not masked scores alone): unused cache slots may hold NaN/garbage, and 0 * NaN = NaN.
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        if UPCAST_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))  # [BLOCK_G, BLOCK_N], log2 domain
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile has >= 1 valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if UPCAST_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    if SINGLE_PARTITION:
        tl.store(out_ptr + q_offs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        ml_offs = (b * Hq + heads).to(tl.int64) * num_partitions + part
        tl.store(m_ptr + ml_offs, m_i, mask=g_mask)
        tl.store(l_ptr + ml_offs, l_i, mask=g_mask)
        tl.store(acc_ptr + ml_offs[:, None] * D + d[None, :], acc, mask=out_mask)


@triton.jit
def paged_attention_decode_reduce_kernel(
    out_ptr,  # [B, Hq, D]
    m_ptr,  # [B, Hq, P] fp32 (log2 domain)
    l_ptr,  # [B, Hq, P] fp32
    acc_ptr,  # [B, Hq, P, D] fp32
    context_lens_ptr,  # [B] int32
    Hq,
    D,
    num_partitions,
    PARTITION_SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,  # next_pow2(num_partitions)
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + b)
    used = tl.cdiv(ctx, PARTITION_SIZE)  # partitions actually written for this sequence
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    p_mask = p < used
    base = (b * Hq + h).to(tl.int64) * num_partitions
    m = tl.load(m_ptr + base + p, mask=p_mask, other=float("-inf"))
    l = tl.load(l_ptr + base + p, mask=p_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(p_mask, tl.exp2(m - m_max), 0.0)  # rescale every partition to the global max
    acc = tl.load(acc_ptr + (base + p)[:, None] * D + d[None, :], mask=p_mask[:, None] & (d < D)[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + (b * Hq + h).to(tl.int64) * D + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


def check_paged_kv(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor) -> None:
    """Shape/dtype/contiguity checks shared by the decode and prefill launchers."""
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    if not q.is_contiguous():
        raise ValueError("q must be contiguous")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.shape[3] != q.shape[2]:
            raise ValueError(f"{name} must be [num_blocks, block_size, Hkv, D={q.shape[2]}], got {tuple(cache.shape)}")
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if cache.dtype != q.dtype:
            raise ValueError(f"{name} dtype {cache.dtype} differs from q dtype {q.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    Hq, Hkv = q.shape[1], k_cache.shape[2]
    if Hq % Hkv != 0:
        raise ValueError(f"num_q_heads={Hq} must be a multiple of num_kv_heads={Hkv}")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be a [B, max_blocks_per_seq] int32 tensor, contiguous in its last dim")


def paged_attention_decode(
    q: torch.Tensor,  # [B, Hq, D], one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    context_lens: torch.Tensor,  # [B] int32, including the new token (>= 1)
    scale: float,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    block_n: int | None = None,
) -> torch.Tensor:
    """Decode attention: paged_attention with q_len = 1 for every sequence. Returns [B, Hq, D] in q.dtype.

    partition_size (tokens per split-K partition) and block_n (tokens per tile) are exposed for tests/tuning.
    """
    check_paged_kv(q, k_cache, v_cache, block_tables)
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    if block_tables.shape[0] != B:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows, q has {B} sequences")
    if context_lens.shape != (B,) or context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens must be [B={B}] int32, got {tuple(context_lens.shape)} {context_lens.dtype}")
    context_lens = context_lens.contiguous()
    BLOCK_N = block_n or max(16, min(64, triton.next_power_of_2(block_size)))
    if partition_size % BLOCK_N != 0:
        raise ValueError(f"partition_size={partition_size} must be a multiple of the tile size {BLOCK_N}")
    out = torch.empty_like(q)
    if B == 0:
        return out
    max_ctx = block_tables.shape[1] * block_size  # upper bound on context_lens, known without a host sync
    num_partitions = max(1, triton.cdiv(max_ctx, partition_size))
    group = Hq // Hkv
    BLOCK_D = triton.next_power_of_2(D)
    single = num_partitions == 1
    if single:
        m = l = acc = out  # unused placeholders
    else:
        m = torch.empty((B, Hq, num_partitions), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty((B, Hq, num_partitions, D), dtype=torch.float32, device=q.device)
    paged_attention_decode_kernel[(B, Hkv, num_partitions)](
        q, k_cache, v_cache, block_tables, context_lens, out, m, l, acc,
        block_tables.stride(0), scale * 1.4426950408889634,
        Hq, Hkv, D, block_size, num_partitions,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        PARTITION_SIZE=partition_size,
        SINGLE_PARTITION=single,
        UPCAST_DOT=upcast_dot(q.dtype),
        num_warps=4,
    )
    if not single:
        paged_attention_decode_reduce_kernel[(B, Hq)](
            out, m, l, acc, context_lens, Hq, D, num_partitions,
            PARTITION_SIZE=partition_size,
            BLOCK_P=triton.next_power_of_2(num_partitions),
            BLOCK_D=BLOCK_D,
        )
    return out
