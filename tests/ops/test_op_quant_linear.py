"""quant_linear / quant_gate_up_silu (weight-only int8, int6 and int4) and the load-time pack_quant_weight: every
implementation against the dequantize-then-fp32 reference (ops/quant_reference.py), and the reference quantizer's
round trip."""

import math

import pytest
import torch

from op_impls import DTYPES, TOKEN_COUNTS, close, device, implementations, op, skip_unsupported, tol
from stablelm_fast.ops import quant_reference as qref

# (K, N, group_size): per-channel int8 is group_size = K
SHAPES = [(64, 48, 32), (256, 40, 64), (384, 96, 128)]
MODES = [(8, None, True), (4, None, True), (4, None, False)]  # (bits, group_size override, symmetric)


def _inputs(tokens, k, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    b = torch.randn(n, generator=g).to(dtype)
    return x, w, b


def _check(backend, got, expected, dtype, x, qw, s, z, bits, g, gate_up=False):
    """close() to the reference; the cpu backend quantizes x to int8 per block of k in its decode kernels (as
    llama.cpp does; cpu_quant.act_block), which moves each GEMM output by at most cpu_quant.activation_error_bound
    (half a quantization step of x per element, times |W|; through silu(gate) * up: |silu'| <= 1.1). That bound is
    added to the tolerance; tests/test_cpu_quant.py checks those kernels to float precision on x quantized the same
    way, and that the bound is within 10x of the errors seen."""
    if backend != "cpu":
        return close(got, expected, dtype, fp32=2e-4)
    from stablelm_fast.ops.cpu_quant import activation_error_bound

    w = qref.dequantize_weight(qw, s, z, bits, g)
    bound = activation_error_bound(x.float(), w, g, bits)
    if gate_up:
        y = x.float() @ w.t()
        (gate, up), (bg, bu) = y.chunk(2, dim=-1), bound.chunk(2, dim=-1)
        bound = 1.1 * bg * (up.abs() + bu) + torch.nn.functional.silu(gate).abs() * bu
    t = tol(dtype, 2e-4)
    allowed = t["atol"] + t["rtol"] * expected.abs() + bound
    err = (got.float().cpu() - expected.float()).abs()
    assert (err <= allowed).all(), f"max excess {(err - allowed).max()}"


def _quantized(w, bits, group_size, symmetric):
    g = w.shape[1] if bits == 8 and group_size is None else group_size
    return (*qref.quantize_weight(w, bits, g, symmetric), g)


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (8, 32, True), (6, 32, True),
                                                       (6, 64, False), (4, 32, True), (4, 32, False), (4, 128, False)])
def test_quantizer_round_trip(bits, group_size, symmetric):
    _, w, _ = _inputs(1, 256, 64, torch.float32, seed=1)
    qw, s, z, g = _quantized(w, bits, group_size, symmetric)
    deq = qref.dequantize_weight(qw, s, z, bits, g)
    # round to nearest: |error| <= scale / 2 for every element (asymmetric: the zero point rounds too, one more half)
    bound = s.repeat_interleave(g, dim=1) * (0.5 if symmetric else 1.0) + 1e-7
    assert (deq - w).abs().le(bound).all()
    assert qw.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert qw.shape == (64, 128 if bits == 4 else 256)
    if bits == 6:
        assert int(qw.max()) <= 63


def test_int4_nibble_order():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert qref.pack_int4(q).tolist() == [[1 | 2 << 4, 15]]
    assert torch.equal(qref.unpack_int4(qref.pack_int4(q)), q)


def test_bad_arguments_are_named():
    w = torch.randn(8, 48)
    with pytest.raises(ValueError, match="group_size"):
        qref.quantize_weight(w, 4, 32)
    with pytest.raises(ValueError, match="bits"):
        qref.quantize_weight(w, 3, 16)
    with pytest.raises(ValueError, match="asymmetric int8"):
        qref.quantize_weight(w, 8, 48, symmetric=False)


@pytest.mark.parametrize("backend", implementations("quant_linear"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("k,n,group_size", SHAPES)
@pytest.mark.parametrize("bits,symmetric", [(8, True), (6, True), (4, True), (4, False)])
def test_quant_linear(backend, dtype, tokens, k, n, group_size, bits, symmetric):
    skip_unsupported(backend, dtype, tokens)
    if bits not in op(backend, "quant_bits")():
        pytest.skip(f"{backend} has no int{bits} kernel (its lm_head stays int8: tests/test_quantization.py)")
    x, w, b = _inputs(tokens, k, n, dtype, seed=k + n + tokens + bits)
    qw, s, z, g = _quantized(w, bits, None if bits == 8 and group_size == 128 else group_size, symmetric)
    expected = qref.quant_linear(x.float(), qw, s, z, b.float(), bits, g)
    dev = device(backend)
    packed = op(backend, "pack_quant_weight")(qw.to(dev), s.to(dev), None if z is None else z.to(dev), bits, g)
    got = op(backend, "quant_linear")(x.to(dev), *packed, b.to(dev), bits, g)
    assert got.shape == (tokens, n) and got.dtype == dtype
    _check(backend, got, expected, dtype, x, qw, s, z, bits, g)


@pytest.mark.parametrize("backend", implementations("quant_gate_up_silu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 83])
@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, False)])
def test_quant_gate_up_silu(backend, dtype, tokens, bits, symmetric):
    skip_unsupported(backend, dtype, tokens)
    x, w, _ = _inputs(tokens, 128, 96, dtype, seed=tokens + bits)
    qw, s, z, g = _quantized(w, bits, 64, symmetric)
    expected = qref.quant_gate_up_silu(x.float(), qw, s, z, bits, g)
    dev = device(backend)
    packed = op(backend, "pack_quant_weight")(qw.to(dev), s.to(dev), None if z is None else z.to(dev), bits, g,
                                              halves=True)
    got = op(backend, "quant_gate_up_silu")(x.to(dev), *packed, bits, g)
    assert got.shape == (tokens, 48) and got.dtype == dtype
    _check(backend, got, expected, dtype, x, qw, s, z, bits, g, gate_up=True)
