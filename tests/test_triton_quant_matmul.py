"""kernels/quant_matmul.py beyond the per-op test (tests/ops/test_op_quant_linear.py): each code path forced on
small shapes under the Triton interpreter, against the torch reference (ops/quant_reference.py):
  * split-K (fp32 partials + reduce kernel) and the fused single-pass epilogue, for linear (+ bias) and gate_up;
  * scales per tile (BLOCK_K divides G) and gathered per element (int8 G = 40, int4 G = 48: no legal BLOCK_K divides G);
  * int8 with explicit zero points, int4 symmetric / asymmetric, K not a multiple of BLOCK_K;
  * the launcher's configuration choice (decode splits K to fill the SMs, prefill does not) and its errors."""

from __future__ import annotations

import math

import pytest
import torch

from stablelm_fast.kernels.quant_matmul import choose_config, pack_quant_weight, quant_gate_up_silu, quant_linear
from stablelm_fast.ops import quant_reference as qref

TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _case(m, n, k, bits, g, symmetric, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    qw, s, z = qref.quantize_weight(w, bits, g, symmetric)
    b = torch.randn(n, generator=gen).to(dtype)
    return x, qw, s, z, b


def _forced(m, n_out, k, g, bits, dtype, halves, splits):
    cfg = choose_config(m, n_out, k, g, bits, dtype, halves)
    if not cfg["SCALE_PER_TILE"]:
        cfg["BLOCK_K"] = 32  # several K tiles, some across a group boundary
    k_tiles = -(-k // cfg["BLOCK_K"])
    cfg["K_PER_SPLIT"] = -(-k_tiles // splits) * cfg["BLOCK_K"]
    cfg["splits"] = -(-k // cfg["K_PER_SPLIT"])
    assert cfg["splits"] == splits
    return cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,g,symmetric,k,per_tile", [(8, 40, True, 80, False), (8, 80, True, 80, True),
                                                         (4, 48, False, 96, False), (4, 32, True, 160, True)])
@pytest.mark.parametrize("splits", [1, 2])
def test_quant_linear_paths(dtype, bits, g, symmetric, k, per_tile, splits):
    m, n = 5, 40
    x, qw, s, z, b = _case(m, n, k, bits, g, symmetric, seed=k + g + splits, dtype=dtype)
    cfg = _forced(m, n, k, g, bits, dtype, False, splits)
    assert cfg["SCALE_PER_TILE"] == per_tile
    got = quant_linear(x, *pack_quant_weight(qw, s, z, bits, g), b, bits, g, config=cfg)
    want = qref.quant_linear(x.float(), qw, s, z, b.float(), bits, g)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("bits,g,symmetric", [(4, 32, False), (4, 48, True), (8, 64, True)])
@pytest.mark.parametrize("splits", [1, 3])
def test_quant_gate_up_silu_paths(bits, g, symmetric, splits):
    m, inter, k = 3, 24, 192
    x, qw, s, z, _ = _case(m, 2 * inter, k, bits, g, symmetric, seed=g + splits)
    cfg = _forced(m, inter, k, g, bits, torch.float32, True, splits)
    got = quant_gate_up_silu(x, *pack_quant_weight(qw, s, z, bits, g, halves=True), bits, g, config=cfg)
    torch.testing.assert_close(got, qref.quant_gate_up_silu(x, qw, s, z, bits, g), **TOL[torch.float32])


def test_int8_with_zero_points():
    x, qw, s, _, b = _case(4, 32, 64, 8, 32, True, seed=3)
    z = torch.randint(0, 40, s.shape, generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    got = quant_linear(x, qw, s, z, b, 8, 32)
    torch.testing.assert_close(got, qref.quant_linear(x, qw, s, z, b, 8, 32), **TOL[torch.float32])


def test_decode_splits_k_and_prefill_does_not():
    # 1.6B o_proj (N = K = 2048) at batch 1: 64 column tiles would leave most of 132 SMs idle
    dec = choose_config(1, 2048, 2048, 128, 4, torch.bfloat16, False, num_sms=132)
    assert dec["BLOCK_M"] == 16 and dec["splits"] > 1 and dec["SCALE_PER_TILE"]
    assert dec["K_PER_SPLIT"] % dec["BLOCK_K"] == 0 and dec["splits"] * dec["K_PER_SPLIT"] >= 2048
    pre = choose_config(512, 2048, 2048, 128, 4, torch.bfloat16, False)
    assert pre["splits"] == 1 and pre["BLOCK_M"] >= 64


def test_bad_arguments_are_named():
    x, qw, s, z, b = _case(2, 16, 64, 4, 32, False, seed=5)
    with pytest.raises(ValueError, match="features"):
        quant_linear(x[:, :32].contiguous(), qw, s, z, b, 4, 32)
    with pytest.raises(ValueError, match="qweight"):
        quant_linear(x, qw.to(torch.int8), s, z, b, 4, 32)
    with pytest.raises(ValueError, match="scales"):
        quant_linear(x, qw, s.half(), z, b, 4, 32)
    with pytest.raises(ValueError, match="group_size"):
        pack_quant_weight(qw, s, z, 4, 48)
    with pytest.raises(ValueError, match="even number of rows"):
        pack_quant_weight(qw[:15], s[:15], z[:15], 4, 32, halves=True)
