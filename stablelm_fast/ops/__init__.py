"""Op backends. The interface is declared once, in registry.py (OPS: name, signature, torch reference); each
backend module implements what it can:

    "torch"  (ops/torch_ops.py: the references, torch's GEMM)      "cpu"  (ops/cpu_ops.py: the C++ extension, csrc/cpu)
    "triton" (ops/triton_ops.py: kernels/, torch GEMM)            "cuda" (ops/cuda_ops.py: csrc/cuda, then triton)

`get_ops(backend)` binds every op once (registry.OpTable) along the backend's fallback chain.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from stablelm_fast.ops.registry import BACKENDS, OPS, OpTable  # noqa: F401  (the public names of this package)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend for the device, and check that a named one can run there."""
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of 'auto', {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "cuda" if extension_has_cuda() else "triton"
        return "cpu" if extension_available() and importlib.util.find_spec("stablelm_fast.ops.cpu_ops") else "torch"
    if backend == "cpu" and not extension_available():
        raise ValueError("backend='cpu' needs the C++ extension stablelm_fast._C, which is not built")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError("backend='cpu' runs on device='cpu' only")
    if backend == "cuda" and (device.type != "cuda" or not extension_has_cuda()):
        raise ValueError("backend='cuda' needs a CUDA device and the extension built with CUDA")
    return backend


def extension_available() -> bool:
    try:
        importlib.import_module("stablelm_fast._C")
    except ImportError:
        return False
    return True


def extension_has_cuda() -> bool:
    return extension_available() and torch.cuda.is_available() and hasattr(torch.ops.stablelm_fast, "cuda_available")


def get_ops(backend: str) -> OpTable:
    """Every op of `backend` (already resolved by resolve_backend), bound once."""
    return OpTable(backend)
