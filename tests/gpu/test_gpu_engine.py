"""The engine on a GPU against HF transformers on the same GPU: greedy tokens for the three model families (tiny
checkpoints written by transformers, tests/checkpoints.py), `cuda` and `triton` backends, fp32 and bf16, with and
without CUDA graphs, under prefix caching, chunked prefill and preemption.

fp32: the greedy tokens must equal HF's. bf16: two correct bf16 implementations may round differently and then
pick different tokens where two logits are nearly tied, so each of our tokens is checked against HF's logits on our
own sequence (teacher forcing): it must be HF's argmax or within BF16_TIE of it.
Run by `make gpu-check`; on a CPU-only machine every test skips with the reason.
"""

from __future__ import annotations

import os

import pytest
import torch

from checkpoints import VARIANTS, load_hf

# STABLELM_FAST_TEST_DEVICE=cpu (with TRITON_INTERPRET=1) dry-runs the eager triton half of these tests on CPU.
DEV = os.environ.get("STABLELM_FAST_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: run `make gpu-check` on a GPU machine")

MAX_TOKENS = 12
BF16_TIE = 0.05  # logit units; the tiny models' logits are O(1)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(6, vocab, (40,), generator=g).tolist()  # a 40-token common prefix: prefix-cache hits
    tails = [torch.randint(6, vocab, (n,), generator=g).tolist() for n in (9, 1, 25, 70)]
    odd = [torch.randint(6, vocab, (n,), generator=g).tolist() for n in (3, 57, 1)]
    return [shared + t for t in tails] + odd


_HF: dict = {}


def _hf(model_dir: str, variant: str, dtype: torch.dtype):
    key = (model_dir, dtype)
    if key not in _HF:
        _HF[key] = load_hf(model_dir, variant, dtype).to(DEV)
    return _HF[key]


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_matches_hf(hf_checkpoints, variant, backend, dtype, graphs, monkeypatch):
    from stablelm_fast import LLM, SamplingParams
    from stablelm_fast.ops import extension_has_cuda

    if backend == "cuda" and (DEV != "cuda" or not extension_has_cuda()):
        pytest.skip("the extension was built without CUDA (nvcc missing at build time): cuda backend not testable")
    if graphs and DEV != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    monkeypatch.setenv("STABLELM_FAST_CUDA_GRAPHS", "1" if graphs else "0")
    model_dir = hf_checkpoints[variant]
    # A 16-token chunk budget (long prompts are chunked) and too few KV blocks for all seven sequences at once
    # (the newest get preempted and recomputed); the shared 40-token prefix hits the prefix cache.
    llm = LLM(model_dir, device=DEV, dtype=dtype, backend=backend, block_size=16, num_kv_blocks=14,
              max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, enable_prefix_caching=True)
    engine = llm.engine
    if graphs:
        assert engine.executor.graph_decoder is not None and engine.executor.graph_decoder.graphs, \
            "CUDA graphs were not captured"
    else:
        assert engine.executor.graph_decoder is None
    prompts = _prompts(engine.config.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0, "the small KV cache was meant to force preemption"
    assert engine.block_manager.num_hit_blocks > 0, "the shared prefix was meant to hit the prefix cache"
    tdtype = torch.float32 if dtype == "float32" else torch.bfloat16
    hf = _hf(model_dir, variant, tdtype)
    for p, out in zip(prompts, outs):
        ours = list(out.outputs[0].token_ids)
        assert len(ours) == MAX_TOKENS
        if tdtype == torch.float32:
            want = hf.generate(torch.tensor([p], device=DEV), max_new_tokens=MAX_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            assert ours == want, f"prompt of {len(p)} tokens"
        else:
            with torch.no_grad():
                logits = hf(torch.tensor([p + ours[:-1]], device=DEV)).logits[0, len(p) - 1:].float()
            gap = logits.max(dim=-1).values - logits[torch.arange(MAX_TOKENS, device=DEV), torch.tensor(ours, device=DEV)]
            assert (gap <= BF16_TIE).all(), f"prompt of {len(p)} tokens: steps {gap.tolist()} behind HF's argmax"
