"""Paged attention (decode and prefill): reference vs C++, with GB/s of KV read (decode) and GFLOP/s (prefill).

    .venv/bin/python bench/kernels/bench_attention.py
    SLF_BENCH_CPU_TIME=1 SLF_BENCH_THREADS=1 ... (stable figures on a shared machine; STABLELM_FAST_ISA=avx2 or
    scalar runs the lower kernels)
"""

from __future__ import annotations

import _util  # noqa: F401  (sys.path)
import torch

from stablelm_fast.ops import cpu_ops, reference


def _cache(batch, ctx, hkv, d, dtype, block_size=16):
    blocks_per_seq = (ctx + block_size - 1) // block_size
    num_blocks = batch * blocks_per_seq
    kc = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    vc = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    bt = torch.randperm(num_blocks).view(batch, blocks_per_seq).to(torch.int32)
    return kc, vc, bt


def main() -> None:
    bw = _util.header("paged attention")
    for dtype in (torch.bfloat16, torch.float32):
        es = torch.finfo(dtype).bits // 8
        for hq, hkv, d in ((32, 32, 64), (32, 8, 160)):
            for batch, ctx in ((1, 1024), (8, 1024), (32, 160)):  # the last: batched decode of the throughput run
                kc, vc, bt = _cache(batch, ctx, hkv, d, dtype)
                lens = torch.full((batch,), ctx, dtype=torch.int32)
                q = torch.randn(batch, hq, d).to(dtype)
                kv_bytes = 2 * batch * ctx * hkv * d * es
                _util.row(f"{str(dtype)[6:]} decode B={batch} ctx={ctx} Hq={hq} Hkv={hkv} D={d}",
                          _util.timeit(lambda: reference.paged_attention_decode(q, kc, vc, bt, lens, d**-0.5)),
                          _util.timeit(lambda: cpu_ops.paged_attention_decode(q, kc, vc, bt, lens, d**-0.5)),
                          kv_bytes, bw)
            for t in (128, 512):  # one prompt: the compare benchmark's 128 tokens, and a longer one
                kc, vc, bt = _cache(1, t, hkv, d, dtype)
                q = torch.randn(t, hq, d).to(dtype)
                cu, lens = torch.tensor([0, t], dtype=torch.int32), torch.tensor([t], dtype=torch.int32)
                flops = 2 * 2 * hq * d * t * (t + 1) / 2  # QK^T and PV over the causal half
                _util.row(f"{str(dtype)[6:]} prefill T={t} Hq={hq} Hkv={hkv} D={d}",
                          _util.timeit(lambda: reference.paged_attention(q, kc, vc, bt, cu, lens, d**-0.5),
                                       min_time=0.1),
                          _util.timeit(lambda: cpu_ops.paged_attention(q, kc, vc, bt, cu, lens, d**-0.5),
                                       min_time=0.1), flops=flops)

if __name__ == "__main__":
    main()
