"""KV-cache footprint: the default size follows what is asked for (max_model_len x a few sequences, capped), the
cache's pages are committed only as sequences write them (resident memory after load does not include an
untouched cache: measured as VmRSS in a fresh process), and the engine says the size and capacity at load."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from stablelm_fast import LLM
from stablelm_fast.engine import kv_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# StableLM-2-1.6B, bf16, 16-token blocks: 2 x 24 layers x 16 x 32 heads x 64 x 2 bytes
BLOCK_1_6B = 2 * 24 * 16 * 32 * 64 * 2


def _blocks(monkeypatch, available: int, device=CPU, max_model_len=4096, max_num_seqs=256, gb=None) -> int:
    monkeypatch.setattr(kv_cache, "available_memory_bytes", lambda dev: available)
    monkeypatch.delenv("STABLELM_FAST_KV_FRACTION", raising=False)
    return kv_cache.default_num_blocks(BLOCK_1_6B, 16, max_model_len, max_num_seqs, device, gb)


def test_cpu_default_is_a_few_gib(monkeypatch):
    # plenty of RAM: DEFAULT_CPU_KV_GIB (committed as used), not 30% of the machine
    four_gib = int(kv_cache.DEFAULT_CPU_KV_GIB * GIB) // BLOCK_1_6B
    assert _blocks(monkeypatch, 64 * GIB) == four_gib
    assert _blocks(monkeypatch, 64 * GIB, max_model_len=1000, max_num_seqs=3) == 3 * 63  # ceil(1000 / 16) per seq
    assert _blocks(monkeypatch, 64 * GIB, max_num_seqs=1) == 4096 // 16  # never more than max_num_seqs need


def test_cpu_default_caps(monkeypatch):
    # a small box: 30% of the available RAM
    assert _blocks(monkeypatch, 2 * GIB) == int(2 * GIB * 0.3) // BLOCK_1_6B
    # long contexts: at most DEFAULT_CPU_KV_GIB
    assert _blocks(monkeypatch, 256 * GIB, max_model_len=32768) == int(kv_cache.DEFAULT_CPU_KV_GIB * GIB) // BLOCK_1_6B
    assert _blocks(monkeypatch, 1000) == 1  # never zero blocks


def test_explicit_budget_and_cuda_default(monkeypatch):
    # kv_cache_memory_gb: taken as asked (beyond the CPU default), capped by what max_num_seqs sequences need
    assert _blocks(monkeypatch, 64 * GIB, gb=6.0) == 6 * GIB // BLOCK_1_6B
    assert _blocks(monkeypatch, 64 * GIB, gb=6.0, max_num_seqs=1) == 4096 // 16
    with pytest.raises(ValueError, match="kv_cache_memory_gb"):
        _blocks(monkeypatch, 64 * GIB, gb=0.0)
    # CUDA: 90% of the free device memory, capped by max_num_seqs full-length sequences
    assert _blocks(monkeypatch, 10 * GIB, device=CUDA) == int(10 * GIB * 0.9) // BLOCK_1_6B
    assert _blocks(monkeypatch, 1000 * GIB, device=CUDA) == 256 * 4096 // 16


def test_load_logs_size_and_capacity(tiny_model, caplog):
    with caplog.at_level(logging.INFO, logger="stablelm_fast.engine"):
        llm = LLM(tiny_model, dtype="float32", backend="torch", max_model_len=128, block_size=8)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:")]
    assert len(lines) == 1, caplog.text
    blocks = llm.engine.block_manager.num_blocks
    assert blocks == 256 * 128 // 8  # the CPU default: what max_num_seqs (256) sequences of max_model_len need
    assert f"{blocks} blocks x 8 tokens = {blocks * 8} tokens (256.0 x max_model_len 128)" in lines[0]
    assert "committed as used" in lines[0]


_RSS_SCRIPT = r"""
import json, sys, torch
from stablelm_fast import LLM, SamplingParams

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

model, blocks = sys.argv[1], int(sys.argv[2])
llm = LLM(model, dtype="float32", backend="torch", num_kv_blocks=blocks, block_size=16)
torch.ones(1).add_(1)  # torch's lazy one-off allocations before the baseline
base = rss()
llm.generate([{"prompt_token_ids": list(range(10, 60))}], SamplingParams(max_tokens=8, temperature=0.0))
used = rss()
for k, v in llm.engine.executor.kv_caches:  # control: touch every page of the cache
    k.fill_(0.0)
    v.fill_(0.0)
print(json.dumps({"base": base, "used": used, "touched": rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_untouched_cache_is_not_resident(tiny_model):
    """A 512 MiB cache: after load and a short generation, resident memory holds only the pages written (a few
    blocks); touching the whole cache (the control) adds its full size, so the measurement sees the cache."""
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=1, block_size=16)
    per_block = llm.engine.executor.kv_bytes_per_block(16)
    del llm
    blocks = (512 << 20) // per_block
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, tiny_model, str(blocks)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    cache = blocks * per_block
    assert m["used"] - m["base"] < 64 << 20, m  # 58 tokens of K/V and the step's activations, not 512 MiB
    assert m["touched"] - m["used"] > 0.9 * cache, m
