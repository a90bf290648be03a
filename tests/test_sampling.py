"""Sampling: each filter against a direct computation, seeds, stops, logprobs, n, parameter validation."""

import math

import pytest
import torch

from stablelm_fast import LLM, SamplingParams
from stablelm_fast.layers.sampler import Sampler, SamplingRow, apply_penalties, apply_top_k_top_p_min_p


def _row(params, prompt=(1, 2), output=(), gen=None, banned=()):
    return SamplingRow(params, list(prompt), list(output), gen, list(banned))


def test_top_k_top_p_min_p_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    top_k = torch.tensor([5, 50, 50])
    top_p = torch.tensor([1.0, 0.7, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.2])
    out = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
    kept = torch.isfinite(out)
    assert set(kept[0].nonzero().flatten().tolist()) == set(logits[0].topk(5).indices.tolist())
    probs = logits[1].softmax(-1)
    order = probs.argsort(descending=True)
    mass, want = 0.0, set()
    for t in order.tolist():  # smallest set of top tokens whose mass reaches top_p
        want.add(t)
        mass += probs[t].item()
        if mass >= 0.7:
            break
    assert set(kept[1].nonzero().flatten().tolist()) == want
    p2 = logits[2].softmax(-1)
    assert set(kept[2].nonzero().flatten().tolist()) == set((p2 >= 0.2 * p2.max()).nonzero().flatten().tolist())
    torch.testing.assert_close(out[kept], logits[kept])


def test_penalties_against_direct_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = logits.clone()
    apply_penalties(out, [_row(params, prompt=[0], output=[3, 3, 1])])
    want = [2.0 / 2, -1.0 * 2 - 0.25 - 0.5, 0.5, 3.0 / 2 - 0.5 - 0.5, -2.0]
    torch.testing.assert_close(out[0], torch.tensor(want))


def test_temperature_distribution():
    torch.manual_seed(0)  # unseeded rows draw from the global generator: fix it, so the test is deterministic
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0]]).repeat(4000, 1)
    rows = [_row(SamplingParams(temperature=0.5)) for _ in range(4000)]
    tokens, _ = Sampler()(logits, rows)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    want = (logits[0] / 0.5).softmax(-1)
    assert (freq - want).abs().max() < 0.03


def test_min_tokens_bans_eos():
    logits = torch.tensor([[0.0, 10.0, 0.0]])
    tokens, _ = Sampler()(logits, [_row(SamplingParams(temperature=0, min_tokens=2), banned=[1])])
    assert tokens == [0] or tokens == [2]


def test_seeded_sampling_is_reproducible_across_batch_mixes(tiny_model):
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=128)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=42, ignore_eos=True)
    alone = llm.generate("Hello, world!", seeded)[0].outputs[0].token_ids
    mixed = llm.generate(["The quick brown fox", "Hello, world!", "A paged KV cache"],
                         [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True), seeded,
                          SamplingParams(temperature=0.7, max_tokens=5, seed=1, ignore_eos=True)])
    assert mixed[1].outputs[0].token_ids == alone
    other = llm.generate("Hello, world!", SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=43,
                                                         ignore_eos=True))[0].outputs[0].token_ids
    assert other != alone


def test_n_samples_differ_and_share_prompt_blocks(tiny_model):
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=128, block_size=4)
    prompt = {"prompt_token_ids": list(range(6, 30))}
    out = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=5, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert llm.engine.block_manager.num_hit_blocks >= 3 * 5  # siblings reuse the 5 full prompt blocks


def test_stop_token_ids_and_stop_strings(tiny_model):
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=128)
    free = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    ids, text = free.outputs[0].token_ids, free.outputs[0].text
    stop_id = ids[5]
    cut = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                               stop_token_ids=[stop_id]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop_id
    assert cut.token_ids == ids[: ids.index(stop_id) + 1]
    assert cut.text == llm.tokenizer.decode(ids[: ids.index(stop_id)])
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop
    s = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                             stop=[stop]))[0].outputs[0]
    assert s.finish_reason == "stop" and s.stop_reason == stop
    assert s.text == text[: text.index(stop)]


def test_eos_stops_unless_ignored(tiny_model):
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=128)
    eos = next(iter(llm.tokenizer.eos_token_ids))
    # min_tokens bans eos; after that, a logit bias is not available, so check the finish path directly
    engine = llm.engine
    rid = engine.add_request({"prompt_token_ids": [5, 6]}, SamplingParams(temperature=0, max_tokens=8))
    seq = engine.requests[rid].seqs[0]
    engine.step()
    engine.output_processor.append_token(engine.requests[rid], seq, eos, None, 0.0)
    assert seq.finish_reason == "stop" and seq.stop_reason == eos
    rid = engine.add_request({"prompt_token_ids": [5, 6]}, SamplingParams(temperature=0, max_tokens=8,
                                                                          ignore_eos=True))
    seq = engine.requests[rid].seqs[0]
    engine.step()
    engine.output_processor.append_token(engine.requests[rid], seq, eos, None, 0.0)
    assert seq.finish_reason is None
    engine.abort_request(rid)


def test_logprobs_match_hf_log_softmax(hf_checkpoints):
    from checkpoints import load_hf

    model_dir = hf_checkpoints["stablelm-2-1_6b"]
    hf = load_hf(model_dir, "stablelm-2-1_6b")
    llm = LLM(model_dir, dtype="float32", backend="torch", num_kv_blocks=64)
    prompt = [5, 17, 40, 99, 120]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                                                    ignore_eos=True))[0].outputs[0]
    seq = prompt + out.token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0].log_softmax(-1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert tok in lp and len(lp) <= 4
        for t, v in lp.items():
            assert math.isclose(v, row[t].item(), abs_tol=1e-4)
        assert set(row.topk(3).indices.tolist()) <= set(lp)


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -3), ("min_p", 2.0),
    ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("max_tokens", 0),
    ("min_tokens", -1), ("stop", 5), ("stop", [""]), ("stop_token_ids", [-1]), ("seed", 1.5), ("logprobs", 21),
    ("temperature", float("nan")), ("ignore_eos", "yes"), ("top_k", 2**40), ("seed", 2**70),
    ("prompt_logprobs", 21), ("structured_outputs", "json"),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=2)
