import os

# Triton kernels run in the interpreter on CPU tensors when there is no GPU. Must be set before triton is imported.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from checkpoints import VARIANTS, make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, str]:
    """One transformers-written checkpoint per family (1.6B-like, 3B-like with legacy config, 12B-like)."""
    return {v: make_hf_checkpoint(str(tmp_path_factory.mktemp(v)), v, seed=i) for i, v in enumerate(VARIANTS)}


@pytest.fixture(scope="session")
def tiny_model(hf_checkpoints) -> str:
    return hf_checkpoints["stablelm-2-1_6b"]


@pytest.fixture
def one_thread():
    """Tiny models run tiny ops: one torch thread (two xdist workers on two shared cores otherwise spin-wait on each
    other's threads and such tests run ~10x slower)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# Files whose subject is the kernels' own multi-threaded work split: they keep torch's thread count.
_THREADED = ("tests/ops/", "test_cpu_linear.py", "test_cpu_ops.py")


@pytest.fixture(autouse=True)
def _one_thread_under_xdist(request):
    """Under `pytest -n 2` (two workers on a 2-core machine) every other test runs one torch thread: tiny models
    with two threads per worker oversubscribe the cores and spin-wait on each other (see one_thread)."""
    path = str(request.node.path)
    if not os.environ.get("PYTEST_XDIST_WORKER") or any(p in path for p in _THREADED):
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
