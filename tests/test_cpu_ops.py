"""CPU kernels of the C++ extension (csrc/cpu/) against the torch references (stablelm_fast/ops/reference.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# NOTE: a core test: the extension is always built by `make test`, so a missing one fails here, never skips.
from stablelm_fast.ops import cpu_ops, reference as ref  # noqa: E402

ops = torch.ops.stablelm_fast

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tol(dtype, fp32=(1e-5, 1e-5)):
    if dtype == torch.float32:
        return dict(atol=fp32[0], rtol=fp32[1])
    if dtype == torch.float16:
        return dict(atol=2e-3, rtol=2e-3)
    return dict(atol=2e-2, rtol=2e-2)


def close(actual, expected, dtype, fp32=(1e-5, 1e-5)):
    torch.testing.assert_close(actual.float(), expected.float(), **tol(dtype, fp32))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- layernorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [769, 2048])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layernorm(dtype, hidden, with_bias):
    x = (torch.randn(5, hidden) * 3 + 1).to(dtype)
    w, b = torch.randn(hidden), (torch.randn(hidden) if with_bias else None)
    close(cpu_ops.layernorm(x, w, b, 1e-5), ref.layernorm(x, w, b, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 769, 2048])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_layernorm(dtype, hidden, with_residual):
    x, r = torch.randn(7, hidden).to(dtype), torch.randn(7, hidden).to(dtype)
    r = r if with_residual else None
    w, b = torch.randn(hidden).to(dtype), torch.randn(hidden).to(dtype)
    out, res = cpu_ops.add_layernorm(x, r, w, b, 1e-5)
    e_out, e_res = ref.add_layernorm(x, r, w, b, 1e-5)
    torch.testing.assert_close(res, e_res, atol=0, rtol=0)  # the rounded sum is exact
    close(out, e_out, dtype)


def test_add_layernorm_strided_input():
    x = torch.randn(4, 2 * 769)[:, :769]  # rows not contiguous with each other
    r, w = torch.randn(4, 769), torch.randn(769)
    out, res = cpu_ops.add_layernorm(x, r, w, None, 1e-6)
    e_out, e_res = ref.add_layernorm(x, r, w, None, 1e-6)
    close(out, e_out, torch.float32)
    close(res, e_res, torch.float32)


# ---------------------------------------------------------------- silu_and_mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [1, 1001, 5632])
def test_silu_and_mul(dtype, inter):
    gu = (torch.randn(3, 2 * inter) * 4).to(dtype)
    close(cpu_ops.silu_and_mul(gu), ref.silu_and_mul(gu), dtype)


# ---------------------------------------------------------------- linear / gate_up_silu


def _rel_close(actual, expected, dtype):
    # Accumulation order differs from torch's GEMM: compare relative to the output scale.
    scale = expected.float().abs().max().clamp_min(1.0)
    rtol = 1e-5 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 1.6e-2)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= rtol * scale, f"max error {err} > {rtol} * {scale}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 17])
@pytest.mark.parametrize("k,n", [(1000, 37), (1001, 19), (64, 8), (2048, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(dtype, m, k, n, with_bias):
    x, w = torch.randn(m, k).to(dtype), (torch.randn(n, k) / k**0.5).to(dtype)
    b = torch.randn(n).to(dtype) if with_bias else None
    out = torch.empty(m, n, dtype=dtype)
    ops.linear(out, x, w, b)  # the kernel itself, whatever cpu_ops' M threshold
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    _rel_close(out, expected, dtype)
    _rel_close(cpu_ops.linear(x, w, b), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("k,inter", [(1000, 37), (1001, 5), (2048, 64)])
def test_gate_up_silu(dtype, m, k, inter):
    x, w = torch.randn(m, k).to(dtype), (torch.randn(2 * inter, k) / k**0.5).to(dtype)
    out = torch.empty(m, inter, dtype=dtype)
    ops.gate_up_silu(out, x, w)
    expected = ref.gate_up_silu(x.float(), w.float())
    _rel_close(out, expected, dtype)
    _rel_close(cpu_ops.gate_up_silu(x, w), expected, dtype)


# Above 12 rows the C++ ops run the packed GEMM (csrc/cpu/gemm.cpp): tails in every dimension (tokens not a
# multiple of 16 or of the 128-token block, features not a multiple of 6 or of the 48-feature thread unit, K not a
# multiple of 8), and K > 8192, which is split into 4096-wide blocks accumulated through C^T.
GEMM_MS = [13, 16, 33, 64, 65, 130, 530]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", GEMM_MS)
@pytest.mark.parametrize("k,n", [(7, 5), (300, 101), (8200, 13)])
def test_linear_gemm(dtype, m, k, n):
    x, w = torch.randn(m, k).to(dtype), (torch.randn(n, k) / k**0.5).to(dtype)
    b = torch.randn(n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    ops.linear(out, x, w, b)
    _rel_close(out, F.linear(x.float(), w.float(), b.float()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", GEMM_MS)
@pytest.mark.parametrize("k,inter", [(7, 5), (300, 53)])
def test_gate_up_silu_gemm(dtype, m, k, inter):
    x, w = torch.randn(m, k).to(dtype), (torch.randn(2 * inter, k) / k**0.5).to(dtype)
    out = torch.empty(m, inter, dtype=dtype)
    ops.gate_up_silu(out, x, w)
    _rel_close(out, ref.gate_up_silu(x.float(), w.float()), dtype)


def test_linear_gemm_strided_rows():
    # x and out with a row stride larger than their width (views into wider tensors)
    x = torch.randn(40, 100).bfloat16()[:, :64]
    w = (torch.randn(24, 64) / 8).bfloat16()
    out = torch.zeros(40, 30, dtype=torch.bfloat16)
    ops.linear(out[:, :24], x, w, None)
    _rel_close(out[:, :24], F.linear(x.float(), w.float()), torch.bfloat16)
    assert (out[:, 24:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_half_linear_without_avx2_converts_slices_to_fp32(dtype, with_bias, monkeypatch):
    monkeypatch.setattr(cpu_ops, "HAS_AVX2", False)  # above SCALAR_MAX_M: torch's fp32 GEMM
    monkeypatch.setattr(cpu_ops, "CONVERT_ROWS", 48)  # several slices, the last one partial
    m = cpu_ops.SCALAR_MAX_M[dtype] + 3
    x, w = torch.randn(m, 96).to(dtype), (torch.randn(101, 96) / 10).to(dtype)
    b = torch.randn(101).to(dtype) if with_bias else None
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = cpu_ops.linear(x, w, b)
    assert got.dtype == dtype and got.shape == (m, 101)
    _rel_close(got, expected, dtype)
    w2 = (torch.randn(2 * 50, 96) / 10).to(dtype)
    _rel_close(cpu_ops.gate_up_silu(x, w2), ref.gate_up_silu(x.float(), w2.float()), dtype)


def test_linear_without_avx2_above_threshold_uses_torch(monkeypatch):
    monkeypatch.setattr(cpu_ops, "HAS_AVX2", False)
    m = max(cpu_ops.SCALAR_MAX_M.values()) + 1
    x, w = torch.randn(m, 64), torch.randn(32, 64)
    torch.testing.assert_close(cpu_ops.linear(x, w), F.linear(x, w))


# ---------------------------------------------------------------- panel-packed weights (csrc/cpu/panel_gemm.cpp)


def _unpack(panels, dtype):
    """The inverse of the panel layout (csrc/cpu/panel.h): [N / 16, K, 16] -> [N, K]."""
    p, k, _ = panels.shape
    w = panels.permute(0, 2, 1)  # [P, slot, K]
    if dtype == torch.bfloat16:  # bf16 panels hold feature f at slot 2f (f < 8) or 2(f - 8) + 1
        w = w[:, [2 * f if f < 8 else 2 * (f - 8) + 1 for f in range(16)]]
    return w.reshape(p * 16, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_linear_weight_layout(dtype):
    w = torch.randn(48, 37).to(dtype)
    packed = cpu_ops.pack_linear_weight(w)
    if not cpu_ops.HAS_AVX2:  # the panel GEMM is AVX2-only: weights stay as they are
        assert packed is w
        return
    assert packed.shape == (3, 37, 16) and packed.dtype == dtype
    assert torch.equal(_unpack(packed, dtype), w)
    # Only whole panels are packed; a gate_up weight only if each half is whole panels.
    odd = torch.randn(40, 8).to(dtype)
    assert cpu_ops.pack_linear_weight(odd) is odd
    gate_up = torch.randn(48, 8).to(dtype)
    assert cpu_ops.pack_linear_weight(gate_up, halves=True) is gate_up
    assert cpu_ops.pack_linear_weight(torch.randn(64, 8).to(dtype), halves=True).shape == (4, 8, 16)


# Tokens: every 6-token tile size (1-6), several tiles with a tail, and from 48 on the blocks widened to fp32 first;
# K odd, not a multiple of 8, and above 2048 (widened panels used 2048 columns at a time).
PANEL_MS = [1, 2, 3, 4, 5, 6, 7, 12, 13, 33, 48, 61]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", PANEL_MS)
@pytest.mark.parametrize("k,n", [(37, 32), (300, 48), (2048, 16), (4100, 32)])
def test_panel_linear(dtype, m, k, n):
    x, w = torch.randn(m, k).to(dtype), (torch.randn(n, k) / k**0.5).to(dtype)
    b = torch.randn(n).to(dtype)
    expected = F.linear(x.float(), w.float(), b.float())
    _rel_close(cpu_ops.linear(x, cpu_ops.pack_linear_weight(w), b), expected, dtype)
    _rel_close(cpu_ops.linear(x, cpu_ops.pack_linear_weight(w)), F.linear(x.float(), w.float()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", PANEL_MS)
@pytest.mark.parametrize("k,inter", [(37, 16), (300, 48)])
def test_panel_gate_up_silu(dtype, m, k, inter):
    x, w = torch.randn(m, k).to(dtype), (torch.randn(2 * inter, k) / k**0.5).to(dtype)
    got = cpu_ops.gate_up_silu(x, cpu_ops.pack_linear_weight(w, halves=True))
    _rel_close(got, ref.gate_up_silu(x.float(), w.float()), dtype)


def test_panel_linear_strided_rows():
    x = torch.randn(9, 100).bfloat16()[:, :64]  # rows 100 apart
    w = (torch.randn(32, 64) / 8).bfloat16()
    _rel_close(cpu_ops.linear(x, cpu_ops.pack_linear_weight(w)), F.linear(x.float(), w.float()), torch.bfloat16)


def test_panel_linear_rejects_bad_shapes():
    if not cpu_ops.HAS_AVX2:
        return
    packed = cpu_ops.pack_linear_weight(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="K = x.size"):
        cpu_ops.linear(torch.randn(3, 63), packed)
    with pytest.raises(RuntimeError, match="as many up as gate panels"):
        cpu_ops.gate_up_silu(torch.randn(3, 64), cpu_ops.pack_linear_weight(torch.randn(48, 64)))


# ---------------------------------------------------------------- qk_norm_rope_cache


def _nan_cache(num_blocks, block_size, hkv, d, dtype):
    return torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 160])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_rope_cache(dtype, head_dim, hq, hkv, qk_norm):
    t, num_blocks, block_size = 9, 8, 4
    rotary_dim = head_dim // 4
    qkv = (torch.randn(t, (hq + 2 * hkv) * head_dim) * 2).to(dtype)
    positions = torch.randint(0, 500, (t,))
    cos_sin = ref.rotary_cos_sin(512, rotary_dim, 10000.0)
    qn = torch.randn(hq, head_dim) if qk_norm else None
    kn = torch.randn(hkv, head_dim) if qk_norm else None
    slots = torch.randperm(num_blocks * block_size)[:t]
    slots[[1, 5]] = -1
    kc, vc = _nan_cache(num_blocks, block_size, hkv, head_dim, dtype), _nan_cache(num_blocks, block_size, hkv, head_dim, dtype)
    ekc, evc = kc.clone(), vc.clone()
    q = cpu_ops.qk_norm_rope_cache(qkv, positions, cos_sin, qn, kn, 1e-5, kc, vc, slots, hq, hkv, head_dim)
    eq = ref.qk_norm_rope_cache(qkv, positions, cos_sin, qn, kn, 1e-5, ekc, evc, slots, hq, hkv, head_dim)
    close(q, eq, dtype)
    assert torch.equal(kc.isnan(), ekc.isnan()) and torch.equal(vc.isnan(), evc.isnan())  # same slots written
    close(kc.nan_to_num(), ekc.nan_to_num(), dtype)
    torch.testing.assert_close(vc, evc, atol=0, rtol=0, equal_nan=True)


# ---------------------------------------------------------------- paged attention


def _make_cache(ctxs, hkv, d, dtype, block_size=16, max_blocks=12):
    """NaN-filled caches with each sequence's first ctx tokens written through a random block table."""
    num_blocks = len(ctxs) * max_blocks + 3
    kc, vc = _nan_cache(num_blocks, block_size, hkv, d, dtype), _nan_cache(num_blocks, block_size, hkv, d, dtype)
    perm = torch.randperm(num_blocks)
    bt = perm[: len(ctxs) * max_blocks].view(len(ctxs), max_blocks).to(torch.int32)
    for b, ctx in enumerate(ctxs):
        pos = torch.arange(ctx)
        blocks, offs = bt[b, pos // block_size].long(), pos % block_size
        kc[blocks, offs] = torch.randn(ctx, hkv, d).to(dtype)
        vc[blocks, offs] = torch.randn(ctx, hkv, d).to(dtype)
    return kc, vc, bt


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 160])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_paged_attention_varlen(dtype, head_dim, hq, hkv):
    qlens, ctxs = [5, 1, 70, 3], [20, 45, 70, 3]  # extend, decode, full prefill (> 64 rows), tiny prefill
    kc, vc, bt = _make_cache(ctxs, hkv, head_dim, dtype)
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.tensor(ctxs, dtype=torch.int32)
    q = torch.randn(sum(qlens), hq, head_dim).to(dtype)
    scale = head_dim**-0.5
    out = cpu_ops.paged_attention(q, kc, vc, bt, cu, lens, scale)
    close(out, ref.paged_attention(q, kc, vc, bt, cu, lens, scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 160])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_paged_attention_decode(dtype, head_dim, hq, hkv):
    ctxs = [1, 33, 190, 16]
    kc, vc, bt = _make_cache(ctxs, hkv, head_dim, dtype)
    lens = torch.tensor(ctxs, dtype=torch.int32)
    q = torch.randn(len(ctxs), hq, head_dim).to(dtype)
    out = cpu_ops.paged_attention_decode(q, kc, vc, bt, lens, 0.1)
    close(out, ref.paged_attention_decode(q, kc, vc, bt, lens, 0.1), dtype)


def test_paged_attention_empty_sequence():
    kc, vc, bt = _make_cache([8, 8], 2, 64, torch.float32)
    cu = torch.tensor([0, 0, 3], dtype=torch.int32)  # sequence 0 has no new tokens
    lens = torch.tensor([8, 8], dtype=torch.int32)
    q = torch.randn(3, 2, 64)
    close(cpu_ops.paged_attention(q, kc, vc, bt, cu, lens, 0.125), ref.paged_attention(q, kc, vc, bt, cu, lens, 0.125), torch.float32)


# ---------------------------------------------------------------- opcheck


def _opcheck_cases():
    d, hq, hkv = 64, 4, 2
    kc, vc, bt = _make_cache([6, 3], hkv, d, torch.float32, block_size=4, max_blocks=3)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    x, w, b = torch.randn(3, 40), torch.randn(40), torch.randn(40)
    cs = ref.rotary_cos_sin(16, d // 4, 10000.0)
    qkv = torch.randn(3, (hq + 2 * hkv) * d)
    return {
        "layernorm": (torch.empty(3, 40), x, w, b, 1e-5),
        "add_layernorm": (torch.empty(3, 40), torch.empty(3, 40), x, torch.randn(3, 40), w, None, 1e-5),
        "silu_and_mul": (torch.empty(3, 20), x),
        "linear": (torch.empty(3, 24), x, torch.randn(24, 40), torch.randn(24)),
        "gate_up_silu": (torch.empty(3, 12), x, torch.randn(24, 40)),
        "pack_linear_weight": (torch.empty(2, 40, 16), torch.randn(32, 40)),
        "qk_norm_rope_cache": (torch.empty(3, hq, d), qkv, torch.tensor([0, 5, 9]), cs, torch.randn(hq, d),
                               torch.randn(hkv, d), 1e-5, kc.clone(), vc.clone(), torch.tensor([0, -1, 7]), hq, hkv, d),
        "paged_attention": (torch.empty(4, hq, d), torch.randn(4, hq, d), kc, vc, bt,
                            torch.tensor([0, 3, 4], dtype=torch.int32), torch.tensor([6, 3], dtype=torch.int32), 0.125),
        "paged_attention_decode": (torch.empty(2, hq, d), torch.randn(2, hq, d), kc, vc, bt,
                                   torch.tensor([6, 3], dtype=torch.int32), 0.125),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    torch.library.opcheck(getattr(ops, name).default, _opcheck_cases()[name])


# ---------------------------------------------------------------- portable scalar paths


def test_scalar_fallback_paths():
    """Re-runs the kernel tests in a subprocess with the AVX2 paths disabled (STABLELM_FAST_NO_AVX2=1)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, STABLELM_FAST_NO_AVX2="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
           "-k", "not scalar_fallback and not opcheck and not float16"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
