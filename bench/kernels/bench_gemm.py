"""CPU GEMMs on the 1.6B shapes: the panel GEMM on load-time packed weights (csrc/cpu/panel_gemm.cpp, what the
engine runs), the row-major C++ GEMV / packed GEMM (csrc/cpu/gemv.cpp, gemm.cpp) and torch.

    .venv/bin/python bench/kernels/bench_gemm.py [--ms 16,32,128,2048]

For each M, the four layer shapes of a StableLM-2-1.6B block together (qkv, o_proj, gate_up, down): GFLOP/s of
    panel  torch.ops.stablelm_fast.linear on cpu_ops.pack_linear_weight's panels (bf16 in, bf16 out)
    ours   torch.ops.stablelm_fast.linear on row-major weights (GEMV up to M = 12, packed GEMM above)
    conv   bf16 weights converted to fp32 in 1024-row slices + torch's fp32 GEMM (cpu_ops' fallback without AVX2)
    sgemm  torch's fp32 GEMM on fp32 copies (no conversion: the ceiling of what torch does here)
next to the fp32 GEMM peak measured in the same run (4096^3 sgemm).
"""

from __future__ import annotations

import argparse

import _util  # noqa: F401  (sys.path)
import torch

from stablelm_fast.ops import cpu_ops

ops = torch.ops.stablelm_fast
SHAPES = [(6144, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]  # (N, K): qkv, o_proj, gate_up, down


def gemm_peak() -> float:
    a = torch.randn(2048, 4096)
    b = torch.randn(4096, 2048)
    return 2 * 2048 * 4096 * 2048 / _util.timeit(lambda: torch.mm(a, b), min_time=1.0) / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,4,16,32,64,128,512,2048")
    args = p.parse_args()
    peak = gemm_peak()
    print(f"== packed GEMM, {torch.get_num_threads()} threads, fp32 GEMM peak {peak:.0f} GFLOP/s (torch.mm 2048x4096x2048)")
    weights = [(torch.randn(n, k) / k**0.5).bfloat16() for n, k in SHAPES]
    weights32 = [w.float() for w in weights]
    panels = [cpu_ops.pack_linear_weight(w) for w in weights]
    for m in [int(v) for v in args.ms.split(",")]:
        t = {"panel": 0.0, "ours": 0.0, "conv": 0.0, "sgemm": 0.0}
        flops = 0
        for w, w32, wp in zip(weights, weights32, panels):
            x = torch.randn(m, w.shape[1]).bfloat16()
            x32 = x.float()
            out = torch.empty(m, w.shape[0], dtype=torch.bfloat16)
            flops += 2 * m * w.numel()
            t["panel"] += _util.timeit(lambda: ops.linear(out, x, wp, None))
            t["ours"] += _util.timeit(lambda: ops.linear(out, x, w, None))
            t["conv"] += _util.timeit(lambda: cpu_ops._half_gemm_via_fp32(x, w, None))
            t["sgemm"] += _util.timeit(lambda: torch.mm(x32, w32.t()))
        gf = {k: flops / v / 1e9 for k, v in t.items()}
        print(f"M={m:<5} panel {gf['panel']:6.1f} GFLOP/s ({100 * gf['panel'] / peak:3.0f}% of peak)   "
              f"row-major {gf['ours']:6.1f}   conv {gf['conv']:6.1f}   sgemm {gf['sgemm']:6.1f}   "
              f"panel/row-major {gf['panel'] / gf['ours']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
