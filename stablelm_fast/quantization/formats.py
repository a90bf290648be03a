"""GPTQ, AWQ and compressed-tensors checkpoint tensors -> the canonical form of ops/quant_reference.py.

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

compressed-tensors `pack-quantized` (llm-compressor; layout of compressed-tensors >= 0.10, where asymmetric zero
points are packed along N, PR #296), b = num_bits (4 or 8), P = 32 / b values per int32, stored as unsigned
q + 2^(b-1) (signed values shifted), value i of an int32 in bits b i .. b i + b - 1:
    weight_packed      int32 [N, K / P]        packed along K: k = P c + i in int32 c of row n
    weight_scale       bf16/fp16/fp32 [N, K / G]  ([N, 1] channel-wise)
    weight_zero_point  int32 [N / P, K / G]    asymmetric only; packed along N: n = P r + i in int32 r of column g
    weight_g_idx       int32 [K]               act-order (actorder 'group'): the group of each input feature
    weight_shape       int [2]                 [N, K]
    W[n, k] = (q[n, k] - z[n, g_idx[k]]) * scale[n, g_idx[k]]   (signed q and z; the offsets cancel)
  Since compressed-tensors' dense packing (PR #732) a packed dimension is padded to a multiple of 32 values, which
  older versions pad to a multiple of P: the two agree when it is a multiple of 32, which the loader requires.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_POSITION = tuple(AWQ_ORDER.index(j) for j in range(8))  # the nibble that holds column 8 c + j


def _fields(q32: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """int32 [R, C] -> [R, C, 32 / bits]: field i = bits (bits i) .. (bits i + bits - 1), as int32 >= 0."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=q32.device)
    return (q32.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)


def unpack_rows(q32: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """int32 [K / P, N] -> uint8 [K, N], P = 32 / bits (packed along the first dim: GPTQ qweight)."""
    r, c = q32.shape
    return _fields(q32, bits).permute(0, 2, 1).reshape(r * (32 // bits), c).to(torch.uint8)


def unpack_cols(q32: torch.Tensor, awq_order: bool = False, bits: int = 4) -> torch.Tensor:
    """int32 [R, N / P] -> uint8 [R, N] (packed along the last dim, in AWQ's interleaved order if awq_order)."""
    u = _fields(q32, bits)
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
    return q.contiguous(), scales.float().t().contiguous(), zeros.contiguous(), _local_g_idx(g_idx, group, first_group,
                                                                                             q.shape[1])


def _local_g_idx(g_idx: torch.Tensor | None, group: int, first_group: int, k: int) -> torch.Tensor | None:
    """A checkpoint's g_idx of this part's k input features -> local group numbers (int64), None where k // G."""
    if g_idx is None:
        return None
    g_idx = g_idx.to(torch.int64) - first_group
    return None if torch.equal(g_idx, torch.arange(k, device=g_idx.device) // group) else g_idx


def compressed_tensors_to_canonical(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                                    g_idx: torch.Tensor | None, bits: int, group: int, first_group: int = 0
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One compressed-tensors pack-quantized weight (this rank's part) -> (q [N, K]: uint8 for 4 bits, int8 for 8,
    scales fp32 [N, K / G], zeros uint8 [N, K / G] or None (symmetric), g_idx as gptq_to_canonical's)."""
    q = unpack_cols(packed, bits=bits)  # q + 2^(b-1): int4's canonical form with its default zero point 8
    if bits == 8:
        q = (q.to(torch.int16) - 128).to(torch.int8)  # int8's canonical form is signed, zero point 0
    elif bits != 4:
        raise ValueError(f"compressed-tensors num_bits={bits} is not supported (4 or 8)")
    if zero_point is not None and bits == 8:
        raise ValueError("compressed-tensors asymmetric int8 is not supported (int8 is symmetric only)")
    # NOTE: signed zero point z + 8 (what is stored) against q + 8: the canonical uint8 zero point as it is
    zeros = None if zero_point is None else unpack_rows(zero_point, bits=bits).contiguous()
    return q.contiguous(), scale.float().contiguous(), zeros, _local_g_idx(g_idx, group, first_group, q.shape[1])


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
