"""GPTQ and AWQ 4-bit checkpoint tensors -> the canonical form of ops/quant_reference.py.

GPTQ (AutoGPTQ, GPTQModel, llm-compressor's GPTQ export), per linear layer with W [N, K], G = group_size:
    qweight int32 [K / 8, N]   eight 4-bit values along K per int32: k = 8 r + j in bits 4 j .. 4 j + 3
    qzeros  int32 [K / G, N / 8]  eight zero points along N per int32: n = 8 c + j in bits 4 j
    scales  fp16  [K / G, N]
    g_idx   int32 [K]          the group of each input feature (act-order / desc_act: not k // G)
    W[n, k] = (q[k, n] - (z[g_idx[k], n] + zero_offset)) * scales[g_idx[k], n]
  checkpoint_format 'gptq' (v1, AutoGPTQ) stores zero points minus one (zero_offset 1); 'gptq_v2' stores them as is.

AWQ GEMM (AutoAWQ), packed along N instead, in an interleaved order:
    qweight int32 [K, N / 8]   nibble i (bits 4 i) of int32 c holds column n = 8 c + AWQ_ORDER[i]
    qzeros  int32 [K / G, N / 8]  same order
    scales  fp16  [K / G, N]
    W[n, k] = (q[k, n] - z[k // G, n]) * scales[k // G, n]
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_POSITION = tuple(AWQ_ORDER.index(j) for j in range(8))  # the nibble that holds column 8 c + j


def _nibbles(q32: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> [R, C, 8]: nibble i = bits 4 i .. 4 i + 3 (as int32 0..15)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q32.device)
    return (q32.to(torch.int32)[..., None] >> shifts) & 15


def unpack_rows(q32: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight int32 [K / 8, N] -> uint8 [K, N] (packed along the first dim)."""
    r, c = q32.shape
    return _nibbles(q32).permute(0, 2, 1).reshape(r * 8, c).to(torch.uint8)


def unpack_cols(q32: torch.Tensor, awq_order: bool = False) -> torch.Tensor:
    """int32 [R, N / 8] -> uint8 [R, N] (packed along the last dim, in AWQ's interleaved order if awq_order)."""
    u = _nibbles(q32)
    if awq_order:
        u = u[..., list(_AWQ_POSITION)]
    return u.reshape(q32.shape[0], -1).to(torch.uint8)


def gptq_to_canonical(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                      group: int, zero_offset: int, first_group: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One GPTQ weight (this rank's part) -> (q uint8 [N, K], scales fp32 [N, K / G], zeros uint8 [N, K / G],
    g_idx int64 [K] of local group numbers, or None where it is k // G). first_group: the checkpoint's group number
    of this part's first input feature (row-parallel slices)."""
    q = unpack_rows(qweight).t()
    # NOTE: v1's zero point 0 is stored as 15 and read back as 16 by every GPTQ kernel: kept exact (uint8 holds it)
    zeros = (unpack_cols(qzeros) + zero_offset).t()
    k = q.shape[1]
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64) - first_group
        if torch.equal(g_idx, torch.arange(k, device=g_idx.device) // group):
            g_idx = None
    return q.contiguous(), scales.float().t().contiguous(), zeros.contiguous(), g_idx


def awq_to_canonical(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AWQ GEMM weight -> (q uint8 [N, K], scales fp32 [N, K / G], zeros uint8 [N, K / G])."""
    q = unpack_cols(qweight, awq_order=True).t()
    zeros = unpack_cols(qzeros, awq_order=True).t()
    return q.contiguous(), scales.float().t().contiguous(), zeros.contiguous()


def act_order_permutation(g_idx: torch.Tensor, group: int, where: str) -> torch.Tensor:
    """GPTQ act-order: the order of K that puts each group's G input features next to each other (group 0 first)."""
    counts = torch.bincount(g_idx, minlength=int(g_idx.max()) + 1)
    if g_idx.min() < 0 or not bool((counts == group).all()):
        raise ValueError(f"{where}: g_idx does not assign exactly group_size={group} input features to each group")
    return torch.argsort(g_idx, stable=True)
