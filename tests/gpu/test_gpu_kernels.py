"""Every GPU kernel against the torch reference, on the GPU: the `triton` backend (kernels/, compiled for the GPU,
not interpreted) and the `cuda` backend (csrc/cuda/ through ops/cuda_ops.py), plus flash-attn when installed.

Run by `make gpu-check` (gpu/check.sh) on a CUDA machine; on a CPU-only machine every test skips with the reason.
The reference (stablelm_fast/ops/reference.py) runs on CPU copies of the same inputs, so it is independent of the
GPU code under test. Covered: head sizes 64 / 80 / 160 (80 and 160 are masked, non-power-of-two tiles), GQA 1 and 4,
odd token counts, block tables that are permuted and whose unused entries point at NaN-filled blocks (any read
past a sequence's context turns the output into NaN), decode contexts spanning several split-K partitions, prefill
with cached prefixes (chunked prefill / prefix hits), fp32 / fp16 / bf16.
"""

from __future__ import annotations

import os

import pytest
import torch

from stablelm_fast.ops import reference as ref

# STABLELM_FAST_TEST_DEVICE=cpu (with TRITON_INTERPRET=1) dry-runs the triton half of these tests on CPU.
DEV = os.environ.get("STABLELM_FAST_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: run `make gpu-check` on a GPU machine")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
HEADS = [(64, 8, 8), (80, 8, 2), (160, 8, 8), (160, 32, 8)]  # (D, Hq, Hkv): GQA 1 and 4 per head size
BLOCK = 16


def _ops(backend: str):
    from stablelm_fast.ops import extension_has_cuda, get_ops

    if backend == "cuda" and (DEV != "cuda" or not extension_has_cuda()):
        pytest.skip("the extension was built without CUDA (nvcc missing at build time): cuda backend not testable")
    return get_ops(backend)


def _r(*shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def _cpu(*ts):
    return [None if t is None else t.cpu() for t in ts]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [2048, 2560, 5120])
def test_norms_and_activation(backend, dtype, hidden):
    ops, g = _ops(backend), torch.Generator().manual_seed(hidden)
    T = 37
    x, res = _r(T, hidden, dtype=dtype, g=g, scale=2), _r(T, hidden, dtype=dtype, g=g)
    w, b = _r(hidden, dtype=dtype, g=g, scale=0.1) + 1, _r(hidden, dtype=dtype, g=g, scale=0.1)
    out, new_res = ops.add_layernorm(x, res, w, b, 1e-5)
    want, want_res = ref.add_layernorm(*_cpu(x, res, w, b), 1e-5)
    # Same rounding of the sum: bit-exact on a GPU (the Triton interpreter of a CPU dry run rounds bf16 toward zero)
    exact = DEV == "cuda" or dtype != torch.bfloat16
    torch.testing.assert_close(new_res.cpu(), want_res, atol=0, rtol=0 if exact else 2**-7)
    torch.testing.assert_close(out.cpu(), want, **TOL[dtype])
    torch.testing.assert_close(ops.layernorm(x, w, None, 1e-5).cpu(), ref.layernorm(*_cpu(x, w), None, 1e-5),
                               **TOL[dtype])
    gu = _r(T, 2 * 1376, dtype=dtype, g=g, scale=3)
    torch.testing.assert_close(ops.silu_and_mul(gu).cpu(), ref.silu_and_mul(gu.cpu()), **TOL[dtype])


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 7, 32, 301])
def test_gate_up_silu(backend, dtype, m):
    ops, g = _ops(backend), torch.Generator().manual_seed(m)
    H, inter = 1024, 1408
    x, w = _r(m, H, dtype=dtype, g=g), _r(2 * inter, H, dtype=dtype, g=g, scale=H ** -0.5)
    got = ops.gate_up_silu(x, w).float().cpu()
    want = ref.gate_up_silu(x.float(), w.float()).cpu()  # fp32 math: the GPU's own rounding differs from the CPU's
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=4e-2, rtol=4e-2)
    torch.testing.assert_close(got, want, **tol)


def _paged_cache(num_blocks, hkv, d, dtype, g):
    """K/V caches full of NaN, and a permuted block order to hand out."""
    kc = torch.full((num_blocks, BLOCK, hkv, d), float("nan"), dtype=dtype, device=DEV)
    vc = torch.full_like(kc, float("nan"))
    return kc, vc, torch.randperm(num_blocks, generator=g).tolist()


def _fill(kc, vc, table, ctx, g):
    """Write random K/V into the first ctx slots of a sequence's blocks (the rest of its last block stays NaN)."""
    hkv, d = kc.shape[2:]
    slots = torch.tensor([table[i // BLOCK] * BLOCK + i % BLOCK for i in range(ctx)], device=DEV)
    kc.view(-1, hkv, d)[slots] = torch.randn(ctx, hkv, d, generator=g).to(kc.dtype).to(DEV)
    vc.view(-1, hkv, d)[slots] = torch.randn(ctx, hkv, d, generator=g).to(kc.dtype).to(DEV)


def _tables(ctxs, free, width):
    """Block tables handing out blocks from `free`; unused entries point at a NaN block that nobody owns."""
    nan_block = free.pop(0)
    tables = torch.full((len(ctxs), width), nan_block, dtype=torch.int32)
    per_seq = []
    for b, ctx in enumerate(ctxs):
        own = [free.pop() for _ in range(-(-ctx // BLOCK))]
        tables[b, : len(own)] = torch.tensor(own, dtype=torch.int32)
        per_seq.append(own)
    return tables, per_seq


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq,hkv", HEADS)
def test_decode_attention(backend, dtype, d, hq, hkv):
    ops, g = _ops(backend), torch.Generator().manual_seed(d + hq)
    ctxs = [1, 17, 600, 1100, 33]  # > 512: several split-K partitions of the Triton kernel
    kc, vc, free = _paged_cache(200, hkv, d, dtype, g)
    tables, owned = _tables(ctxs, free, width=80)
    for own, ctx in zip(owned, ctxs):
        _fill(kc, vc, own, ctx, g)
    q = _r(len(ctxs), hq, d, dtype=dtype, g=g)
    lens = torch.tensor(ctxs, dtype=torch.int32)
    got = ops.paged_attention_decode(q, kc, vc, tables.to(DEV), lens.to(DEV), d ** -0.5)
    want = ref.paged_attention_decode(*_cpu(q, kc, vc), tables, lens, d ** -0.5)
    assert not got.isnan().any(), "NaN: a kernel read a cache slot past a context"
    torch.testing.assert_close(got.cpu(), want, **TOL[dtype])


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq,hkv", HEADS)
def test_prefill_attention_with_cached_prefix(backend, dtype, d, hq, hkv):
    ops, g = _ops(backend), torch.Generator().manual_seed(d * hq)
    # (q_len, ctx): a full prompt, a chunk after a cached prefix, a single token, an odd long prompt
    shapes = [(37, 37), (21, 150), (1, 9), (131, 131)]
    kc, vc, free = _paged_cache(120, hkv, d, dtype, g)
    tables, owned = _tables([c for _, c in shapes], free, width=16)
    for own, (_, ctx) in zip(owned, shapes):
        _fill(kc, vc, own, ctx, g)
    cu = torch.tensor([0] + [sum(q for q, _ in shapes[: i + 1]) for i in range(len(shapes))], dtype=torch.int32)
    lens = torch.tensor([c for _, c in shapes], dtype=torch.int32)
    q = _r(int(cu[-1]), hq, d, dtype=dtype, g=g)
    got = ops.paged_attention(q, kc, vc, tables.to(DEV), cu.to(DEV), lens.to(DEV), d ** -0.5)
    want = ref.paged_attention(*_cpu(q, kc, vc), tables, cu, lens, d ** -0.5)
    assert not got.isnan().any(), "NaN: a kernel read a cache slot past a context"
    torch.testing.assert_close(got.cpu(), want, **TOL[dtype])


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq,hkv", HEADS)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_rope_cache(backend, dtype, d, hq, hkv, qk_norm):
    ops, g = _ops(backend), torch.Generator().manual_seed(d + hkv)
    T = 13
    qkv = _r(T, (hq + 2 * hkv) * d, dtype=dtype, g=g)
    positions = torch.randint(0, 4000, (T,), generator=g).to(DEV)
    cos_sin = ref.rotary_cos_sin(4096, d // 4, 10000.0).to(DEV)
    qw = _r(hq, d, dtype=dtype, g=g, scale=0.1) + 1 if qk_norm else None
    kw = _r(hkv, d, dtype=dtype, g=g, scale=0.1) + 1 if qk_norm else None
    kc, vc, _ = _paged_cache(8, hkv, d, dtype, g)
    slots = torch.randperm(8 * BLOCK, generator=g)[:T]
    slots[3] = -1  # padding token: no cache write
    kc_ref, vc_ref = kc.cpu(), vc.cpu()
    q = ops.qk_norm_rope_cache(qkv, positions, cos_sin, qw, kw, 1e-5, kc, vc, slots.to(DEV), hq, hkv, d)
    want = ref.qk_norm_rope_cache(*_cpu(qkv, positions, cos_sin, qw, kw), 1e-5, kc_ref, vc_ref, slots, hq, hkv, d)
    torch.testing.assert_close(q.cpu(), want, **TOL[dtype])
    # equal_nan: the slots nobody wrote must still be NaN (slot -1 skipped, nothing else touched)
    torch.testing.assert_close(kc.cpu(), kc_ref, equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(vc.cpu(), vc_ref, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,hq,hkv", HEADS)
def test_flash_attn_paths(dtype, d, hq, hkv, monkeypatch):
    from stablelm_fast.ops import triton_ops

    if not triton_ops.flash_attn_available(d):
        pytest.skip("flash-attn is not installed (or does not support this head size): its path is not taken")
    g = torch.Generator().manual_seed(d)
    page = 256  # FA2's paged-KV page size multiple: the size at which triton_ops routes to flash-attn
    kc = torch.full((12, page, hkv, d), float("nan"), dtype=dtype, device=DEV)
    vc = torch.full_like(kc, float("nan"))
    ctxs, owned = [300, 700], [[5, 2], [0, 9, 3]]
    tables = torch.tensor([[5, 2, 11], [0, 9, 3]], dtype=torch.int32)
    for own, ctx in zip(owned, ctxs):
        for i in range(ctx):
            kc[own[i // page], i % page] = torch.randn(hkv, d, generator=g).to(dtype).to(DEV)
            vc[own[i // page], i % page] = torch.randn(hkv, d, generator=g).to(dtype).to(DEV)
    lens = torch.tensor(ctxs, dtype=torch.int32)
    q = _r(2, hq, d, dtype=dtype, g=g)
    got = triton_ops.paged_attention_decode(q, kc, vc, tables.to(DEV), lens.to(DEV), d ** -0.5)
    torch.testing.assert_close(got.cpu(), ref.paged_attention_decode(*_cpu(q, kc, vc), tables, lens, d ** -0.5),
                               **TOL[dtype])
    cu = torch.tensor([0, 40, 47], dtype=torch.int32)
    q = _r(47, hq, d, dtype=dtype, g=g)
    got = triton_ops.paged_attention(q, kc, vc, tables.to(DEV), cu.to(DEV), lens.to(DEV), d ** -0.5)
    torch.testing.assert_close(got.cpu(), ref.paged_attention(*_cpu(q, kc, vc), tables, cu, lens, d ** -0.5),
                               **TOL[dtype])
