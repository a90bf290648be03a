"""SamplingParams.prompt_logprobs (vLLM's): each prompt token's logprob under the model, against HF transformers."""

import pytest
import torch

from checkpoints import load_hf
from stablelm_fast import LLM, SamplingParams

VARIANT = "stablelm-2-12b"


def _hf_prompt_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("chunk", [None, 8])
def test_prompt_logprobs_match_hf(hf_checkpoints, chunk):
    model_dir = hf_checkpoints[VARIANT]
    hf = load_hf(model_dir, VARIANT, torch.float32)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(6, 200, (n,), generator=g).tolist() for n in (21, 2, 9)]
    # chunk=8: prompts are prefilled over several steps (chunked prefill), rows of several chunks are stitched
    llm = LLM(model_dir, dtype="float32", backend="torch", num_kv_blocks=64, block_size=4,
              max_num_batched_tokens=chunk, max_model_len=64 if chunk else None)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    for run in range(2):  # the second run would hit the prefix cache: prompt logprobs must still be complete
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        for ids, out in zip(prompts, outs):
            lps = out.prompt_logprobs
            assert lps is not None and len(lps) == len(ids) and lps[0] is None
            assert all(ids[i] in lps[i] and len(lps[i]) <= 4 for i in range(1, len(ids))), run
            ours = torch.tensor([lps[i][ids[i]] for i in range(1, len(ids))])
            torch.testing.assert_close(ours, _hf_prompt_logprobs(hf, ids), atol=1e-4, rtol=1e-4)
            top = max(lps[1].values())  # the top-3 include the most likely token
            assert top == pytest.approx(float(_hf_top1(hf, ids)), abs=1e-4)


def _hf_top1(hf, ids: list[int]) -> float:
    with torch.no_grad():
        return hf(torch.tensor([ids[:1]])).logits[0, 0].float().log_softmax(-1).max()


def test_prompt_logprobs_off_by_default_and_validated(tiny_model):
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=32)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=1))
    assert out[0].prompt_logprobs is None
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
