"""quantize_weight (load-time round-to-nearest quantization into the canonical form): every implementation equal to
the torch reference (ops/quant_reference.py) bit for bit, for each width, symmetric and asymmetric, each input dtype,
groups and per channel, and weights with zero groups, ties and fp16-extreme scales."""

import pytest
import torch

from op_impls import implementations, op
from stablelm_fast.ops import quant_reference as qref

CASES = [(8, None, True), (8, 32, True), (6, 32, True), (6, 64, False), (4, 32, True), (4, 128, False),
         (4, 16, False), (4, None, True)]


def _weight(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0] = 0.0  # all-zero groups: scale 1
    w[1, : k // 2] = 1e-9  # a scale below fp16's smallest value
    w[2] *= 1e7  # scales above fp16's largest
    w[3] = torch.arange(k) % 15 - 7.0  # exact multiples of the scale, and halves: round half to even
    w[4] = w[4].abs()  # one-signed groups (asymmetric: the range widened to hold 0)
    w[5] = -w[5].abs()
    return w.to(dtype)


@pytest.mark.parametrize("backend", implementations("quantize_weight"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group_size,symmetric", CASES)
def test_quantize_weight_matches_reference(backend, dtype, bits, group_size, symmetric):
    n, k = 21, 256
    w = _weight(n, k, dtype)
    g = k if group_size is None else group_size
    got = op(backend, "quantize_weight")(w, bits, g, symmetric)
    want = qref.quantize_weight(w, bits, g, symmetric)
    for a, b, name in zip(got, want, ("qweight", "scales", "zeros")):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a, b), f"{name}: {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("backend", implementations("quantize_weight"))
def test_quantize_weight_refuses_bad_arguments(backend):
    f = op(backend, "quantize_weight")
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="group_size"):
        f(w, 4, 48, True)
    with pytest.raises(ValueError, match="bits"):
        f(w, 3, 32, True)
    with pytest.raises(ValueError, match="asymmetric int8"):
        f(w, 8, 32, False)
