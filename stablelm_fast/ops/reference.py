"""Plain-torch reference implementations of every fused op.

These are the `torch` backend and the oracle that every kernel (Triton in `kernels/`, C++/CUDA in `csrc/`) is tested
against. Each function states the shapes it takes; kernels keep the same signature and semantics.

KV-cache layout (shared by all backends, and by flash-attn's `flash_attn_with_kvcache`):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
A token's slot is `block_id * block_size + offset`; slot -1 means "do not write" (padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K]; weight: [N, K]; bias: [N] -> [M, N] (F.linear: computed in x.dtype by torch's GEMM)."""
    return F.linear(x, weight, bias)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: [T, H]; weight, bias: [H]. Computed in fp32, returned in x.dtype."""
    out = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    return out.to(x.dtype)


def add_layernorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual-add + LayerNorm. x, residual: [T, H].

    Returns (layernorm(x + residual), x + residual). With residual None, the new residual is x itself.
    NOTE: the sum is rounded to x.dtype before the norm, exactly as an unfused model does it.
    """
    new_residual = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    return layernorm(new_residual, weight, bias, eps), new_residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2 * I] (gate first, then up) -> [T, I] = silu(gate) * up, computed in fp32."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def rotary_cos_sin(max_positions: int, rotary_dim: int, base: float) -> torch.Tensor:
    """-> [max_positions, rotary_dim] fp32: cos in the first rotary_dim/2 columns, sin in the rest (NeoX style)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _per_head_layernorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, Hx, D] fp32; weight: [Hx, D]: LayerNorm over D with one weight per head and no bias."""
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * weight.float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """NeoX rotary on the first rotary_dim dims of x: [T, Hx, D] fp32; cos, sin: [T, rotary_dim/2]."""
    half = rotary_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


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
    num_tokens = qkv.shape[0]
    rotary_dim = cos_sin.shape[1]
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].float().view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].float().view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size : q_size + 2 * kv_size].reshape(num_tokens, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q = _per_head_layernorm(q, q_norm_weight, eps)
        # NOTE: the unfused model rounds the normed q/k to the activation dtype before rotary; so do we.
        q = q.to(qkv.dtype).float()
    if k_norm_weight is not None:
        k = _per_head_layernorm(k, k_norm_weight, eps).to(qkv.dtype).float()
    cs = cos_sin[positions]
    cos, sin = cs[:, : rotary_dim // 2], cs[:, rotary_dim // 2 :]
    q = _rotate(q, cos, sin, rotary_dim).to(qkv.dtype)
    k = _rotate(k, cos, sin, rotary_dim).to(qkv.dtype)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return q


def write_kv_cache(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; -1 = skip
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Read the first `length` tokens of one sequence through its block table -> [length, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D], all sequences' new tokens, flattened (varlen)
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32: sequence b's new tokens are q[cu[b]:cu[b+1]]
    context_lens: torch.Tensor,  # [B] int32: tokens in the cache for b, including its new ones
    scale: float,
    max_q_len: int | None = None,  # the longest q run, if the caller knows it (kernels size grids without a sync)
) -> torch.Tensor:
    """Causal attention for prefill, chunked prefill / prefix-cache extend, and decode (q_len = 1) alike.

    Sequence b's new tokens sit at positions context_len - q_len ... context_len - 1 and attend to every cached
    position up to and including their own. GQA: q head h reads kv head h // (Hq / Hkv).
    NOTE: scores and softmax are computed in fp32 for accuracy. Returns [T, Hq, D] in q.dtype.
    """
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for b in range(len(lens)):
        qb = q[cu[b] : cu[b + 1]].float()  # [q_len, Hq, D]
        q_len, ctx = qb.shape[0], lens[b]
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[b], ctx).float().repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        v = gather_kv(v_cache, block_tables[b], ctx).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qb, k) * scale
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] > q_pos  # [q_len, ctx] (on q's device: CUDA too)
        scores.masked_fill_(mask[None], float("-inf"))
        probs = scores.softmax(dim=-1)
        out[cu[b] : cu[b + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def paged_attention_decode(
    q: torch.Tensor,  # [B, Hq, D], one new token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    context_lens: torch.Tensor,  # [B] int32, including the new token
    scale: float,
) -> torch.Tensor:
    """Decode attention: paged_attention with q_len = 1 for every sequence."""
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    return paged_attention(q, k_cache, v_cache, block_tables, cu, context_lens, scale)


def gate_up_silu(x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
    """Fused MLP first half: x: [M, H]; gate_up_weight: [2 * I, H] (nn.Linear layout) -> silu(x @ Wg^T) * (x @ Wu^T)."""
    return silu_and_mul(F.linear(x, gate_up_weight))
