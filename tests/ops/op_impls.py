"""What the per-op tests share: every implementation of an op this machine can run, tolerances, and a paged KV cache
filled with NaN outside what each sequence owns (so any out-of-range read shows in the output)."""

from __future__ import annotations

import pytest
import torch

from stablelm_fast.ops import BACKENDS, get_ops

# Token counts every op is checked at: one, odd small, odd medium, and over a thousand.
TOKEN_COUNTS = [1, 7, 83, 1031]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def implementations(name: str) -> list:
    """pytest params: each backend that implements `name` itself (the reference 'torch' always, first)."""
    params = [pytest.param("torch", id="torch")]
    for backend in BACKENDS[1:]:
        if backend == "cuda" and not torch.cuda.is_available():
            continue
        if get_ops(backend).source[name] == backend:
            params.append(pytest.param(backend, id=backend))
    return params


def op(backend: str, name: str):
    return getattr(get_ops(backend), name)


def device(backend: str) -> torch.device:
    """Where a backend's tensors live: CUDA for cuda (and triton when a GPU is present), else CPU."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def interpreted(backend: str) -> bool:
    """Triton kernels on a machine without a GPU run in the (slow) interpreter."""
    return backend == "triton" and not torch.cuda.is_available()


def skip_unsupported(backend: str, dtype: torch.dtype, tokens: int = 0, max_interpreted_tokens: int = 100) -> None:
    if backend == "torch" and tokens > 7:
        pytest.skip("the reference against itself: run at small sizes only")
    if interpreted(backend) and tokens > max_interpreted_tokens:
        pytest.skip(f"{tokens} tokens in the Triton interpreter is too slow here; `make gpu-check` runs it compiled")
    if backend == "triton" and dtype == torch.float16 and not torch.cuda.is_available():
        pytest.skip("fp16 Triton kernels are exercised compiled on a GPU (`make gpu-check`)")


def tol(dtype: torch.dtype, fp32: float = 1e-4) -> dict:
    if dtype == torch.float32:
        return dict(atol=fp32, rtol=fp32)
    if dtype == torch.float16:
        return dict(atol=4e-3, rtol=4e-3)
    return dict(atol=3e-2, rtol=3e-2)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, fp32: float = 1e-4) -> None:
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), **tol(dtype, fp32))


def paged_kv(ctx_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
             g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NaN caches; each sequence's first ctx tokens written through a random block table; unused table entries point
    at block 0, which nobody owns."""
    blocks = [max(1, -(-c // block_size)) for c in ctx_lens]
    num_blocks = sum(blocks) + 2
    free = (1 + torch.randperm(num_blocks - 1, generator=g)).tolist()
    k = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v = torch.full_like(k, float("nan"))
    tables = torch.zeros(len(ctx_lens), max(blocks) + 1, dtype=torch.int32)
    for b, (ctx, nb) in enumerate(zip(ctx_lens, blocks)):
        ids = [free.pop() for _ in range(nb)]
        tables[b, :nb] = torch.tensor(ids, dtype=torch.int32)
        pos = torch.arange(ctx)
        rows, offs = torch.tensor(ids)[pos // block_size], pos % block_size
        k[rows, offs] = torch.randn(ctx, num_kv_heads, head_dim, generator=g).to(dtype)
        v[rows, offs] = torch.randn(ctx, num_kv_heads, head_dim, generator=g).to(dtype)
    return k, v, tables
