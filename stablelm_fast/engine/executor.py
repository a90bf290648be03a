"""The Executor protocol: what the engine needs from whatever runs the model (one process or tensor-parallel ranks).

ModelRunner (engine/model_runner.py) implements it in the engine's process; TPExecutor (distributed/executor.py)
implements it over tensor-parallel ranks. The engine talks to this interface only.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from stablelm_fast.engine.step_input import StepInput


@runtime_checkable
class Executor(Protocol):
    is_dead: bool  # True once it can never execute again (a rank died); the engine then fails every request

    def kv_bytes_per_block(self, block_size: int) -> int: ...

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None: ...

    def enable_cuda_graphs(self, max_batch: int, max_blocks_per_seq: int) -> None: ...

    def execute(self, step: StepInput) -> torch.Tensor | None:
        """Run one step on every rank; -> fp32 logits [S, vocab] for step.logits_indices (None if S == 0)."""

    def shutdown(self) -> None: ...


def make_executor(config, model_dir: str | None, load_format: str, dtype: torch.dtype, device: torch.device,
                  backend: str, tensor_parallel_size: int, seed: int, quantization: dict | None = None) -> Executor:
    """quantization: a QuantConfig as a dict (JSON: tensor-parallel workers receive it on their command line)."""
    if tensor_parallel_size > 1:
        from stablelm_fast.distributed.executor import TPExecutor
        return TPExecutor(config, model_dir, load_format, dtype, device, backend, tensor_parallel_size, seed,
                          quantization)
    from stablelm_fast.engine.model_runner import ModelRunner
    return ModelRunner(config, model_dir, load_format, dtype, device, backend, seed=seed, quantization=quantization)
