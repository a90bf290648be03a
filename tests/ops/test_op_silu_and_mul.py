"""silu_and_mul: every implementation against the reference."""

import pytest
import torch

from op_impls import DTYPES, TOKEN_COUNTS, close, device, implementations, op, skip_unsupported
from stablelm_fast.ops import reference as ref


@pytest.mark.parametrize("backend", implementations("silu_and_mul"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("inter", [1, 1001])
def test_silu_and_mul(backend, dtype, tokens, inter):
    skip_unsupported(backend, dtype, tokens)
    g = torch.Generator().manual_seed(tokens + inter)
    gate_up = (torch.randn(tokens, 2 * inter, generator=g) * 3).to(dtype)
    close(op(backend, "silu_and_mul")(gate_up.to(device(backend))), ref.silu_and_mul(gate_up), dtype)


def test_opcheck():
    import stablelm_fast.ops.cpu_ops  # noqa: F401  (registers the ops' fake kernels)

    torch.library.opcheck(torch.ops.stablelm_fast.silu_and_mul.default, (torch.empty(3, 20), torch.randn(3, 40)))
