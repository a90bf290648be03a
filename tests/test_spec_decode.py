"""Speculative decoding (n-gram prompt lookup): exact in greedy mode on every family and engine mode, a target
distribution kept by the rejection rule, reproducible seeds, and the same logprobs as without speculation."""

import pytest
import torch

from checkpoints import VARIANTS
from stablelm_fast import LLM, SamplingParams
from stablelm_fast.engine.spec_decode import SpeculativeConfig, ngram_propose, verify
from stablelm_fast.layers.sampler import Sampler, SamplingRow

pytestmark = pytest.mark.usefixtures("one_thread")

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def test_ngram_propose_takes_the_most_recent_longest_match():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], k=2, n_min=1, n_max=3) == [7, 8]
    assert ngram_propose([5, 1, 2, 6, 1, 2], k=4, n_min=2, n_max=2) == [6, 1, 2]
    assert ngram_propose([1, 2, 3, 4], k=3, n_min=1, n_max=3) == []  # no earlier occurrence
    assert ngram_propose([4, 4], k=3, n_min=1, n_max=1) == [4]


@pytest.mark.parametrize("raw,match", [
    ({"method": "eagle"}, "method"), ({"method": "draft_model"}, "needs 'model'"),
    ({"method": "ngram", "model": "x"}, "draft_model' only"), ({"model": "x", "prompt_lookup_max": 2}, "'ngram' only"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_max"), ({"lookahead": 2}, "unknown key"),
])
def test_bad_speculative_config_is_refused(raw, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.from_dict(raw)


def test_rejection_sampling_keeps_the_target_distribution():
    """The first emitted token of a verified step is distributed as the target p, whatever the draft."""
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0], [0.3, 0.1, 0.0, -1.0, 0.5]])
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    rows = [SamplingRow(params, [], [], gen, []) for _ in range(2)]
    p = logits[0].softmax(-1)
    for draft in (3, 2):  # the most and a less likely token
        n = 6000
        counts = torch.zeros(5)
        for _ in range(n):
            tokens, _ = verify(Sampler(), logits, rows, [draft])
            counts[tokens[0]] += 1
        freq = counts / n
        assert (freq - p).abs().max() < 0.025, (draft, freq, p)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_output_is_identical_with_ngram_speculation(hf_checkpoints, variant):
    model_dir = hf_checkpoints[variant]
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]}, {"prompt_token_ids": list(range(20, 45)) * 2},
               {"prompt_token_ids": [9, 10]}]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    # chunked prefill (16-token budget), prefix caching, a cache small enough to preempt, 16-token blocks
    kw = dict(dtype="float32", backend="torch", num_kv_blocks=12, block_size=8, max_num_batched_tokens=16)
    base = LLM(model_dir, **kw).generate(prompts, params)
    llm = LLM(model_dir, speculative_config=NGRAM, **kw)
    spec = llm.generate(prompts, params)
    for a, b in zip(base, spec):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):  # accepted tokens: the same logprobs
            assert la.keys() == lb.keys()
            torch.testing.assert_close(torch.tensor(list(lb.values())), torch.tensor(list(la.values())),
                                       atol=1e-4, rtol=1e-4)
    assert llm.engine.num_spec_accepted > 0, "the workload repeats itself: some drafts must be accepted"


def test_speculation_respects_stops_limits_and_n(tiny_model):
    kw = dict(dtype="float32", backend="torch", num_kv_blocks=64, max_model_len=40)
    prompts = [{"prompt_token_ids": [5, 6, 7, 5, 6, 7, 5, 6]}, {"prompt_token_ids": list(range(10, 30))}]
    params = [SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, n=2),
              SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)]  # up to max_model_len
    base = LLM(tiny_model, **kw).generate(prompts, params)
    spec = LLM(tiny_model, speculative_config=NGRAM, **kw).generate(prompts, params)
    for a, b in zip(base, spec):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [c.finish_reason for c in a.outputs] == [c.finish_reason for c in b.outputs]
    assert len(spec[0].outputs[0].token_ids) == 7 and len(spec[1].prompt_token_ids + spec[1].outputs[0].token_ids) == 40
    text = base[0].outputs[0].text
    if len(text) > 3:  # a stop string cuts both at the same place
        stop = text[2:4]
        sp = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, stop=[stop])
        a = LLM(tiny_model, **kw).generate(prompts[0], sp)[0].outputs[0]
        b = LLM(tiny_model, speculative_config=NGRAM, **kw).generate(prompts[0], sp)[0].outputs[0]
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason)


def test_seeded_sampling_with_speculation_is_reproducible(tiny_model):
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=64, speculative_config=NGRAM)
    params = SamplingParams(temperature=0.8, max_tokens=16, seed=7, ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 6, 7, 5, 6, 7, 5, 6]}
    first = llm.generate(prompt, params)[0].outputs[0].token_ids
    assert llm.generate(prompt, params)[0].outputs[0].token_ids == first
    assert len(first) == 16


@pytest.mark.xdist_group("tp")
def test_speculation_under_tensor_parallelism(hf_checkpoints):
    """TP=2 with drafts gives TP=2's tokens (the drafts ride in the broadcast step like any other tokens)."""
    model_dir = hf_checkpoints["stablelm-2-12b"]
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]}, {"prompt_token_ids": list(range(20, 45)) * 2}]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    kw = dict(dtype="float32", backend="torch", num_kv_blocks=64, tensor_parallel_size=2)
    base = LLM(model_dir, **kw)
    want = [o.outputs[0].token_ids for o in base.generate(prompts, params)]
    base.shutdown()
    spec = LLM(model_dir, speculative_config=NGRAM, **kw)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == want
    assert spec.engine.num_spec_accepted > 0
    spec.shutdown()
