"""The op interface is declared once (ops/registry.py): every backend binds every op, from its own module or along
its fallback chain, and every C++ op has a fake kernel and a reference."""

import inspect

import pytest
import torch

from stablelm_fast.ops import BACKENDS, OPS, get_ops
from stablelm_fast.ops.registry import FALLBACK, backend_module


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_binds_every_op(backend):
    table = get_ops(backend)
    for name, op in OPS.items():
        impl = getattr(table, name)
        assert callable(impl), (backend, name)
        source = table.source[name]
        assert source in FALLBACK[backend] + ("reference",)
        if source != "reference":
            assert getattr(backend_module(source), name) is impl
        else:
            assert impl is op.reference
    # what a backend implements itself, it serves itself
    own = backend_module(backend)
    assert all(table.source[n] == backend for n in OPS if getattr(own, n, None) is not None)


def test_backends_serve_their_kernels():
    assert get_ops("cpu").source["paged_attention"] == "cpu"
    assert get_ops("cpu").source["pack_linear_weight"] == "cpu"
    assert get_ops("triton").source["qk_norm_rope_cache"] == "triton"
    assert get_ops("torch").source["linear"] == "reference"
    # no varlen CUDA kernel yet: the cuda backend's prefill attention is the Triton kernel
    assert get_ops("cuda").source["paged_attention"] == "triton"
    assert get_ops("cuda").source["paged_attention_decode"] == "cuda"


def test_references_take_the_declared_arguments():
    for name, op in OPS.items():
        params = list(inspect.signature(op.reference).parameters)
        if name == "quant_bits":  # the one query of a backend's capabilities: no tensors
            assert params == [] and set(op.reference()) == {8, 6, 4}
            continue
        assert params, name
        assert params[0] in ("x", "weight", "qweight", "gate_up", "qkv", "q"), (name, params)


def test_every_cpp_op_has_a_fake_kernel():
    import stablelm_fast.ops.cpu_ops  # noqa: F401  (registers the fake kernels)

    for name, op in OPS.items():
        if op.cpp:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stablelm_fast::{name}", "Meta"), name


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        get_ops("tpu")
