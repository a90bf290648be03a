"""linear (and the load-time pack_linear_weight it reads): every implementation against the reference, on the
checkpoint layout and on each backend's packed layout."""

import math

import pytest
import torch

from op_impls import DTYPES, TOKEN_COUNTS, close, device, implementations, op, skip_unsupported
from stablelm_fast.ops import reference as ref

# (K, N): odd K and N (row-major paths), N a multiple of 16 (packed panels), K beyond one L2 block
SHAPES = [(67, 45), (300, 48), (4100, 32)]


def _inputs(tokens, k, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, w, b


@pytest.mark.parametrize("backend", implementations("linear"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(backend, dtype, tokens, k, n, with_bias):
    skip_unsupported(backend, dtype, tokens)
    if tokens * k * n > 2e8 and dtype != torch.float32 and backend == "torch":
        pytest.skip("torch's own half-precision CPU GEMM is slow at this size; the fp32 case covers it")
    x, w, b = _inputs(tokens, k, n, dtype, seed=k + n + tokens)
    b = b if with_bias else None
    expected = ref.linear(x.float(), w.float(), None if b is None else b.float())  # fp32 accumulation
    dev = device(backend)
    packed = op(backend, "pack_linear_weight")(w.to(dev))
    got = op(backend, "linear")(x.to(dev), packed, None if b is None else b.to(dev))
    assert got.shape == (tokens, n) and got.dtype == dtype
    close(got, expected, dtype, fp32=2e-4)


@pytest.mark.parametrize("backend", implementations("pack_linear_weight"))
def test_packing_is_invisible(backend):
    """The same weight, packed or not, gives the same output (bitwise: same kernel order per element is not
    required, so within fp32 rounding)."""
    x, w, b = _inputs(9, 64, 48, torch.float32, seed=5)
    dev = device(backend)
    packed = op(backend, "pack_linear_weight")(w.to(dev))
    torch.testing.assert_close(op(backend, "linear")(x.to(dev), packed, b.to(dev)).cpu(), ref.linear(x, w, b),
                               atol=1e-4, rtol=1e-4)


def test_opcheck():
    import stablelm_fast.ops.cpu_ops  # noqa: F401  (registers the ops' fake kernels)

    from stablelm_fast.ops.cpu_ops import pack_linear_weight

    x, w, b = _inputs(3, 40, 24, torch.float32, seed=0)
    torch.library.opcheck(torch.ops.stablelm_fast.linear.default, (torch.empty(3, 24), x, pack_linear_weight(w), b))
    torch.library.opcheck(torch.ops.stablelm_fast.pack_linear_weight.default, (torch.empty(32, 40, 1),
                                                                               torch.randn(32, 40), False))
