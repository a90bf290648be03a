"""The weight-only int8 / int4 GEMMs (kernels/quant_matmul.py) compiled on the GPU, at the models' real layer sizes,
against the dequantize-then-fp32 torch reference (ops/quant_reference.py) run on CPU copies. Both configurations
the launcher picks: decode (M <= 16, split-K + reduce kernel) and prefill (tiled, fused epilogue); int8 per output
channel and per group, int4 symmetric and with zero points; quant_linear with a bias and quant_gate_up_silu.
The `cuda` backend serves these ops from the triton backend (registry.FALLBACK), so it is the same code.

Run by `make gpu-check`; on a CPU-only machine every test skips (STABLELM_FAST_TEST_DEVICE=cpu dry-runs them in the
interpreter, slowly)."""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from stablelm_fast.ops import quant_reference as qref

DEV = os.environ.get("STABLELM_FAST_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: run `make gpu-check` on a GPU machine")
# (N, K): the 1.6B's qkv and down_proj, and the 12B's gate_up half (K = 5120)
SHAPES = [(6144, 2048), (2048, 5632), (13824, 5120)]
MODES = [(8, None, True), (8, 128, True), (4, 128, True), (4, 32, False)]


@functools.lru_cache(maxsize=4)
def _quantized(n, k, bits, group, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    group = group or k
    return (*qref.quantize_weight(w, bits, group, symmetric), group)


def _ops():
    from stablelm_fast.ops import get_ops

    return get_ops("triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 301])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bits,group,symmetric", MODES)
def test_quant_linear_real_sizes(dtype, m, n, k, bits, group, symmetric):
    ops = _ops()
    qw, s, z, g = _quantized(n, k, bits, group, symmetric, seed=n + k + bits)
    gen = torch.Generator().manual_seed(m)
    x, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    packed = ops.pack_quant_weight(qw.to(DEV), s.to(DEV), None if z is None else z.to(DEV), bits, g)
    got = ops.quant_linear(x.to(DEV), *packed, b.to(DEV), bits, g).float().cpu()
    want = qref.quant_linear(x.float(), qw, s, z, b.float(), bits, g)
    torch.testing.assert_close(got, want.float(), atol=4e-2, rtol=4e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 7, 301])
@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (4, 128, False)])
def test_quant_gate_up_silu_real_sizes(dtype, m, bits, group, symmetric):
    ops = _ops()
    inter, h = 5632, 2048  # the 1.6B's MLP
    qw, s, z, g = _quantized(2 * inter, h, bits, group, symmetric, seed=m + bits)
    x = torch.randn(m, h, generator=torch.Generator().manual_seed(m)).to(dtype)
    packed = ops.pack_quant_weight(qw.to(DEV), s.to(DEV), None if z is None else z.to(DEV), bits, g, halves=True)
    got = ops.quant_gate_up_silu(x.to(DEV), *packed, bits, g).float().cpu()
    want = qref.quant_gate_up_silu(x.float(), qw, s, z, bits, g)
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=4e-2, rtol=4e-2)
    torch.testing.assert_close(got, want.float(), **tol)
