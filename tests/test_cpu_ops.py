"""CPU kernels of the C++ extension (csrc/cpu/) against the torch references (stablelm_fast/ops/reference.py)."""

from __future__ import annotations

import pytest
import torch

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


# linear / gate_up_silu / pack_linear_weight: tests/test_cpu_linear.py


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
        "linear": (torch.empty(3, 24), x, cpu_ops.pack_linear_weight(torch.randn(24, 40)), torch.randn(24)),
        "gate_up_silu": (torch.empty(3, 12), x, cpu_ops.pack_linear_weight(torch.randn(24, 40), halves=True)),
        "pack_linear_weight": (torch.empty(32, 40, 1), torch.randn(32, 40), False),
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
