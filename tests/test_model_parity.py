"""The model against HF transformers' StableLmForCausalLM on checkpoints written by transformers itself."""

import pytest
import torch

from checkpoints import VARIANTS, load_hf
from stablelm_fast import LLM, SamplingParams
from stablelm_fast.engine.model_runner import ModelRunner
from stablelm_fast.engine.step_input import prepare_step
from stablelm_fast.engine.scheduler import ScheduledBatch
from stablelm_fast.engine.sequence import Sequence

PROMPTS = [[5 + 3 * i for i in range(7)], [30, 40, 50], list(range(10, 60)), [7]]


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(6, vocab, (n,), generator=g).tolist() for n in (7, 3, 50, 1, 23)]


def _runner_logits(runner: ModelRunner, prompts: list[list[int]], block_size: int = 4) -> list[torch.Tensor]:
    """All-position logits of each prompt in ONE varlen step (every token's logits requested)."""
    runner.allocate_kv_cache(64, block_size)
    seqs = [Sequence(str(i), 0, p, SamplingParams(), None, 0.0) for i, p in enumerate(prompts)]
    next_block = 0
    for s in seqs:
        n = -(-len(s.token_ids) // block_size)
        s.block_table = list(range(next_block, next_block + n))[::-1]  # scrambled, not contiguous order
        next_block += n
    step = prepare_step(ScheduledBatch(seqs, [len(p) for p in prompts]), block_size)
    step.logits_indices = torch.arange(step.input_ids.numel())
    logits = runner.execute(step)
    return list(logits.split([len(p) for p in prompts]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_hf_fp32(hf_checkpoints, variant):
    model_dir = hf_checkpoints[variant]
    hf = load_hf(model_dir, variant, torch.float32)
    llm = LLM(model_dir, dtype="float32", backend="torch", num_kv_blocks=64)
    prompts = _prompts(llm.engine.config.vocab_size)
    ours = _runner_logits(llm.engine.executor, prompts)
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0].float()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_hf_fp32(hf_checkpoints, variant):
    model_dir = hf_checkpoints[variant]
    hf = load_hf(model_dir, variant, torch.float32)
    llm = LLM(model_dir, dtype="float32", backend="torch", num_kv_blocks=64)
    prompts = _prompts(llm.engine.config.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for p, out in zip(prompts, outs):
        want = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(p):].tolist()
        assert out.outputs[0].token_ids == want


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_hf_bf16(hf_checkpoints, variant):
    model_dir = hf_checkpoints[variant]
    hf = load_hf(model_dir, variant, torch.bfloat16)
    llm = LLM(model_dir, dtype="bfloat16", backend="torch", num_kv_blocks=64)
    assert llm.engine.executor.model.model.embed_tokens.weight.dtype == torch.bfloat16
    prompts = _prompts(llm.engine.config.vocab_size)
    ours = _runner_logits(llm.engine.executor, prompts)
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0].float()
        # bf16 keeps 8 bits of mantissa: compare against the logits' scale
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 0.05 * scale, (got - want).abs().max()
        # and the predicted tokens agree wherever HF's top-2 margin is not within bf16 noise
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.05 * scale
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
