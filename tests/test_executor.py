"""The engine talks to its executor through one protocol (engine/executor.py), whatever runs the model."""

from stablelm_fast import LLM
from stablelm_fast.engine.executor import Executor


def test_model_runner_is_an_executor(tiny_model):
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=8)
    assert isinstance(llm.engine.executor, Executor)
    assert llm.engine.executor.is_dead is False


def test_tp_executor_implements_the_protocol():
    from stablelm_fast.distributed.executor import TPExecutor

    for name in ("kv_bytes_per_block", "allocate_kv_cache", "enable_cuda_graphs", "execute", "shutdown"):
        assert callable(getattr(TPExecutor, name, None)), name
