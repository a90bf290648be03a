"""layernorm and add_layernorm: every implementation against the reference."""

import pytest
import torch

from op_impls import DTYPES, TOKEN_COUNTS, close, device, implementations, op, skip_unsupported
from stablelm_fast.ops import reference as ref


def _inputs(tokens, hidden, dtype, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=g) * 2 + 0.5).to(dtype)
    res = torch.randn(tokens, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    b = (0.1 * torch.randn(hidden, generator=g)).to(dtype)
    return [t.to(dev) for t in (x, res, w, b)]


@pytest.mark.parametrize("backend", implementations("layernorm"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("hidden,with_bias", [(80, True), (769, False)])
def test_layernorm(backend, dtype, tokens, hidden, with_bias):
    skip_unsupported(backend, dtype, tokens)
    x, _, w, b = _inputs(tokens, hidden, dtype, device(backend))
    b = b if with_bias else None
    close(op(backend, "layernorm")(x, w, b, 1e-5), ref.layernorm(x.cpu(), w.cpu(), None if b is None else b.cpu(),
                                                                  1e-5), dtype)


@pytest.mark.parametrize("backend", implementations("add_layernorm"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("hidden,with_residual", [(80, True), (769, False)])
def test_add_layernorm(backend, dtype, tokens, hidden, with_residual):
    skip_unsupported(backend, dtype, tokens)
    x, res, w, b = _inputs(tokens, hidden, dtype, device(backend), seed=1)
    res = res if with_residual else None
    out, new_res = op(backend, "add_layernorm")(x, res, w, b, 1e-5)
    ref_out, ref_res = ref.add_layernorm(x.cpu(), None if res is None else res.cpu(), w.cpu(), b.cpu(), 1e-5)
    # the sum is rounded to the activation dtype exactly as the reference does (1 ulp: interpreter rounding)
    close(new_res, ref_res, dtype, fp32=0)
    close(out, ref_out, dtype)


@pytest.mark.parametrize("name", ["layernorm", "add_layernorm"])
def test_opcheck(name):
    x, res, w, b = _inputs(5, 40, torch.float32, "cpu")
    args = {"layernorm": (torch.empty(5, 40), x, w, b, 1e-5),
            "add_layernorm": (torch.empty(5, 40), torch.empty(5, 40), x, res, w, None, 1e-5)}[name]
    import stablelm_fast.ops.cpu_ops  # noqa: F401  (registers the ops' fake kernels)

    torch.library.opcheck(getattr(torch.ops.stablelm_fast, name).default, args)
