"""qk_norm_rope_cache (per-head QK LayerNorm, partial NeoX rotary, K/V write into the paged cache): every
implementation against the reference. Caches start NaN, so a write to the wrong slot (or a missed one) shows."""

import pytest
import torch

from op_impls import DTYPES, TOKEN_COUNTS, close, device, implementations, op, skip_unsupported
from stablelm_fast.ops import reference as ref

# (head_dim, Hq, Hkv): the three families' head sizes; GQA 4:1 and 1:1; a head count that is not a power of two
HEADS = [(64, 2, 2), (80, 4, 1), (160, 3, 3)]


@pytest.mark.parametrize("backend", implementations("qk_norm_rope_cache"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("head_dim,hq,hkv", HEADS)
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_rope_cache(backend, dtype, tokens, head_dim, hq, hkv, qk_norm):
    skip_unsupported(backend, dtype, tokens, max_interpreted_tokens=8)
    g = torch.Generator().manual_seed(tokens + head_dim)
    block_size = 16
    num_blocks = tokens // block_size + 3
    qkv = (torch.randn(tokens, (hq + 2 * hkv) * head_dim, generator=g) * 2).to(dtype)
    positions = torch.randint(0, 2048, (tokens,), generator=g)
    cos_sin = ref.rotary_cos_sin(2048, head_dim // 4, 10000.0)
    qn = (1 + 0.1 * torch.randn(hq, head_dim, generator=g)).to(dtype) if qk_norm else None
    kn = (1 + 0.1 * torch.randn(hkv, head_dim, generator=g)).to(dtype) if qk_norm else None
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[::5] = -1  # padding rows: never written
    caches = [torch.full((num_blocks, block_size, hkv, head_dim), float("nan"), dtype=dtype) for _ in range(4)]
    dev = device(backend)
    kc, vc = caches[0].to(dev), caches[1].to(dev)
    q = op(backend, "qk_norm_rope_cache")(qkv.to(dev), positions.to(dev), cos_sin.to(dev),
                                          None if qn is None else qn.to(dev), None if kn is None else kn.to(dev),
                                          1e-5, kc, vc, slots.to(dev), hq, hkv, head_dim)
    eq = ref.qk_norm_rope_cache(qkv, positions, cos_sin, qn, kn, 1e-5, caches[2], caches[3], slots, hq, hkv,
                                head_dim)
    close(q, eq, dtype)
    kc, vc = kc.cpu(), vc.cpu()
    assert torch.equal(kc.isnan(), caches[2].isnan()) and torch.equal(vc.isnan(), caches[3].isnan())
    close(kc.nan_to_num(), caches[2].nan_to_num(), dtype)
    torch.testing.assert_close(vc, caches[3], atol=0, rtol=0, equal_nan=True)  # v is copied, not computed


def test_opcheck():
    import stablelm_fast.ops.cpu_ops  # noqa: F401  (registers the ops' fake kernels)

    d, hq, hkv = 64, 4, 2
    kc, vc = torch.zeros(4, 4, hkv, d), torch.zeros(4, 4, hkv, d)
    cs = ref.rotary_cos_sin(16, d // 4, 10000.0)
    args = (torch.empty(3, hq, d), torch.randn(3, (hq + 2 * hkv) * d), torch.tensor([0, 5, 9]), cs,
            torch.randn(hq, d), torch.randn(hkv, d), 1e-5, kc, vc, torch.tensor([0, -1, 7]), hq, hkv, d)
    torch.library.opcheck(torch.ops.stablelm_fast.qk_norm_rope_cache.default, args)


@pytest.mark.parametrize("position", [-1, 16])
def test_cpu_refuses_positions_outside_cos_sin(position):
    """The C++ op checks every position against the cos_sin table (16 rows here) and names the bad one."""
    from stablelm_fast.ops import get_ops

    if get_ops("cpu").source["qk_norm_rope_cache"] != "cpu":
        pytest.skip("no C++ CPU op in this build")
    d, hq, hkv = 64, 2, 2
    kc, vc = torch.zeros(4, 4, hkv, d), torch.zeros(4, 4, hkv, d)
    cs = ref.rotary_cos_sin(16, d // 4, 10000.0)
    with pytest.raises(RuntimeError, match=f"positions out of the cos_sin range: {position}"):
        op("cpu", "qk_norm_rope_cache")(torch.randn(2, (hq + 2 * hkv) * d), torch.tensor([3, position]), cs, None,
                                        None, 1e-5, kc, vc, torch.tensor([0, 1]), hq, hkv, d)
