"""vLLM's SamplingParams extras: logit_bias (sampler order and validation) and include_stop_str_in_output."""

import pytest
import torch

from stablelm_fast import LLM, SamplingParams
from stablelm_fast.layers.sampler import Sampler, SamplingRow


def _row(params, gen=None):
    return SamplingRow(params, [1, 2], [], gen, [])


def test_logit_bias_moves_greedy_and_sampling_but_not_logprobs():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    greedy = SamplingParams(temperature=0, logprobs=0, logit_bias={2: 5.0})
    tokens, lps = Sampler()(logits.clone(), [_row(greedy)])
    assert tokens == [2]  # 0 + 5 beats 3
    # logprobs are the model's own (before processing), as vLLM's default raw logprobs
    assert lps[0][2] == pytest.approx(float(logits[0].log_softmax(-1)[2]), abs=1e-6)
    # sampled at temperature 1: the distribution is softmax(logits + bias); -100 bans a token in practice
    bias = {0: -100.0, 3: 2.0}
    rows = [_row(SamplingParams(temperature=1.0, logit_bias=bias), torch.Generator().manual_seed(i))
            for i in range(3000)]
    tokens, _ = Sampler()(logits.repeat(3000, 1), rows)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 3000
    want = (logits[0] + torch.tensor([-100.0, 0.0, 0.0, 2.0])).softmax(-1)
    assert freq[0] == 0 and (freq - want).abs().max() < 0.04


def test_logit_bias_applies_before_penalties():
    # vLLM's order: bias, then penalties. A repetition penalty of 2 on a positive biased logit halves the sum.
    logits = torch.tensor([[1.0, 0.0, 0.0]])
    row = SamplingRow(SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={0: 3.0}), [0], [], None, [])
    processed = Sampler.process(logits, [row])
    torch.testing.assert_close(processed[0], torch.tensor([(1.0 + 3.0) / 2, 0.0, 0.0]))


@pytest.mark.parametrize("bias,words", [
    ([1, 2], "dict"), ({1: 100.5}, "[-100, 100]"), ({1: float("nan")}, "[-100, 100]"), ({-1: 1.0}, "token ids"),
    ({"5": 1.0}, "token ids"), ({1: "x"}, "[-100, 100]"),
])
def test_logit_bias_validation_names_the_field(bias, words):
    with pytest.raises(ValueError, match="logit_bias") as e:
        SamplingParams(logit_bias=bias)
    assert words in str(e.value)


def test_logit_bias_in_the_engine(tiny_model):
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=64)
    vocab = llm.engine.input_processor.vocab_size
    free = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=6,
                                                                          ignore_eos=True))[0].outputs[0].token_ids
    target = next(t for t in (11, 12, 13) if t not in free)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]},
                       [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={target: 100})])
    assert out[0].outputs[0].token_ids == [target] * 6
    banned = llm.generate({"prompt_token_ids": [5, 6, 7]},
                          SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                         logit_bias={free[0]: -100}))[0].outputs[0].token_ids
    assert banned[0] != free[0]
    with pytest.raises(ValueError, match=f"logit_bias token id {vocab} is outside the vocabulary"):
        llm.generate("Hi", SamplingParams(logit_bias={vocab: 1.0}))


def test_include_stop_str_in_output(tiny_model):
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=64)
    base = dict(temperature=0, max_tokens=16, ignore_eos=True)
    free = llm.generate("The quick brown fox", SamplingParams(**base))[0].outputs[0]
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 2]
    assert stop
    at = free.text.index(stop)
    cut, kept = [o[0].outputs[0] for o in (
        llm.generate("The quick brown fox", SamplingParams(**base, stop=stop)),
        llm.generate("The quick brown fox", SamplingParams(**base, stop=stop, include_stop_str_in_output=True)))]
    assert cut.text == free.text[:at] and kept.text == free.text[:at + len(stop)]
    assert kept.finish_reason == "stop" and kept.stop_reason == stop and kept.token_ids == cut.token_ids
    # a stop token id: its text is kept too (vLLM)
    stop_id = free.token_ids[4]
    n = free.token_ids.index(stop_id) + 1
    by_id = llm.generate("The quick brown fox", SamplingParams(**base, stop_token_ids=[stop_id],
                                                                 include_stop_str_in_output=True))[0].outputs[0]
    assert by_id.token_ids == free.token_ids[:n] and by_id.text == llm.tokenizer.decode(free.token_ids[:n])
    with pytest.raises(ValueError, match="include_stop_str_in_output"):
        SamplingParams(include_stop_str_in_output="yes")
