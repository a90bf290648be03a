"""Tensor parallelism on CPU (gloo): TP=2/4 must reproduce TP=1 exactly (greedy tokens) and closely (logits), with
prefix caching and preemption, and a dead worker must turn into a clear error with no process left behind.

Spawning a rank costs seconds, so the LLMs are module-scoped and shared between tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from stablelm_fast import LLM, SamplingParams
from stablelm_fast.tiny import TINY_CONFIGS, build_tokenizer, hf_config, make_tiny_checkpoint, write_random_weights

pytestmark = pytest.mark.xdist_group("tp")

PROMPTS = ["The quick brown fox", "Hello, world! How are you today?", "A paged KV cache stores keys and values",
           "def generate(prompt):"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
# small blocks and a small cache: the same LLMs also exercise prefix caching and preemption
BLOCK_SIZE, NUM_BLOCKS = 4, 24


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Recorder:
    """Wraps an engine's executor.execute to keep every step's logits (the driver's fp32 [S, vocab])."""

    def __init__(self, llm: LLM) -> None:
        self.logits: list[torch.Tensor] = []
        executor = llm.engine.executor
        inner = executor.execute

        def execute(step):
            out = inner(step)
            if out is not None and out.shape[0]:
                self.logits.append(out.clone())
            return out

        executor.execute = execute


def _make_llm(path: str, tp: int) -> LLM:
    return LLM(path, dtype="float32", backend="torch", tensor_parallel_size=tp, num_kv_blocks=NUM_BLOCKS,
               block_size=BLOCK_SIZE, max_model_len=256)


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def pair(request, tmp_path_factory):
    """(TP=1 LLM, TP=2 LLM) for one tiny variant."""
    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp(request.param)), request.param, seed=1)
    llm1, llm2 = _make_llm(path, 1), _make_llm(path, 2)
    yield request.param, llm1, llm2
    pids = llm2.engine.executor.worker_pids()
    llm2.shutdown()
    llm2.shutdown()  # idempotent
    assert not any(_pid_exists(p) for p in pids)


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


def _compare(llm1: LLM, llm2: LLM, prompts, params) -> tuple[list, list]:
    rec1, rec2 = Recorder(llm1), Recorder(llm2)
    try:
        out1, out2 = llm1.generate(prompts, params), llm2.generate(prompts, params)
    finally:
        for llm in (llm1, llm2):
            del llm.engine.executor.execute  # back to the class's method
    assert _tokens(out2) == _tokens(out1)
    assert len(rec1.logits) == len(rec2.logits) > 0
    for a, b in zip(rec1.logits, rec2.logits):
        assert a.shape == b.shape and b.dtype == torch.float32
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    return out1, out2


def test_tp2_matches_tp1(pair):
    variant, llm1, llm2 = pair
    assert llm2.engine.executor.tp_size == 2
    if variant == "stablelm-2-12b":  # 4 q heads, 1 kv head: every rank keeps a replica of the kv head
        shard = llm2.engine.executor.runner.model.head_shard
        assert (shard.num_q, shard.num_kv, shard.kv_start) == (2, 1, 0)
    out1, _ = _compare(llm1, llm2, PROMPTS, GREEDY)
    assert all(len(t) == 8 for t in _tokens(out1))


def test_tp2_prefix_caching_and_preemption(pair):
    _, llm1, llm2 = pair
    shared = "A paged KV cache stores keys and values in fixed-size blocks. "
    prompts = [shared + tail for tail in ("Once upon a time", "Hello, world!", "Numbers: 0 1 2", "The quick")]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    before = llm2.engine.scheduler.num_preemptions
    _, out2 = _compare(llm1, llm2, prompts, params)  # ~4 x 11 blocks needed, 24 in the cache
    assert llm2.engine.scheduler.num_preemptions > before
    # the shared prefix is cached now: a second round reads it from the cache on every rank
    _, out2 = _compare(llm1, llm2, prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert all(o.num_cached_tokens > 0 for o in out2)


def test_tp4_replicated_kv_heads(tmp_path):
    """12B-like: 8 q heads / 2 kv heads on 4 ranks -> each kv head is held by two ranks; the vocabulary (322) does
    not split evenly, so the last rank's embedding / lm_head part is padded."""
    path = str(tmp_path)
    vocab = build_tokenizer(path, TINY_CONFIGS["stablelm-2-12b"]["chat_template"],
                            TINY_CONFIGS["stablelm-2-12b"]["eos_token"])
    config = hf_config("stablelm-2-12b", vocab + 2)
    config.update(hidden_size=256, intermediate_size=384, num_attention_heads=8, num_key_value_heads=2)
    write_random_weights(path, config, seed=3)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    llm1, llm4 = _make_llm(path, 1), _make_llm(path, 4)
    try:
        shard = llm4.engine.executor.runner.model.head_shard
        assert (shard.num_q, shard.num_kv) == (2, 1)
        _compare(llm1, llm4, PROMPTS[:3], GREEDY)
    finally:
        pids = llm4.engine.executor.worker_pids()
        llm4.shutdown()
    assert len(pids) == 3 and not any(_pid_exists(p) for p in pids)


def test_bad_tp_size_fails_before_spawning(tmp_path):
    path = make_tiny_checkpoint(str(tmp_path), "stablelm-2-1_6b")
    with pytest.raises(ValueError, match="must divide"):
        LLM(path, dtype="float32", backend="torch", tensor_parallel_size=3)


def test_killed_worker_raises_and_leaves_no_process(tmp_path):
    path = make_tiny_checkpoint(str(tmp_path), "stablelm-2-1_6b")
    llm = _make_llm(path, 2)
    executor = llm.engine.executor
    (pid,) = executor.worker_pids()
    inner = executor.execute
    state = {"steps": 0, "killed_at": None}

    def execute(step):
        state["steps"] += 1
        if state["steps"] == 3:  # mid-generation: the prompts are in, decoding has started
            os.kill(pid, signal.SIGKILL)
            state["killed_at"] = time.monotonic()
        return inner(step)

    executor.execute = execute
    try:
        with pytest.raises(RuntimeError, match=r"worker rank 1 .*SIGKILL"):
            llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        assert time.monotonic() - state["killed_at"] < 10
        assert executor.is_dead
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="dead"):
            llm.generate(PROMPTS[:1], GREEDY)
        assert time.monotonic() - start < 1
    finally:
        llm.shutdown()
    assert not _pid_exists(pid)
    assert not any(p.is_alive() for p in executor.monitor.procs)


def test_tp_from_a_script_without_main_guard(tmp_path):
    """Workers are fresh interpreters (python -m ...), not multiprocessing children re-importing the user's main
    module: a plain script with no `if __name__ == "__main__":` runs, and exits without calling shutdown()."""
    path = make_tiny_checkpoint(str(tmp_path / "ckpt"), "stablelm-2-1_6b", seed=1)
    script = tmp_path / "plain_script.py"
    script.write_text(textwrap.dedent(f"""
        from stablelm_fast import LLM, SamplingParams
        llm = LLM({path!r}, dtype="float32", backend="torch", tensor_parallel_size=2, num_kv_blocks={NUM_BLOCKS},
                  block_size={BLOCK_SIZE}, max_model_len=256)
        out = llm.generate({PROMPTS[:2]!r}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        print("TOKENS", [list(o.outputs[0].token_ids) for o in out])
    """))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("TOKENS ")]
    llm1 = _make_llm(path, 1)
    try:
        expected = _tokens(llm1.generate(PROMPTS[:2], GREEDY))
    finally:
        llm1.shutdown()
    assert json.loads(line[len("TOKENS "):]) == expected
