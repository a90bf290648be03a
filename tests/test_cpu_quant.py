"""The CPU int8 / int4 linear layers (ops/cpu_quant.py, csrc/cpu/quant_*.cpp): the packed layout, each kernel
against the reference to float precision (the int-activation kernels against the reference on x quantized as they
quantize it), the error bound the op tests use, opcheck, bad input; and each lower ISA in a subprocess
(test_other_paths)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from stablelm_fast.ops import cpu_linear, cpu_quant, cpu_ops
from stablelm_fast.ops import quant_reference as qref

ops = torch.ops.stablelm_fast
LAYOUT = cpu_quant.quant_layout()
ISA = cpu_linear.cpu_isa()
HERE = os.path.dirname(os.path.abspath(__file__))
# (bits, group_size, symmetric); group_size None: per channel (G = K)
MODES = [(8, None, True), (8, 32, True), (8, 12, True), (8, 48, True), (4, 32, True), (4, 64, False), (4, 128, True),
         (4, 16, False), (4, 24, True), (6, 32, True), (6, None, True), (6, 64, False)]


def _weights(n, k, bits, g, symmetric, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    g = k if g is None else g
    qw, s, z = qref.quantize_weight(w, bits, g, symmetric)
    return qw, s, z, g


def _unpack(pq: torch.Tensor) -> torch.Tensor:
    """One packed matrix [N, R, C] -> per-feature rows [N, R, C] (the inverse of the panel order)."""
    n, r, c = pq.shape
    flat, out, off = pq.reshape(-1), [], 0
    for p0 in range(0, n, 16):
        width = min(16, n - p0)
        out.append(flat[off:off + r * width * c].view(r, width, c).permute(1, 0, 2))
        off += r * width * c
    return torch.cat(out)


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("n", [16, 37])
def test_packed_layout(bits, n):
    k, g = 64, 32
    qw, s, z = qref.quantize_weight(torch.randn(n, k), bits, g, symmetric=bits != 4)
    pq, ps, pz = cpu_quant.pack_quant_weight(qw, s, z, bits, g)
    quads = _unpack(pq)
    if bits == 8:
        assert pq.dtype == (torch.uint8 if LAYOUT == "vnni" else torch.int8)
        got = (quads.to(torch.int16) - (128 if LAYOUT == "vnni" else 0)).view(n, k)
        assert torch.equal(got.to(torch.int8), qw)
    elif bits == 6:  # per 16 k: rows 3c, 3c + 1 low nibbles as int4 (k 0-7, 8-15), row 3c + 2 the top two bits
        rows = quads.view(n, k // 16, 3, 4).to(torch.int16)
        lo = torch.stack([rows[:, :, 0] & 15, rows[:, :, 0] >> 4, rows[:, :, 1] & 15, rows[:, :, 1] >> 4], dim=2)
        hi = torch.stack([(rows[:, :, 2] >> (2 * j)) & 3 for j in range(4)], dim=2)
        assert pq.shape == (n, 3 * k // 16, 4) and pq.dtype == torch.uint8
        assert torch.equal((lo + 16 * hi).reshape(n, k), qw.to(torch.int16))
    else:  # byte i of row r: k = 8r + i low nibble, 8r + 4 + i high nibble
        u = torch.stack([quads & 15, quads >> 4], dim=2).reshape(n, k)
        assert torch.equal(u, qref.unpack_int4(qw))
    assert ps.dtype == torch.float16 and torch.equal(_unpack(ps.view(n, -1, 1).contiguous()).reshape(n, -1).float(), s)
    if pz is not None:
        assert torch.equal(_unpack(pz.view(n, -1, 1).contiguous()).reshape(n, -1), z)


def _quantized_x(x: torch.Tensor, g: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x as the int-activation kernels see it (int8 per block of act_block(g, bits), scale max|x| / 127, fp32 math), and
    the weight each element of x may carry in the error: its scale where x / scale is within 1e-4 of a rounding
    tie (the kernel's fp32 1 / scale can land on the other side of it), else 0."""
    m, k = x.shape
    b = cpu_quant.act_block(g, bits)
    xb = x.float().view(m, k // b, b)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    v = xb * inv
    tie = ((v - v.floor()) - 0.5).abs() < 1e-4
    sx = (amax / 127).expand_as(xb)
    return (torch.round(v) * (amax / 127)).view(m, k), torch.where(tie, sx, torch.zeros_like(sx)).view(m, k)


@pytest.mark.parametrize("bits,group_size,symmetric", MODES)
@pytest.mark.parametrize("m", [1, 3, 7, 83])
@pytest.mark.parametrize("n", [40, 64, 600])
def test_int_kernels_exact_on_quantized_x(bits, group_size, symmetric, m, n):
    """fp32 x takes the int-activation kernels (vnni / avx2) at every M: equal to the reference run on x quantized
    the same way, to fp32 accumulation-order precision."""
    if LAYOUT == "scalar":
        pytest.skip("the scalar kernel does not quantize x (test_scalar_and_dequant_kernels_exact covers it)")
    if os.environ.get("STABLELM_FAST_QGEMM", "auto") not in ("auto", "int") and bits != 6:
        pytest.skip("a forced dequantizing kernel: covered by test_scalar_and_dequant_kernels_exact")
    k = 384
    qw, s, z, g = _weights(n, k, bits, group_size, symmetric, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1000 + m))
    b = torch.randn(n)
    packed = cpu_quant.pack_quant_weight(qw, s, z, bits, g)
    got = cpu_quant.quant_linear(x, *packed, b, bits, g)
    xq, tie = _quantized_x(x, g, bits)
    expected = qref.quant_linear(xq, qw, s, z, b, bits, g)
    w = qref.dequantize_weight(qw, s, z, bits, g)
    allowed = 2e-5 * (1 + expected.abs()) + tie @ w.abs().t()
    assert ((got - expected).abs() <= allowed).all(), (got - expected).abs().max()


@pytest.mark.parametrize("bits,group_size,symmetric", MODES)
def test_decode_streams_agree_with_the_batched_kernel(bits, group_size, symmetric):
    """One token (decode) takes the four-stream kernels (micro_vnni4 / micro_avx2_4), each stream reading a run of
    consecutive panels (quant_linear.cpp: ~64 KB of W); two tokens the per-panel kernel on such runs; nine tokens
    single-panel units. Same int32 sums per block, so the rows agree to fp32 rounding: linear with 38 panels (runs
    of 8, then one of 1, then single panels) and gate_up with 21 panels a half (a tail of 5)."""
    if LAYOUT == "scalar":
        pytest.skip("the scalar kernel has no decode streams")
    k = 384  # (as above: every group size of MODES divides it)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(5))
    for n, halves in ((600, False), (2 * 325, True)):
        qw, s, z, g = _weights(n, k, bits, group_size, symmetric, seed=n)
        packed = cpu_quant.pack_quant_weight(qw, s, z, bits, g, halves=halves)
        if halves:
            one, two, many = (cpu_quant.quant_gate_up_silu(x.repeat(m, 1), *packed, bits, g) for m in (1, 2, 9))
        else:
            one, two, many = (cpu_quant.quant_linear(x.repeat(m, 1), *packed, None, bits, g) for m in (1, 2, 9))
        assert one.shape == (1, n // 2 if halves else n)
        # 2 tokens: runs of consecutive panels per unit too (and the L2 prefetch); 9: single-panel units
        assert torch.allclose(one[0], many[0], rtol=1e-5, atol=1e-6) and torch.equal(two[0], two[1])
        assert torch.allclose(two[0], many[0], rtol=1e-5, atol=1e-6) and torch.equal(many[0], many[8])


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 32, False), (6, 32, True)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 9])
def test_bf16_output_is_the_fp32_output_rounded(bits, group_size, symmetric, m):
    """bf16 x and fp32 x holding the same values take the same int kernels (x is converted to fp32, then quantized);
    only the epilogue differs (AVX-512 for bf16 on vnni machines, quant_gemm.h's emit otherwise): the bf16 output is
    the fp32 one rounded to bf16, with the bias (bf16 values) added in fp32; through gate_up's silu (a polynomial exp
    there, std::exp here) within one bf16 step. n = 37: a tail panel of 5 features."""
    if LAYOUT == "scalar":
        pytest.skip("the scalar kernel does not quantize x")
    if os.environ.get("STABLELM_FAST_QGEMM", "auto") not in ("auto", "int"):
        pytest.skip("a forced dequantizing kernel for bf16 x")
    if ISA == "amx" and os.environ.get("STABLELM_FAST_AMX") != "0" and m > 4:
        pytest.skip("bf16 x takes dequantized bf16 blocks and AMX tiles here (test_op_quant_linear checks that path)")
    n, k = 37, 128
    qw, s, z, g = _weights(n, k, bits, group_size, symmetric, seed=7 * m)
    packed = cpu_quant.pack_quant_weight(qw, s, z, bits, g)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    b = torch.randn(n, generator=torch.Generator().manual_seed(99)).to(torch.bfloat16)
    got = cpu_quant.quant_linear(x, *packed, b, bits, g)
    assert torch.equal(got, cpu_quant.quant_linear(x.float(), *packed, b.float(), bits, g).to(torch.bfloat16))
    gpq, gps, gpz = cpu_quant.pack_quant_weight(*_weights(2 * n + 2, k, bits, group_size, symmetric, seed=m)[:3],
                                                bits, g, halves=True)
    got = cpu_quant.quant_gate_up_silu(x, gpq, gps, gpz, bits, g).float()
    want = cpu_quant.quant_gate_up_silu(x.float(), gpq, gps, gpz, bits, g)
    assert ((got - want).abs() <= 2 ** -7 * want.abs() + 1e-6).all()  # a bf16 step: 2^-8 to 2^-7 of |value|


@pytest.mark.parametrize("bits,group_size,symmetric", MODES)
@pytest.mark.parametrize("m", [1, 5, 70])
def test_scalar_and_dequant_kernels_exact(bits, group_size, symmetric, m, monkeypatch):
    """The kernels that do not quantize x (scalar; fp32 and bf16 dequantization on AVX512) against the reference:
    fp32 to accumulation-order precision; bf16 within its roundings (each weight to bf16: 2^-9 |x| |w| per term;
    the output: 2^-8 |y|)."""
    if bits == 6 and LAYOUT == "vnni":
        pytest.skip("int6 has no dequantizing AVX-512 kernel: the int-activation one runs whatever "
                    "STABLELM_FAST_QGEMM says (test_int_kernels_exact_on_quantized_x)")
    if LAYOUT == "vnni":
        kernels = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
    elif LAYOUT == "scalar":
        kernels = [("auto", torch.float32)]
    else:
        pytest.skip("AVX2 runs the int-activation kernel only (test_int_kernels_exact_on_quantized_x)")
    k, n = 384, 37
    qw, s, z, g = _weights(n, k, bits, group_size, symmetric, seed=m)
    qg, sg, zg, _ = _weights(2 * n, k, bits, group_size, symmetric, seed=m + 1)
    packed = cpu_quant.pack_quant_weight(qw, s, z, bits, g)
    gu = cpu_quant.pack_quant_weight(qg, sg, zg, bits, g, halves=True)
    w = qref.dequantize_weight(qw, s, z, bits, g)

    def check(got, expected, xw_abs, dtype):
        if dtype == torch.float32:
            allowed = 2e-5 * (1 + expected.abs())
        else:
            allowed = 2**-9 * xw_abs + 2**-8 * expected.abs() + 1e-5
        assert ((got.float() - expected).abs() <= allowed).all(), (got.float() - expected).abs().max()

    for kernel, dtype in kernels:
        monkeypatch.setenv("STABLELM_FAST_QGEMM", kernel)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(1000 + m)).to(dtype)
        check(cpu_quant.quant_linear(x, *packed, None, bits, g), qref.quant_linear(x.float(), qw, s, z, None, bits, g),
              x.float().abs() @ w.abs().t(), dtype)
        if dtype == torch.float32:  # gate_up's own epilogue (silu(gate) * up): fp32 only, the bf16 bound is above
            torch.testing.assert_close(cpu_quant.quant_gate_up_silu(x, *gu, bits, g),
                                       qref.quant_gate_up_silu(x, qg, sg, zg, bits, g), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (8, 128)])
def test_activation_error_bound_holds_and_is_not_vacuous(bits, group_size):
    """The bound the op tests add for the cpu backend holds for x quantized as the kernels do, and is within 10x of
    the largest error seen (so it does not hide a wrong result of the size of y)."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    qw, s, z, g = _weights(48, 256, bits, group_size, True)
    w = qref.dequantize_weight(qw, s, z, bits, g)
    err = (_quantized_x(x, g, bits)[0] @ w.t() - x @ w.t()).abs()
    bound = cpu_quant.activation_error_bound(x, w, g, bits)
    assert (err <= bound + 1e-6).all()
    assert bound.max() < 10 * err.max() and bound.max() < 0.1 * (x @ w.t()).abs().max()


def test_cpu_ops_exports_the_quant_ops():
    assert cpu_ops.quant_linear is cpu_quant.quant_linear
    assert cpu_ops.pack_quant_weight is cpu_quant.pack_quant_weight
    assert cpu_ops.quant_gate_up_silu is cpu_quant.quant_gate_up_silu


def test_unpackable_weights_stay_canonical_and_run_the_reference():
    qw, s, z = qref.quantize_weight(torch.randn(8, 24), 4, 12)  # int4 group 12: not a multiple of 8
    packed = cpu_quant.pack_quant_weight(qw, s, z, 4, 12)
    assert packed[0] is qw
    x = torch.randn(2, 24)
    torch.testing.assert_close(cpu_quant.quant_linear(x, *packed, None, 4, 12),
                               qref.quant_linear(x, qw, s, z, None, 4, 12))


def test_bad_inputs_are_rejected():
    qw, s, z = qref.quantize_weight(torch.randn(32, 64), 4, 32)
    packed = cpu_quant.pack_quant_weight(qw, s, z, 4, 32)
    with pytest.raises(ValueError, match="K = 64"):
        cpu_quant.quant_linear(torch.randn(3, 62), *packed, None, 4, 32)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        cpu_quant.quant_linear(torch.randn(3, 64).double(), *packed, None, 4, 32)
    with pytest.raises(ValueError, match="group_size"):
        cpu_quant.pack_quant_weight(qw, s, z, 4, 48)
    with pytest.raises(ValueError, match="even number of rows"):
        cpu_quant.pack_quant_weight(qw[:31], s[:31], None, 4, 32, halves=True)
    with pytest.raises(RuntimeError, match="scales must be"):
        ops.cpu_quant_linear(torch.empty(3, 32), torch.randn(3, 64), packed[0], s[:, :1].contiguous(), None, None,
                             4, 32, False)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.cpu_quant_linear(torch.empty(3, 32), torch.randn(3, 64), *packed, torch.randn(31), 4, 32, False)


def test_opcheck():
    for bits, g, symmetric in [(8, 64, True), (4, 32, False)]:
        qw, s, z, g = _weights(24, 64, bits, g, symmetric)
        pq, ps, pz = cpu_quant.pack_quant_weight(qw, s, z, bits, g)
        x = torch.randn(3, 64)
        torch.library.opcheck(ops.cpu_quant_linear.default,
                              (torch.empty(3, 24), x, pq, ps, pz, torch.randn(24), bits, g, False))
        torch.library.opcheck(ops.cpu_quant_linear.default,
                              (torch.empty(3, 12), x, pq, ps, pz, None, bits, g, True))


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_other_paths(isa):
    """Re-runs this file in a subprocess with a lower ISA (STABLELM_FAST_ISA: the avx2 layout and kernel, the scalar
    one). The AVX-512 kernels auto does not pick run in-process above, through STABLELM_FAST_QGEMM; the AMX tiles
    (bf16 x above 4 tokens on AMX machines) in tests/ops/test_op_quant_linear.py."""
    if os.environ.get("STABLELM_FAST_ISA"):
        pytest.skip("already in a subprocess with a forced ISA")
    order = ["scalar", "avx2", "avx512bf16", "amx"]
    if order.index(isa) >= order.index(ISA):
        pytest.skip(f"{isa} is not below this process's ISA ({ISA}): the tests above ran it")
    env = dict(os.environ, STABLELM_FAST_ISA=isa)
    env.pop("STABLELM_FAST_QGEMM", None)
    # NOTE: under a lower ISA the op test's cpu cases are re-run by tests/ops/test_op_lower_isas.py (on main).
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
           "-k", "cpu and not other_paths"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(HERE))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout


def test_quantizer_scales_are_fp16_values_and_packing_keeps_them():
    """The quantizer rounds scales to fp16 values before rounding weights against them (quant_reference.fp16_grid),
    so the CPU layout's fp16 scales hold them exactly; extreme scales stay positive and finite."""
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(5))
    w[0] *= 1e-9  # scales below fp16's smallest subnormal
    w[1] *= 1e6  # scales above fp16's largest value
    for bits, g, sym in [(4, 128, False), (4, 32, True), (6, 128, True), (8, 256, True)]:
        qw, s, z = qref.quantize_weight(w, bits, g, sym)
        assert torch.equal(s.half().float(), s) and (s > 0).all() and torch.isfinite(s).all()
        _, ps, _ = cpu_quant.pack_quant_weight(qw, s, z, bits, g)
        assert torch.equal(ps.float().flatten().sort().values, s.flatten().sort().values)
    # rows of ordinary magnitude still quantize to within half a step (the rounded scale is the one used)
    qw, s, z = qref.quantize_weight(w[2:], 4, 32, True)
    deq = qref.dequantize_weight(qw, s, z, 4, 32)
    assert ((deq - w[2:]).abs() <= s.repeat_interleave(32, dim=1) / 2 + 1e-7).all()
