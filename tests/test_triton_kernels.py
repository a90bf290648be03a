"""Triton kernels (kernels/) vs the torch references (stablelm_fast/ops/reference.py).

Runs under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py when there is no GPU) on CPU tensors, so
shapes are tiny: a few tokens, 2-4 heads, block sizes 16/8, a few blocks. What is covered:
  * head sizes 64 / 80 / 160 (80 and 160 are not powers of two: masked tiles), GQA ratios 1 and 4;
  * odd token counts, permuted (random) block tables, unused cache slots and unused block-table entries pointing at
    NaN-filled blocks (any out-of-range K/V read turns the output into NaN);
  * decode contexts spanning several blocks and several split-K partitions (partition_size forced small) plus the
    single-partition path; prefill with full prompts, prefix hits / chunked prefill, q_len 1 and q_len 0;
  * fp32 (tight tolerances) and bf16 (~2e-2); QK-norm on and off; slot -1 skipped.
"""

from __future__ import annotations

import math

import pytest
import torch

from stablelm_fast.ops import reference as ref

import triton  # noqa: E402,F401  (a requirement of the test suite: never skipped)

from stablelm_fast.kernels.add_layernorm import add_layernorm, layernorm  # noqa: E402
from stablelm_fast.kernels.paged_attention_decode import paged_attention_decode  # noqa: E402
from stablelm_fast.kernels.paged_attention_prefill import paged_attention  # noqa: E402
from stablelm_fast.kernels.rope_qknorm_cache import qk_norm_rope_cache  # noqa: E402
from stablelm_fast.kernels.silu_and_mul import gate_up_silu, silu_and_mul  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
# (Hq, Hkv): GQA ratio 1 and 4
HEADS = [(2, 2), (4, 1)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 80])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_add_layernorm(dtype, hidden, with_residual, with_bias):
    g = _gen(0)
    T = 5
    x = (torch.randn(T, hidden, generator=g) * 2 + 0.5).to(dtype)
    residual = torch.randn(T, hidden, generator=g).to(dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    b = (0.1 * torch.randn(hidden, generator=g)).to(dtype) if with_bias else None
    out, new_res = add_layernorm(x, residual, w, b, 1e-5)
    ref_out, ref_res = ref.add_layernorm(x, residual, w, b, 1e-5)
    # Same rounding of the sum as the reference: bit-exact in fp32. In bf16 allow 1 ulp, because the Triton 3.9
    # interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest even, which would be bit-exact).
    torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0 if dtype == torch.float32 else 2**-7)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(layernorm(x, w, b, 1e-5), ref.layernorm(x, w, b, 1e-5), **TOL[dtype])


def test_layernorm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weight"):
        layernorm(torch.randn(3, 8), torch.ones(7), None, 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        layernorm(torch.randn(8, 3).t(), torch.ones(8), None, 1e-5)


# ----------------------------------------------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    gate_up = (torch.randn(7, 2 * 40, generator=_gen(1)) * 3).to(dtype)
    torch.testing.assert_close(silu_and_mul(gate_up), ref.silu_and_mul(gate_up), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_up_silu(dtype):
    # M, K, I deliberately not multiples of the 16-wide tiles: exercises all three masks.
    g = _gen(2)
    M, K, I = 5, 40, 24
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(2 * I, K, generator=g) / math.sqrt(K)).to(dtype)
    out = gate_up_silu(x, w, block_m=16, block_n=16, block_k=16)
    torch.testing.assert_close(out, ref.gate_up_silu(x, w), **TOL[dtype])


# ---------------------------------------------------------------------------------------------------- paged KV helpers


def _paged_kv(ctx_lens, Hkv, D, block_size, dtype, g, extra_blocks=3):
    """Caches filled with NaN; each sequence gets random distinct blocks; only its first ctx tokens are written.

    Unused block-table entries point at block 0, which nobody owns (all NaN), so a read past the context is visible;
    block 0 is also where a kernel's masked block-table lookups (other=0) land, so a missing K/V load mask shows too.
    """
    blocks_per_seq = [max(1, -(-c // block_size)) for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    perm = (1 + torch.randperm(num_blocks - 1, generator=g)).tolist()
    nan_block = 0
    k_cache = torch.full((num_blocks, block_size, Hkv, D), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    max_blocks = max(blocks_per_seq) + 1  # one spare column: always an unused entry
    block_tables = torch.full((len(ctx_lens), max_blocks), nan_block, dtype=torch.int32)
    for b, (c, nb) in enumerate(zip(ctx_lens, blocks_per_seq)):
        ids = [perm.pop() for _ in range(nb)]
        block_tables[b, :nb] = torch.tensor(ids, dtype=torch.int32)
        for p in range(c):
            blk, off = ids[p // block_size], p % block_size
            k_cache[blk, off] = torch.randn(Hkv, D, generator=g).to(dtype)
            v_cache[blk, off] = torch.randn(Hkv, D, generator=g).to(dtype)
    return k_cache, v_cache, block_tables


# ------------------------------------------------------------------------------------------------- rope + norm + cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("heads", HEADS + [(3, 3)])  # (3, 3): head counts that are not powers of two
@pytest.mark.parametrize("head_dim", [64, 80, 160])
def test_qk_norm_rope_cache(dtype, qk_norm, head_dim, heads):
    g = _gen(3)
    Hq, Hkv = heads
    D, T, block_size, num_blocks = head_dim, 5, 8, 3
    rotary_dim = D // 4
    cos_sin = ref.rotary_cos_sin(64, rotary_dim, 10000.0)
    qkv = (torch.randn(T, (Hq + 2 * Hkv) * D, generator=g) + 0.3).to(dtype)
    positions = torch.randint(0, 64, (T,), generator=g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[2] = -1  # padding token: must not be written
    qw = (1 + 0.2 * torch.randn(Hq, D, generator=g)).to(dtype) if qk_norm else None
    kw = (1 + 0.2 * torch.randn(Hkv, D, generator=g)).to(dtype) if qk_norm else None
    caches = [torch.full((num_blocks, block_size, Hkv, D), float("nan"), dtype=dtype) for _ in range(4)]
    kc, vc, kc_ref, vc_ref = caches
    args = (qkv, positions, cos_sin, qw, kw, 1e-5)
    q = qk_norm_rope_cache(*args, kc, vc, slots, Hq, Hkv, D)
    q_ref = ref.qk_norm_rope_cache(*args, kc_ref, vc_ref, slots, Hq, Hkv, D)
    torch.testing.assert_close(q, q_ref, **TOL[dtype])
    torch.testing.assert_close(kc, kc_ref, equal_nan=True, **TOL[dtype])  # untouched slots stay NaN
    torch.testing.assert_close(vc, vc_ref, equal_nan=True, atol=0, rtol=0)  # v is a plain copy
    assert int(torch.isnan(kc).any(dim=(2, 3)).logical_not().sum()) == T - 1  # exactly T-1 slots written


def test_qk_norm_rope_cache_rejects_bad_shapes():
    qkv = torch.randn(3, 6 * 64)
    cache = torch.zeros(2, 8, 2, 64)
    cs = ref.rotary_cos_sin(16, 16, 10000.0)
    pos = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="qkv"):
        qk_norm_rope_cache(qkv, pos, cs, None, None, 1e-5, cache, cache.clone(), pos, 4, 2, 64)
    with pytest.raises(ValueError, match="k_cache"):
        qk_norm_rope_cache(qkv, pos, cs, None, None, 1e-5, cache.transpose(0, 1), cache.clone(), pos, 2, 2, 64)


# ----------------------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (80, 8), (160, 16), (160, 8)])
def test_paged_attention_decode(dtype, head_dim, heads, block_size):
    g = _gen(4)
    Hq, Hkv = heads
    D = head_dim
    ctx_lens = [1, 37, 70]  # 70 tokens = 3 partitions of 32 and 5-9 blocks
    k_cache, v_cache, bt = _paged_kv(ctx_lens, Hkv, D, block_size, dtype, g)
    q = torch.randn(len(ctx_lens), Hq, D, generator=g).to(dtype)
    cl = torch.tensor(ctx_lens, dtype=torch.int32)
    scale = D**-0.5
    expected = ref.paged_attention_decode(q, k_cache, v_cache, bt, cl, scale)
    out = paged_attention_decode(q, k_cache, v_cache, bt, cl, scale, partition_size=32, block_n=16)
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_decode_single_partition(dtype):
    g = _gen(5)
    ctx_lens = [9, 23]
    k_cache, v_cache, bt = _paged_kv(ctx_lens, 1, 80, 8, dtype, g)
    q = torch.randn(2, 4, 80, generator=g).to(dtype)
    cl = torch.tensor(ctx_lens, dtype=torch.int32)
    expected = ref.paged_attention_decode(q, k_cache, v_cache, bt, cl, 0.1)
    out = paged_attention_decode(q, k_cache, v_cache, bt, cl, 0.1)  # default partition: one partition
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (80, 8), (160, 8)])
def test_paged_attention_prefill(dtype, head_dim, heads, block_size):
    g = _gen(6)
    Hq, Hkv = heads
    D = head_dim
    # (q_len, ctx): full prompt spanning 2 query tiles, prefix hit / chunked prefill (one short chunk, one spanning
    # 2 query tiles), decode-like, empty (q_len 0: nothing to compute or write).
    seqs = [(19, 19), (3, 40), (17, 29), (1, 13), (0, 5)]
    ctx_lens = [c for _, c in seqs]
    k_cache, v_cache, bt = _paged_kv(ctx_lens, Hkv, D, block_size, dtype, g)
    q_lens = [n for n, _ in seqs]
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    q = torch.randn(sum(q_lens), Hq, D, generator=g).to(dtype)
    cl = torch.tensor(ctx_lens, dtype=torch.int32)
    scale = D**-0.5
    expected = ref.paged_attention(q, k_cache, v_cache, bt, cu, cl, scale)
    out = paged_attention(q, k_cache, v_cache, bt, cu, cl, scale, block_m=16, block_n=16)
    torch.testing.assert_close(out, expected, **TOL[dtype])


def test_paged_attention_rejects_bad_inputs():
    q = torch.randn(2, 4, 64)
    cache = torch.zeros(4, 8, 2, 64)
    bt = torch.zeros(2, 2, dtype=torch.int32)
    cl = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        paged_attention_decode(q, cache, cache, bt.long(), cl, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_decode(torch.randn(2, 3, 64), cache, cache, bt, cl, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention(q, cache.half(), cache.half(), bt, torch.tensor([0, 1, 2], dtype=torch.int32), cl, 1.0)


# ------------------------------------------------------------------------------------------------------ backend module


def test_triton_backend_exposes_contract():
    from stablelm_fast.ops import get_ops, triton_ops

    table = get_ops("triton")
    for name in ("linear", "gate_up_silu", "layernorm", "add_layernorm", "silu_and_mul", "qk_norm_rope_cache",
                 "paged_attention", "paged_attention_decode"):
        assert getattr(table, name) is getattr(triton_ops, name) and table.source[name] == "triton", name
    assert callable(triton_ops.flash_attn_available)
    if not torch.cuda.is_available():
        assert not triton_ops.flash_attn_available(64)  # the flash-attn path is never taken on CPU


def test_triton_backend_attention_dispatch_cpu():
    from stablelm_fast.ops import triton_ops

    g = _gen(7)
    k_cache, v_cache, bt = _paged_kv([6, 11], 2, 64, 8, torch.float32, g)
    q = torch.randn(2, 2, 64, generator=g)
    cl = torch.tensor([6, 11], dtype=torch.int32)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    expected = ref.paged_attention_decode(q, k_cache, v_cache, bt, cl, 0.125)
    torch.testing.assert_close(triton_ops.paged_attention_decode(q, k_cache, v_cache, bt, cl, 0.125), expected,
                               **TOL[torch.float32])
    torch.testing.assert_close(triton_ops.paged_attention(q, k_cache, v_cache, bt, cu, cl, 0.125), expected,
                               **TOL[torch.float32])
