"""CPU GEMMs on the 1.6B shapes, per M: the packed GEMMs (csrc/cpu/, what the engine runs) against torch.

    .venv/bin/python bench/kernels/bench_gemm.py [--ms 1,4,16,32,128,512,2048] [--threads 1,2]

For each M and thread count, the four layer shapes of a StableLM-2-1.6B block together (N x K: qkv 6144x2048, o_proj
2048x2048, gate_up 11264x2048, down 2048x5632), bf16 in and out; GFLOP/s of
    vnni    torch.ops.stablelm_fast.linear on vnni-packed weights (only where cpu_isa() has AVX512-BF16): the
            vdpbf16ps kernel; on AMX machines above 4 tokens the AMX tiles of amx_gemm.cpp (STABLELM_FAST_AMX=0:
            vdpbf16ps there too)
    panels  the same op on panels-packed weights (the AVX2 kernel)
    torch   torch's bf16 F.linear (oneDNN; AMX / AVX512-BF16 where present)
    conv    bf16 weights converted to fp32 in 1024-row slices + torch's fp32 GEMM (cpu_linear's unpacked path)
next to the fp32 GEMM peak (4096 x 4096 x 2048 torch.mm) and, for small M, GB/s of weights read against the read
bandwidth, both measured in the same run. The CPU model and ISA flags are printed first.
"""

from __future__ import annotations

import argparse
import os

import _util  # noqa: F401  (sys.path)
import torch
import torch.nn.functional as F

from stablelm_fast.ops import cpu_linear

ops = torch.ops.stablelm_fast
SHAPES = [(6144, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]  # (N, K): qkv, o_proj, gate_up, down


def gemm_peak() -> float:
    a = torch.randn(2048, 4096)
    b = torch.randn(4096, 2048)
    return 2 * 2048 * 4096 * 2048 / _util.timeit(lambda: torch.mm(a, b), min_time=1.0) / 1e9


def pack(w: torch.Tensor, layout: str) -> torch.Tensor:
    n, k = w.shape
    out = torch.empty(n, k // 2, 2, dtype=w.dtype) if layout == "vnni" else torch.empty(n, k, 1, dtype=w.dtype)
    ops.pack_linear_weight(out, w, False)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,4,16,32,64,128,512,2048")
    p.add_argument("--threads", default=str(torch.get_num_threads()))
    args = p.parse_args()
    print(f"== CPU: {_util.cpu_model()}; ISA flags: {_util.cpu_flags()}; kernels run {cpu_linear.cpu_isa()}; "
          f"STABLELM_FAST_AMX={os.environ.get('STABLELM_FAST_AMX', '')}")
    weights = [(torch.randn(n, k) / k**0.5).bfloat16() for n, k in SHAPES]
    layouts = ["panels"] + (["vnni"] if cpu_linear.cpu_isa() in ("avx512bf16", "amx") else [])
    packed = {lay: [pack(w, lay) for w in weights] for lay in layouts}
    wbytes = sum(w.numel() * 2 for w in weights)
    for threads in [int(v) for v in args.threads.split(",")]:
        torch.set_num_threads(threads)
        peak, bw = gemm_peak(), _util.memory_bandwidth_gbs()
        print(f"== {threads} threads: fp32 GEMM peak {peak:.0f} GFLOP/s (torch.mm), read bandwidth {bw:.1f} GB/s")
        for m in [int(v) for v in args.ms.split(",")]:
            t = dict.fromkeys(layouts + ["torch", "conv"], 0.0)
            flops = 0
            for i, w in enumerate(weights):
                x = torch.randn(m, w.shape[1]).bfloat16()
                out = torch.empty(m, w.shape[0], dtype=torch.bfloat16)
                flops += 2 * m * w.numel()
                for lay in layouts:
                    t[lay] += _util.timeit(lambda: ops.linear(out, x, packed[lay][i], None))
                t["torch"] += _util.timeit(lambda: F.linear(x, w))
                t["conv"] += _util.timeit(lambda: cpu_linear._torch_linear(x, w, None))
            line = f"M={m:<5}" + "".join(f" {k} {flops / v / 1e9:6.1f}" for k, v in t.items()) + " GFLOP/s"
            best = min(t[lay] for lay in layouts)
            line += f"   best packed: {100 * flops / best / 1e9 / peak:3.0f}% of fp32 peak"
            if m <= 8:
                line += f", {wbytes / best / 1e9:5.1f} GB/s ({100 * wbytes / best / 1e9 / bw:3.0f}% of bandwidth)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
