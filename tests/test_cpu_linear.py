"""The CPU linear layers (ops/cpu_linear.py, csrc/cpu/linear.cpp and the packed GEMMs) against torch, on every
ISA this machine runs: the process's own (cpu_isa()), and each lower one forced by STABLELM_FAST_ISA in a
subprocess (test_lower_isas)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from stablelm_fast.ops import cpu_linear, cpu_ops, reference as ref

ops = torch.ops.stablelm_fast
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ISAS = ["scalar", "avx2", "avx512bf16", "amx"]  # each implies the ones before it
ISA = cpu_linear.cpu_isa()
VNNI = ISA in ("avx512bf16", "amx")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _rel_close(actual, expected, dtype):
    # Accumulation order differs from torch's GEMM: compare relative to the output scale.
    scale = expected.float().abs().max().clamp_min(1.0)
    rtol = 1e-5 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 1.6e-2)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= rtol * scale, f"max error {err} > {rtol} * {scale}"


def _unpack(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of pack_linear_weight for one matrix (csrc/cpu/packed.h): packed -> [N, K]."""
    n, kk, pair = packed.shape
    k = kk * pair
    flat = packed.reshape(-1)
    rows, off = [], 0
    for p0 in range(0, n, 16):
        width = min(16, n - p0)
        if pair == 2:  # vnni: [K/2][width][2]
            panel = flat[off:off + k * width].view(k // 2, width, 2).permute(1, 0, 2).reshape(width, k)
        else:  # panels: [K][width], full bf16 panels pair-interleaved (feature f at 2f, f + 8 at 2f + 1)
            panel = flat[off:off + k * width].view(k, width).t()
            if width == 16 and dtype == torch.bfloat16:
                panel = panel[[2 * f if f < 8 else 2 * (f - 8) + 1 for f in range(16)]]
        rows.append(panel)
        off += k * width
    return torch.cat(rows)


def test_cpu_isa_is_probed_once_and_capped_by_the_environment():
    assert ISA in ISAS
    assert ops.cpu_isa() == ISA
    forced = os.environ.get("STABLELM_FAST_ISA")
    if forced:  # a subprocess of test_lower_isas
        assert ISA == forced


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(48, 36), (37, 64), (5, 2), (16, 7), (70, 130)])
def test_pack_linear_weight_layout(dtype, n, k):
    w = torch.randn(n, k).to(dtype)
    packed = cpu_linear.pack_linear_weight(w)
    vnni = VNNI and dtype == torch.bfloat16 and k % 2 == 0
    assert packed.shape == ((n, k // 2, 2) if vnni else (n, k, 1)) and packed.dtype == dtype
    assert cpu_linear.packed_layout(packed) == ("vnni" if vnni else "panels")
    assert torch.equal(_unpack(packed, dtype), w)
    # gate_up: the two halves packed on their own (each with its tail panel).
    gu = torch.randn(2 * n, k).to(dtype)
    packed = cpu_linear.pack_linear_weight(gu, halves=True)
    half = packed.numel() // 2
    for h in range(2):
        got = _unpack(packed.reshape(-1)[h * half:(h + 1) * half].view(n, *packed.shape[1:]), dtype)
        assert torch.equal(got, gu[h * n:(h + 1) * n])


def test_pack_linear_weight_leaves_what_it_does_not_take():
    for w in (torch.randn(4, 8, 2), torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, requires_grad=True)):
        assert cpu_linear.pack_linear_weight(w) is w
    with pytest.raises(ValueError, match="even number of rows"):
        cpu_linear.pack_linear_weight(torch.randn(7, 4), halves=True)


# Tokens: 1 (decode), 7 (a 6-token tile + a tail), 83 and 1031 (prefill, many tiles); K odd, tiny, above 2048, and a
# multiple of 32 (the AMX tiles' k step: amx_gemm.cpp); N a tail only, whole panels + a tail, several chunks of 4
# panels.
MS = [1, 7, 83, 1031]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", [(2, 5), (37, 32), (300, 101), (4100, 19), (320, 101)])
def test_linear(dtype, m, k, n):
    if m * k * n > 2e7 and dtype != torch.bfloat16:
        pytest.skip("large shapes run in bf16 only (test time); fp32 / fp16 cover the same code at smaller ones")
    x, w = torch.randn(m, k).to(dtype), (torch.randn(n, k) / k**0.5).to(dtype)
    b = torch.randn(n).to(dtype)
    packed = cpu_linear.pack_linear_weight(w)
    _rel_close(cpu_linear.linear(x, packed, b), F.linear(x.float(), w.float(), b.float()), dtype)
    _rel_close(cpu_linear.linear(x, packed), F.linear(x.float(), w.float()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,inter", [(2, 3), (64, 16), (300, 53), (320, 53)])
def test_gate_up_silu(dtype, m, k, inter):
    x, w = torch.randn(m, k).to(dtype), (torch.randn(2 * inter, k) / k**0.5).to(dtype)
    got = cpu_linear.gate_up_silu(x, cpu_linear.pack_linear_weight(w, halves=True))
    _rel_close(got, ref.gate_up_silu(x.float(), w.float()), dtype)


def test_linear_3d_input_and_strided_rows():
    w = (torch.randn(40, 64) / 8).bfloat16()
    packed = cpu_linear.pack_linear_weight(w)
    x = torch.randn(9, 100).bfloat16()[:, :64]  # rows 100 apart
    _rel_close(cpu_linear.linear(x, packed), F.linear(x.float(), w.float()), torch.bfloat16)
    out = torch.zeros(9, 50, dtype=torch.bfloat16)
    ops.linear(out[:, :40], x, packed, None)  # out rows 50 apart: the columns past N stay untouched
    _rel_close(out[:, :40], F.linear(x.float(), w.float()), torch.bfloat16)
    assert (out[:, 40:] == 0).all()
    x3 = torch.randn(2, 3, 64).bfloat16()
    assert cpu_linear.linear(x3, packed).shape == (2, 3, 40)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_row_major_weights_run_torch(dtype, monkeypatch):
    monkeypatch.setattr(cpu_linear, "CONVERT_ROWS", 48)  # several fp32 slices, the last one partial
    x, w = torch.randn(5, 96).to(dtype), (torch.randn(101, 96) / 10).to(dtype)
    b = torch.randn(101).to(dtype)
    got = cpu_linear.linear(x, w, b)
    assert got.dtype == dtype and got.shape == (5, 101)
    _rel_close(got, F.linear(x.float(), w.float(), b.float()), dtype)
    w2 = (torch.randn(2 * 50, 96) / 10).to(dtype)
    _rel_close(cpu_linear.gate_up_silu(x, w2), ref.gate_up_silu(x.float(), w2.float()), dtype)


def test_bad_inputs_are_rejected():
    packed = cpu_linear.pack_linear_weight(torch.randn(32, 64).bfloat16())
    with pytest.raises(ValueError, match="K = 64"):
        cpu_linear.linear(torch.randn(3, 62).bfloat16(), packed)
    with pytest.raises(ValueError, match="same dtype"):
        cpu_linear.linear(torch.randn(3, 64), packed)
    with pytest.raises(RuntimeError, match="packed weight"):
        ops.linear(torch.empty(3, 32), torch.randn(3, 64), torch.randn(32, 64), None)  # row-major: not packed
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.linear(torch.empty(3, 32, dtype=torch.bfloat16), torch.randn(3, 64).bfloat16(), packed,
                   torch.randn(31).bfloat16())
    with pytest.raises(RuntimeError, match="even number of rows"):
        ops.gate_up_silu(torch.empty(3, 8), torch.randn(3, 64), cpu_linear.pack_linear_weight(torch.randn(17, 64)))


def test_cpu_ops_reexports_cpu_linear():
    assert cpu_ops.linear is cpu_linear.linear and cpu_ops.gate_up_silu is cpu_linear.gate_up_silu
    assert cpu_ops.pack_linear_weight is cpu_linear.pack_linear_weight


@pytest.mark.parametrize("m", [5, 16, 17, 32, 83, 300])
def test_amx(m):
    """On AMX machines the process runs "amx": vnni-packed bf16 weights with K % 32 == 0 through the AMX tiles
    (amx_gemm.cpp) above 4 tokens: one or two A tiles, a tail panel (paired with a full one in linear, N = 56; an
    odd panel count is test_linear's N = 101), a last block of fewer than 32 tokens, several chunks of 256 tokens;
    linear with bias and gate_up."""
    if ISA != "amx":
        pytest.skip(f"no AMX here (this process runs {ISA}; lscpu lists amx_tile / amx_bf16 where present)")
    x, w = torch.randn(m, 256).bfloat16(), (torch.randn(56, 256) / 16).bfloat16()
    b = torch.randn(56).bfloat16()
    packed = cpu_linear.pack_linear_weight(w)
    assert packed.shape == (56, 128, 2)
    _rel_close(cpu_linear.linear(x, packed, b), F.linear(x.float(), w.float(), b.float()), torch.bfloat16)
    wg = (torch.randn(2 * 40, 256) / 16).bfloat16()
    got = cpu_linear.gate_up_silu(x, cpu_linear.pack_linear_weight(wg, halves=True))
    _rel_close(got, ref.gate_up_silu(x.float(), wg.float()), torch.bfloat16)


@pytest.mark.parametrize("isa", ISAS[:-1])
def test_lower_isas(isa):
    """Re-runs this file in a subprocess with STABLELM_FAST_ISA=isa, for each ISA below the process's own."""
    if os.environ.get("STABLELM_FAST_ISA"):
        pytest.skip("already in a subprocess with a forced ISA")
    if ISAS.index(isa) >= ISAS.index(ISA):
        pytest.skip(f"{isa} is not below this process's ISA ({ISA}): the tests above ran it")
    env = dict(os.environ, STABLELM_FAST_ISA=isa)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
           "-k", "not lower_isas"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
