"""Weight-only int8 / int4 linear layers on the CPU, per 1.6B layer shape and M: ours (csrc/cpu/quant_*.cpp,
what the engine runs) against our bf16 packed linear and torch's own weight-only kernels.

    .venv/bin/python bench/kernels/bench_quant_gemm.py [--ms 1,4,32,128] [--repeats 5] [--kernels auto,int,fp32,bf16]

Per (K, N) in the 1.6B block (qkv 2048x6144, o_proj 2048x2048, gate_up 2048x11264, down 5632x2048) and M, bf16 x:
    int8 / int4 g32 / int4 g128   torch.ops.stablelm_fast.cpu_quant_linear on packed weights; each --kernels entry is
                 STABLELM_FAST_QGEMM (auto: what the engine runs; int: int8 activations + vpdpbusd / vpmaddubsw; fp32:
                 in-register dequantization to fp32 FMAs; bf16: dequantized bf16 blocks + vdpbf16ps)
    bf16         our packed bf16 linear (torch.ops.stablelm_fast.linear)
    t-int8       torch._weight_int8pack_mm (int8 per channel, bf16 scales)
    t-int4       torch._weight_int4pack_mm_for_cpu (int4, group 32 / 128, bf16 scales and zeros)
time (median over --repeats interleaved rounds: every candidate once per round, so that load from other processes
hits all alike), GB/s of weight bytes read (incl. scales / zeros) against the read bandwidth measured in the same
run, and GFLOP/s. The CPU, its ISA flags and the load average are printed first and last.
"""

from __future__ import annotations

import argparse
import os
import statistics

import _util
import torch

from stablelm_fast.ops import cpu_linear, cpu_quant
from stablelm_fast.ops import quant_reference as qref

ops = torch.ops.stablelm_fast
SHAPES = [(2048, 6144), (2048, 2048), (2048, 11264), (5632, 2048)]  # (K, N)


def once(fn, iters: int) -> float:
    """Seconds per call over iters calls (_util.CLOCK: the wall clock, or with SLF_BENCH_CPU_TIME=1 this process's
    CPU time, which on a loaded machine leaves out the time other processes hold the cores)."""
    fn()
    t = _util.CLOCK()
    for _ in range(iters):
        fn()
    return (_util.CLOCK() - t) / iters


# Each candidate: (weights, call, bytes): call(x, weights) -> a function running the op once.


def ours(w, bits, g, kernel):
    qw, s, z = qref.quantize_weight(w, bits, g)
    pq, ps, pz = cpu_quant.pack_quant_weight(qw, s, z, bits, g)

    def call(x, wt):
        out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)

        def fn():
            os.environ["STABLELM_FAST_QGEMM"] = kernel
            ops.cpu_quant_linear(out, x, *wt, None, bits, g, False)
        return fn
    return (pq, ps, pz), call, pq.numel() + ps.numel() * ps.element_size() + (0 if pz is None else pz.numel())


def torch_int8(w):
    qw, s, _ = qref.quantize_weight(w, 8, w.shape[1])
    sb = s[:, 0].bfloat16()
    return (qw, sb), (lambda x, wt: (lambda: torch._weight_int8pack_mm(x, *wt))), qw.numel() + sb.numel() * 2


def torch_int4(w, g):
    qw, s, _ = qref.quantize_weight(w, 4, g)
    packed = torch._convert_weight_to_int4pack_for_cpu(qref.unpack_int4(qw).to(torch.int32), 2)
    # torch's int4 form: w = (q - 8) * scale + zero, per group: scale_and_zeros [K / G, N, 2]
    sz = torch.stack([s.t(), -8 * s.t()], dim=-1).bfloat16().contiguous()
    return ((packed, sz), (lambda x, wt: (lambda: torch._weight_int4pack_mm_for_cpu(x, wt[0], g, wt[1]))),
            packed.numel() + sz.numel() * 2)


def bf16_linear(w):
    pw = cpu_linear.pack_linear_weight(w.bfloat16())

    def call(x, wt):
        out = torch.empty(x.shape[0], w.shape[0], dtype=torch.bfloat16)
        return lambda: ops.linear(out, x, wt[0], None)
    return (pw,), call, pw.numel() * 2


def rotating(weights, call, nbytes, x, footprint: float):
    """fn cycling over enough copies of the weights that they do not fit the last-level cache (as a model's layers
    do not): each call reads its weights from DRAM."""
    copies = [weights] + [tuple(None if t is None else t.clone() for t in weights)
                          for _ in range(int(footprint // nbytes))]
    fns = [call(x, c) for c in copies]
    state = [0]

    def fn():
        fns[state[0] % len(fns)]()
        state[0] += 1
    return fn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,4,32,128")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernels", default="auto,int,fp32")
    p.add_argument("--shapes", default="0,1,2,3")
    p.add_argument("--footprint-mb", type=float, default=96, help="weight copies per candidate (L3 here: 32 MB)")
    args = p.parse_args()
    print(f"== CPU: {_util.cpu_model()}; ISA flags: {_util.cpu_flags()}; kernels run {cpu_linear.cpu_isa()}, "
          f"quant layout {cpu_quant.quant_layout()}; {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    bw = _util.memory_bandwidth_gbs()
    print(f"== read bandwidth (sum of 512 MiB fp32, this run): {bw:.1f} GB/s", flush=True)
    torch.manual_seed(0)
    kernels = args.kernels.split(",")
    for si in [int(v) for v in args.shapes.split(",")]:
        k, n = SHAPES[si]
        w = torch.randn(n, k) / k**0.5
        cands = {}
        for kern in kernels:
            cands[f"int8 {kern}"] = ours(w, 8, k, kern)
            cands[f"int4g32 {kern}"] = ours(w, 4, 32, kern)
            cands[f"int4g128 {kern}"] = ours(w, 4, 128, kern)
        cands["bf16"] = bf16_linear(w)
        cands["t-int8"] = torch_int8(w)
        cands["t-int4g32"] = torch_int4(w, 32)
        cands["t-int4g128"] = torch_int4(w, 128)
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k).bfloat16()
            fns = {name: rotating(*c, x, args.footprint_mb * 1e6) for name, c in cands.items()}
            est = once(fns["bf16"], 3)
            iters = max(3, int(0.05 / max(est, 1e-6)))
            times = {name: [] for name in fns}
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    times[name].append(once(fn, iters))
            os.environ.pop("STABLELM_FAST_QGEMM", None)
            print(f"-- K={k} N={n} M={m} (median of {args.repeats} interleaved rounds x {iters} calls)")
            for name, ts in times.items():
                t = statistics.median(ts)
                nbytes = cands[name][2]
                gbs = nbytes / t / 1e9
                print(f"   {name:<16} {t * 1e6:9.1f} us  {gbs:6.1f} GB/s ({100 * gbs / bw:4.0f}% of {bw:.1f})  "
                      f"{2 * m * k * n / t / 1e9:7.1f} GFLOP/s  ({nbytes / 1e6:.1f} MB)", flush=True)
    print(f"== load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
