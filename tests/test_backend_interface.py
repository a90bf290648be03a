"""Every backend module exposes the whole op interface; the cuda backend, given CPU tensors (no GPU here), falls
back to the reference and so must equal it exactly."""

import importlib

import pytest
import torch

from stablelm_fast.ops import BACKENDS, reference as ref

INTERFACE = ("linear", "gate_up_silu", "layernorm", "add_layernorm", "silu_and_mul", "qk_norm_rope_cache",
             "paged_attention", "paged_attention_decode")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_exposes_the_interface(backend):
    module = importlib.import_module(f"stablelm_fast.ops.{backend}_ops")
    missing = [name for name in INTERFACE if not callable(getattr(module, name, None))]
    assert not missing, f"{backend}_ops lacks {missing}"


def test_cuda_backend_falls_back_to_reference_on_cpu_tensors():
    from stablelm_fast.ops import cuda_ops

    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    assert torch.equal(cuda_ops.layernorm(x, w, b, 1e-5), ref.layernorm(x, w, b, 1e-5))
    for got, want in zip(cuda_ops.add_layernorm(x, res, w, b, 1e-5), ref.add_layernorm(x, res, w, b, 1e-5)):
        assert torch.equal(got, want)
    assert torch.equal(cuda_ops.silu_and_mul(x), ref.silu_and_mul(x))
    hq, hkv, d, bs = 4, 2, 64, 4
    qkv = torch.randn(6, (hq + 2 * hkv) * d, generator=g)
    cos_sin = ref.rotary_cos_sin(32, 16, 10000.0)
    caches = [torch.zeros(8, bs, hkv, d) for _ in range(4)]
    pos, slots = torch.arange(6), torch.arange(6)
    q1 = cuda_ops.qk_norm_rope_cache(qkv, pos, cos_sin, None, None, 1e-5, caches[0], caches[1], slots, hq, hkv, d)
    q2 = ref.qk_norm_rope_cache(qkv, pos, cos_sin, None, None, 1e-5, caches[2], caches[3], slots, hq, hkv, d)
    assert torch.equal(q1, q2) and torch.equal(caches[0], caches[2])
    tables = torch.tensor([[0, 1]], dtype=torch.int32)
    cu, lens = torch.tensor([0, 6], dtype=torch.int32), torch.tensor([6], dtype=torch.int32)
    assert torch.equal(cuda_ops.paged_attention(q1, caches[0], caches[1], tables, cu, lens, 0.125),
                       ref.paged_attention(q1, caches[0], caches[1], tables, cu, lens, 0.125))
    assert torch.equal(cuda_ops.paged_attention_decode(q1[-1:], caches[0], caches[1], tables, lens, 0.125),
                       ref.paged_attention_decode(q1[-1:], caches[0], caches[1], tables, lens, 0.125))
