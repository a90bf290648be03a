"""Weight-only int8 / int4 GEMMs (kernels/quant_matmul.py) at the 1.6B's and 12B's layer sizes, next to the bf16
GEMM (cuBLAS) and the limits gpu/bench.py measured in the same run.

Decode (M = 1): time per call, and the weight bytes read per call (int8 / int4 codes + fp32 scales + zero points,
or the bf16 weight) per second as % of the measured HBM bandwidth: the roofline of a weight-bound GEMV. int4 reads
~3.6x fewer bytes than bf16 (g128 with zero points), so at the same % of HBM it is ~3.6x faster.
Prefill (M = 512): TFLOP/s as % of the measured bf16 matmul peak (the dequantization rides on the MMA).

    python -m gpu.quant_bench   (or through gpu/bench.py, whose JSON gets a "quant" list)
"""

from __future__ import annotations

import json
import sys

import torch

from gpu.timing import cuda_times

# (model, layer, N, K, halves): halves = gate_up with the fused SiLU
LAYERS = [("1.6B", "qkv", 6144, 2048, False), ("1.6B", "gate_up", 11264, 2048, True),
          ("1.6B", "down", 2048, 5632, False), ("12B", "gate_up", 27648, 5120, True), ("12B", "down", 5120, 13824, False)]
MODES = [("bf16", None, None), ("int8", 8, None), ("int4-g128", 4, 128)]


def _timed(fn, repeats: int = 50) -> float:
    """Median seconds of fn() by CUDA events (after a warm-up call that also compiles)."""
    times = cuda_times(fn, repeats, warmup=True)
    return times[len(times) // 2]


def bench_quant(limits: dict) -> list[dict]:
    from stablelm_fast.ops import get_ops, reference

    ops = get_ops("triton")
    rows = []
    for model, layer, n, k, halves in LAYERS:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        for mode, bits, group in MODES:
            if bits is None:
                args, nbytes = (w,), w.numel() * 2
                fn = reference.gate_up_silu if halves else (lambda x, w_: torch.nn.functional.linear(x, w_))
            else:
                from stablelm_fast.ops import quant_reference as qref

                g = group or k
                qw, s, z = qref.quantize_weight(w, bits, g, symmetric=bits == 8)
                packed = ops.pack_quant_weight(qw, s, z, bits, g, halves=halves)
                nbytes = sum(t.numel() * t.element_size() for t in packed if t is not None)
                args = packed
                fn = ((lambda x, *p, b=bits, g=g: ops.quant_gate_up_silu(x, *p, b, g)) if halves else
                      (lambda x, *p, b=bits, g=g: ops.quant_linear(x, *p, None, b, g)))
            row = {"model": model, "layer": layer, "n": n, "k": k, "mode": mode, "weight_mb": round(nbytes / 1e6, 1)}
            for m in (1, 512):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                t = _timed(lambda: fn(x, *args))
                if m == 1:
                    row.update(decode_us=round(t * 1e6, 1),
                               decode_hbm_pct=round(100 * nbytes / t / 1e9 / limits["hbm_gbps"], 1))
                else:
                    row.update(prefill_us=round(t * 1e6, 1), prefill_matmul_pct=round(
                        100 * 2 * m * n * k / t / 1e12 / limits["bf16_matmul_tflops"], 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
        del w
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu.quant_bench: no CUDA GPU on this machine: nothing measured")
        return 0
    from gpu.bench import measure_limits

    bench_quant(measure_limits())
    return 0


if __name__ == "__main__":
    sys.exit(main())
