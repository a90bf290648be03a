"""paged_attention (causal varlen: full prefill, chunked prefill / prefix extend, decode rows, in one batch): every
implementation against the reference, on NaN-poisoned paged caches with scrambled block tables."""

import pytest
import torch

from op_impls import DTYPES, TOKEN_COUNTS, close, device, implementations, op, paged_kv, skip_unsupported
from stablelm_fast.ops import reference as ref

# (head_dim, Hq, Hkv, block_size)
HEADS = [(64, 2, 2, 16), (80, 4, 1, 8), (160, 4, 2, 16)]


def _batch(tokens: int, g: torch.Generator) -> tuple[list[int], list[int]]:
    """q lengths summing to `tokens` and context lengths (>= q): a full prompt, an extend, decodes."""
    if tokens == 1:
        return [1], [9]
    qlens = [tokens // 2, tokens - tokens // 2 - 1, 1]
    ctxs = [qlens[0], qlens[1] + int(torch.randint(1, 40, (1,), generator=g)), 23]
    return [q for q in qlens if q > 0], [c for q, c in zip(qlens, ctxs) if q > 0]


@pytest.mark.parametrize("backend", implementations("paged_attention"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("head_dim,hq,hkv,block_size", HEADS)
def test_paged_attention(backend, dtype, tokens, head_dim, hq, hkv, block_size):
    skip_unsupported(backend, dtype, tokens, max_interpreted_tokens=8)
    g = torch.Generator().manual_seed(tokens + head_dim)
    qlens, ctxs = _batch(tokens, g)
    k, v, tables = paged_kv(ctxs, hkv, head_dim, block_size, dtype, g)
    q = torch.randn(sum(qlens), hq, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.tensor(ctxs, dtype=torch.int32)
    dev = device(backend)
    got = op(backend, "paged_attention")(q.to(dev), k.to(dev), v.to(dev), tables.to(dev), cu.to(dev), lens.to(dev),
                                         head_dim ** -0.5, max(qlens))
    assert not got.isnan().any()
    close(got, ref.paged_attention(q, k, v, tables, cu, lens, head_dim ** -0.5), dtype, fp32=2e-4)


def test_opcheck():
    import stablelm_fast.ops.cpu_ops  # noqa: F401  (registers the ops' fake kernels)

    g = torch.Generator().manual_seed(0)
    k, v, tables = paged_kv([6, 3], 2, 64, 4, torch.float32, g)
    k, v = k.nan_to_num(), v.nan_to_num()
    args = (torch.empty(4, 4, 64), torch.randn(4, 4, 64), k, v, tables, torch.tensor([0, 3, 4], dtype=torch.int32),
            torch.tensor([6, 3], dtype=torch.int32), 0.125)
    torch.library.opcheck(torch.ops.stablelm_fast.paged_attention.default, args)
