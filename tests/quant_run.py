"""What the quantization tests share: the built-in model, two prompts, and one engine run that returns each
prompt's greedy tokens and the prompt tokens' logprobs (compared between a quantized model and its dequantized copy)."""

from __future__ import annotations

import os
import shutil

import torch

from stablelm_fast import LLM, SamplingParams
from tests.checkpoints import update_json

BUILTIN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "stablelm_fast", "assets", "stablelm-pystdlib-4m")
PROMPTS = [{"prompt_token_ids": list(range(40, 71))}, {"prompt_token_ids": [7, 300, 21, 9, 1200, 5, 88, 17]}]
PARAMS = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1, ignore_eos=True)
KW = dict(dtype="float32", backend="torch", num_kv_blocks=32)


def run_engine(model_dir: str, **kw) -> tuple[list[list[int]], list[torch.Tensor]]:
    """-> (greedy tokens per prompt, logprobs of each prompt's tokens after the first)."""
    llm = LLM(model_dir, **KW, **kw)
    try:
        outs = llm.generate(PROMPTS, PARAMS)
    finally:
        llm.shutdown()
    lps = [torch.tensor([lp[t] for lp, t in zip(o.prompt_logprobs[1:], p["prompt_token_ids"][1:])])
           for o, p in zip(outs, PROMPTS)]
    return [o.outputs[0].token_ids for o in outs], lps


def assert_same_run(got: tuple, want: tuple) -> None:
    """Two run_engine results agree (a quantized model and its dequantized copy): the same greedy tokens, and the
    prompt logprobs within atol 2e-4 / rtol 1e-4."""
    (tokens, lps), (want_tokens, want_lps) = got, want
    assert tokens == want_tokens
    for a, b in zip(lps, want_lps):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def config_only_copy(out_dir: str, quant_config: dict) -> str:
    """The built-in model's config.json (with this quantization_config) and tokenizer, no weights: for refusals that
    come before any weight is read."""
    os.makedirs(out_dir, exist_ok=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(BUILTIN, f), out_dir)
    update_json(os.path.join(out_dir, "config.json"), quantization_config=quant_config)
    return out_dir
