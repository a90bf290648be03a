"""GEMV / small-M GEMM: torch F.linear vs the C++ GEMM on packed weights (what the engine runs) on the StableLM-2
1.6B shapes.

    .venv/bin/python bench/kernels/bench_gemv.py [--quick] [--lm-head]

Prints time, speedup and achieved weight-read GB/s against the measured memory bandwidth, and the largest M at
which the C++ kernel still wins per dtype. Weights are packed for cpu_isa() (vnni with AVX512-BF16, panels with
AVX2); STABLELM_FAST_ISA=avx2 / scalar measures the lower ISAs' kernels.
"""

from __future__ import annotations

import argparse

import _util  # noqa: F401  (sys.path)
import torch
import torch.nn.functional as F

from stablelm_fast.ops import cpu_linear, reference

ops = torch.ops.stablelm_fast

SHAPES = {"qkv": (6144, 2048), "o_proj": (2048, 2048), "down": (2048, 5632)}  # name: (N, K)
GATE_UP = (11264, 2048)
LM_HEAD = (100352, 2048)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="M in 1, 8 only")
    p.add_argument("--lm-head", action="store_true", help="also the 100352 x 2048 lm_head (400 MB bf16)")
    args = p.parse_args()
    bw = _util.header("linear / gate_up_silu")
    ms = [1, 8] if args.quick else [1, 2, 4, 8, 16, 64]
    shapes = dict(SHAPES)
    if args.lm_head:
        shapes["lm_head"] = LM_HEAD
    for dtype in (torch.bfloat16, torch.float32):
        wins = {}
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k).to(dtype)
            wp = cpu_linear.pack_linear_weight(w)
            for m in ms if name != "lm_head" else [1, 8]:
                x = torch.randn(m, k).to(dtype)
                out = torch.empty(m, n, dtype=dtype)
                t_ref = _util.timeit(lambda: F.linear(x, w))
                t_ours = _util.timeit(lambda: ops.linear(out, x, wp, None))
                wins.setdefault(m, []).append(t_ours < t_ref)
                _util.row(f"{str(dtype)[6:]} linear {name} N={n} K={k} M={m}", t_ref, t_ours, w.numel() * w.element_size(), bw)
            del w, wp
        n2, k = GATE_UP
        w = torch.randn(n2, k).to(dtype)
        wp = cpu_linear.pack_linear_weight(w, halves=True)
        for m in ms:
            x = torch.randn(m, k).to(dtype)
            out = torch.empty(m, n2 // 2, dtype=dtype)
            t_ref = _util.timeit(lambda: reference.gate_up_silu(x, w))
            t_ours = _util.timeit(lambda: ops.gate_up_silu(out, x, wp))
            wins.setdefault(m, []).append(t_ours < t_ref)
            _util.row(f"{str(dtype)[6:]} gate_up_silu N={n2} K={k} M={m}", t_ref, t_ours, w.numel() * w.element_size(), bw)
        del w, wp
        crossover = max([m for m in ms if all(wins[m])], default=0)
        print(f"-- {dtype}: C++ ({cpu_linear.cpu_isa()}) wins on every shape up to M = {crossover}")


if __name__ == "__main__":
    main()
