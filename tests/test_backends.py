"""The whole engine on every backend that runs here gives the greedy tokens of the torch reference backend."""

import pytest

from checkpoints import VARIANTS
from stablelm_fast import LLM, SamplingParams
from stablelm_fast.ops import extension_available

PROMPTS = [{"prompt_token_ids": [5, 17, 40, 99, 120, 7, 8]}, {"prompt_token_ids": [30, 41]},
           {"prompt_token_ids": list(range(20, 45))}]


def _greedy(model_dir, backend, **kw):
    llm = LLM(model_dir, dtype="float32", backend=backend, num_kv_blocks=64, block_size=8, **kw)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_backend_matches_torch(hf_checkpoints, variant):
    model_dir = hf_checkpoints[variant]
    # chunked prefill and prefix hits make the extend path of the prefill kernel run too
    assert _greedy(model_dir, "triton", max_num_batched_tokens=16) == _greedy(model_dir, "torch")


@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_backend_matches_torch(hf_checkpoints, variant):
    assert extension_available(), "the C++ extension must be built (make test builds it)"
    model_dir = hf_checkpoints[variant]
    assert _greedy(model_dir, "cpu", max_num_batched_tokens=16) == _greedy(model_dir, "torch")
