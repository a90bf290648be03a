"""gate_up_silu (the fused first half of the MLP): every implementation against the reference, on the checkpoint
layout and on each backend's packed layout (halves=True: gate and up stay apart)."""

import math

import pytest
import torch

from op_impls import DTYPES, TOKEN_COUNTS, close, device, implementations, op, skip_unsupported
from stablelm_fast.ops import reference as ref


@pytest.mark.parametrize("backend", implementations("gate_up_silu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("k,inter", [(67, 37), (300, 48)])
def test_gate_up_silu(backend, dtype, tokens, k, inter):
    skip_unsupported(backend, dtype, tokens)
    g = torch.Generator().manual_seed(tokens + k)
    x = torch.randn(tokens, k, generator=g).to(dtype)
    w = (torch.randn(2 * inter, k, generator=g) / math.sqrt(k)).to(dtype)
    dev = device(backend)
    packed = op(backend, "pack_linear_weight")(w.to(dev), halves=True)
    got = op(backend, "gate_up_silu")(x.to(dev), packed)
    assert got.shape == (tokens, inter) and got.dtype == dtype
    # the reference rounds gate and up to the activation dtype before silu * up, as the unfused model does
    close(got, ref.gate_up_silu(x, w) if dtype != torch.float16 else ref.gate_up_silu(x.float(), w.float()), dtype)


def test_opcheck():
    from stablelm_fast.ops.cpu_ops import pack_linear_weight  # (also registers the ops' fake kernels)

    torch.library.opcheck(torch.ops.stablelm_fast.gate_up_silu.default,
                          (torch.empty(3, 12), torch.randn(3, 40), pack_linear_weight(torch.randn(24, 40), halves=True)))
