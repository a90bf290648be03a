"""paged_attention_decode (one new token per sequence): every implementation against the reference, batches of
1 / 7 / 83 / 1031 sequences over NaN-poisoned paged caches."""

import pytest
import torch

from op_impls import DTYPES, TOKEN_COUNTS, close, device, implementations, op, paged_kv, skip_unsupported
from stablelm_fast.ops import reference as ref

# (head_dim, hq, hkv, block_size); 72: a head size that ends in a partial vector (8 of 16 fp32 / 32 bf16 lanes),
# with a GQA group of 3
HEADS = [(64, 2, 2, 16), (80, 4, 1, 8), (160, 4, 2, 16), (72, 6, 2, 8)]


def _check(backend, dtype, ctxs, head_dim, hq, hkv, block_size, g):
    """One decode step of len(ctxs) sequences over a NaN-poisoned paged cache: the backend against the reference."""
    k, v, tables = paged_kv(ctxs, hkv, head_dim, block_size, dtype, g)
    q = torch.randn(len(ctxs), hq, head_dim, generator=g).to(dtype)
    lens = torch.tensor(ctxs, dtype=torch.int32)
    dev = device(backend)
    got = op(backend, "paged_attention_decode")(q.to(dev), k.to(dev), v.to(dev), tables.to(dev), lens.to(dev),
                                                head_dim ** -0.5)
    assert not got.isnan().any()
    close(got, ref.paged_attention_decode(q, k, v, tables, lens, head_dim ** -0.5), dtype, fp32=2e-4)


@pytest.mark.parametrize("backend", implementations("paged_attention_decode"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", TOKEN_COUNTS)
@pytest.mark.parametrize("head_dim,hq,hkv,block_size", HEADS)
def test_paged_attention_decode(backend, dtype, batch, head_dim, hq, hkv, block_size):
    skip_unsupported(backend, dtype, batch, max_interpreted_tokens=8)
    if batch > 100 and head_dim != 64:
        pytest.skip("the reference loops over sequences in Python: 1031 sequences at one head size")
    g = torch.Generator().manual_seed(batch + head_dim)
    _check(backend, dtype, torch.randint(1, 70, (batch,), generator=g).tolist(), head_dim, hq, hkv, block_size, g)


@pytest.mark.parametrize("backend", implementations("paged_attention_decode"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ctxs", [[517], [300, 33], [31], [64, 65, 1]])
@pytest.mark.parametrize("head_dim,hq,hkv,block_size", [(64, 32, 32, 16), (160, 8, 2, 16)])
def test_long_contexts_of_small_batches(backend, dtype, ctxs, head_dim, hq, hkv, block_size):
    """Few sequences: the CPU kernel splits each context into parts (whole cache blocks, >= 32 keys) run apart
    and merged; all heads of a row in one part (hq = 32: the 1.6B's MHA rows)."""
    skip_unsupported(backend, dtype, len(ctxs), max_interpreted_tokens=8)
    _check(backend, dtype, ctxs, head_dim, hq, hkv, block_size, torch.Generator().manual_seed(sum(ctxs) + head_dim))


def test_opcheck():
    import stablelm_fast.ops.cpu_ops  # noqa: F401  (registers the ops' fake kernels)

    g = torch.Generator().manual_seed(0)
    k, v, tables = paged_kv([6, 3], 2, 64, 4, torch.float32, g)
    k, v = k.nan_to_num(), v.nan_to_num()
    args = (torch.empty(2, 4, 64), torch.randn(2, 4, 64), k, v, tables, torch.tensor([6, 3], dtype=torch.int32),
            0.125)
    torch.library.opcheck(torch.ops.stablelm_fast.paged_attention_decode.default, args)
