"""Speculative decoding with a draft model: a draft of another vocabulary refused; rejection sampling with a real draft
distribution keeps the target's; greedy output identical to no speculation on every family with prefix caching,
chunked prefill, preemption, n > 1, stops and length limits; a model drafting for itself has every draft accepted
(the draft's cache tracks the target's through all of it); seeds reproducible; the target under TP=2."""

import json
import shutil

import pytest
import torch

from checkpoints import VARIANTS
from stablelm_fast import LLM, SamplingParams
from stablelm_fast.engine.spec_decode import verify
from stablelm_fast.layers.sampler import Sampler, SamplingRow

pytestmark = pytest.mark.usefixtures("one_thread")

# chunked prefill (16-token budget), prefix caching, a cache small enough to preempt, 8-token blocks
KW = dict(dtype="float32", backend="torch", num_kv_blocks=10, block_size=8, max_num_batched_tokens=16)
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]}, {"prompt_token_ids": list(range(20, 45)) * 2},
           {"prompt_token_ids": [5, 6, 7, 8, 5, 6, 7, 8, 9, 10]}]


def draft(model_dir: str, k: int = 3) -> dict:
    return {"method": "draft_model", "model": model_dir, "num_speculative_tokens": k}


def test_a_draft_with_another_vocabulary_is_refused(tiny_model, tmp_path):
    bigger = shutil.copytree(tiny_model, tmp_path / "bigger")
    cfg = json.loads((bigger / "config.json").read_text())
    (bigger / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 64}))
    with pytest.raises(ValueError, match="vocab_size"):
        LLM(tiny_model, dtype="float32", num_kv_blocks=8, speculative_config=draft(str(bigger)))
    other = shutil.copytree(tiny_model, tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if len(t) > 1][-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="different tokenizer"):
        LLM(tiny_model, dtype="float32", num_kv_blocks=8, speculative_config=draft(str(other)))


def test_the_cli_takes_a_draft_model(hf_checkpoints, capsys):
    """`--speculative-config` JSON (vLLM's spelling) reaches the engine: the same text as without it (greedy)."""
    from stablelm_fast.cli import main

    target, small = hf_checkpoints["stablelm-2-12b"], hf_checkpoints["stablelm-2-1_6b"]
    args = ["generate", target, "--prompt", "def f(x):", "--max-tokens", "8", "--temperature", "0",
            "--dtype", "float32", "--backend", "torch", "--num-kv-blocks", "32"]
    assert main(args) == 0
    want = capsys.readouterr().out
    assert main(args + ["--speculative-config", json.dumps(draft(small))]) == 0
    assert capsys.readouterr().out == want and "8 tokens" in want


def test_rejection_sampling_with_a_draft_distribution_keeps_the_target_distribution():
    """Drafts drawn from q, accepted with min(1, p/q), else resampled from (p - q)+: every emitted position is
    distributed as the target's p (the rows here do not depend on the prefix, so position 2 is p[1] too)."""
    p_logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0], [0.3, 0.1, 0.0, -1.0, 0.5], [0.0, 0.0, 1.0, 0.0, -1.0]])
    q = torch.tensor([[0.05, 0.5, 0.3, 0.1, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]])  # far from p on purpose
    p = p_logits.softmax(-1)
    gen = torch.Generator().manual_seed(0)
    rows = [SamplingRow(SamplingParams(temperature=1.0), [], [], gen, []) for _ in range(3)]
    n = 4000
    first, second = torch.zeros(5), torch.zeros(5)
    for _ in range(n):
        drafts = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(2)]
        tokens, _ = verify(Sampler(), p_logits, rows, drafts, q)
        first[tokens[0]] += 1
        if len(tokens) > 1:
            second[tokens[1]] += 1
    # 4000 samples: a frequency's standard error is <= 0.008; a biased rule (e.g. the min(1, p/q) test with a
    # resample from p instead of (p - q)+) is off by 0.095 at one token with this q
    assert (first / n - p[0]).abs().max() < 0.035, (first / n, p[0])
    assert (second / second.sum() - p[1]).abs().max() < 0.045, (second / second.sum(), p[1])
    # the acceptance rate of the first draft is sum_x min(p, q) = 0.34 (the point-mass rule, accepting x with
    # p(x), is exact too but accepts only sum_x q p = 0.13 here)
    assert abs((second.sum() / n) - float(torch.minimum(p[0], q[0]).sum())) < 0.035


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_output_is_identical_with_a_draft_model(hf_checkpoints, variant):
    target = hf_checkpoints[variant]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    base = LLM(target, **KW).generate(PROMPTS, params)
    # the 1.6B-like model drafting (random weights: mostly rejected), and the target drafting for itself
    drafts = {"small": hf_checkpoints["stablelm-2-1_6b"], "self": target}
    for name, draft_dir in drafts.items():
        if name == "small" and variant == "stablelm-2-1_6b":
            continue
        llm = LLM(target, speculative_config=draft(draft_dir), **KW)
        spec = llm.generate(PROMPTS, params)
        e = llm.engine
        for a, b in zip(base, spec):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, name
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):  # the same logprobs
                assert la.keys() == lb.keys()
                torch.testing.assert_close(torch.tensor(list(lb.values())), torch.tensor(list(la.values())),
                                           atol=1e-4, rtol=1e-4)
        assert e.num_spec_proposed > 0 and e.scheduler.num_preemptions > 0
        assert e.block_manager.num_hit_blocks > 0  # the third prompt reuses the first's leading block
        if name == "self":  # the draft's cache is right: it predicts exactly what the target computes
            assert e.num_spec_accepted == e.num_spec_proposed


def test_draft_model_respects_stops_limits_and_n(hf_checkpoints):
    target, small = hf_checkpoints["stablelm-2-12b"], hf_checkpoints["stablelm-2-1_6b"]
    kw = dict(dtype="float32", backend="torch", num_kv_blocks=64, max_model_len=40)
    prompts = [{"prompt_token_ids": [5, 6, 7, 5, 6, 7, 5, 6]}, {"prompt_token_ids": list(range(10, 30))}]
    params = [SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, n=2),
              SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)]  # up to max_model_len
    base = LLM(target, **kw).generate(prompts, params)
    llm = LLM(target, speculative_config=draft(target, k=4), **kw)
    spec = llm.generate(prompts, params)
    for a, b in zip(base, spec):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [c.finish_reason for c in a.outputs] == [c.finish_reason for c in b.outputs]
    assert len(spec[0].outputs[0].token_ids) == 7 and len(spec[1].prompt_token_ids + spec[1].outputs[0].token_ids) == 40
    text = base[1].outputs[0].text
    assert len(text) > 6, "the workload needs some text to cut"
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[text[4:6]])
    want = LLM(target, **kw).generate(prompts[1], sp)[0].outputs[0]
    got = LLM(target, speculative_config=draft(small), **kw).generate(prompts[1], sp)[0].outputs[0]
    assert (got.text, got.finish_reason) == (want.text, want.finish_reason) and want.finish_reason == "stop"


def test_sampling_with_a_draft_model_is_seeded_and_reproducible(hf_checkpoints):
    target, small = hf_checkpoints["stablelm-2-12b"], hf_checkpoints["stablelm-2-1_6b"]
    llm = LLM(target, dtype="float32", backend="torch", num_kv_blocks=64, speculative_config=draft(small))
    params = SamplingParams(temperature=0.8, top_k=50, max_tokens=16, seed=7, ignore_eos=True, n=2)
    first = [c.token_ids for c in llm.generate(PROMPTS[0], params)[0].outputs]
    assert [c.token_ids for c in llm.generate(PROMPTS[0], params)[0].outputs] == first
    assert all(len(t) == 16 for t in first) and first[0] != first[1]
    assert llm.engine.num_spec_proposed > 0


def test_sampled_self_drafting_accepts_nearly_everything(hf_checkpoints):
    """A model drafting for itself has q == p (up to rounding), so min(1, p/q) accepts every draft: this holds only if
    each draft's q is the distribution it was drawn from and is checked at the right target row (penalties read the
    drafts before it, filters and temperature apply alike)."""
    target = hf_checkpoints["stablelm-zephyr-3b"]
    llm = LLM(target, dtype="float32", backend="torch", num_kv_blocks=64, speculative_config=draft(target, k=4))
    params = SamplingParams(temperature=0.3, top_p=0.95, presence_penalty=0.5, max_tokens=24, n=3, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    assert all(len(c.token_ids) == 24 for o in outs for c in o.outputs)
    e = llm.engine
    # (measured: all accepted; with the q rows of each sequence reversed, 90%)
    assert e.num_spec_proposed > 50 and e.num_spec_accepted >= 0.99 * e.num_spec_proposed


@pytest.mark.xdist_group("tp")
def test_draft_model_with_the_target_under_tensor_parallelism(hf_checkpoints):
    """The target at TP=2 with the draft unsharded in the driver gives TP=2's greedy tokens."""
    target = hf_checkpoints["stablelm-2-12b"]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kw = dict(dtype="float32", backend="torch", num_kv_blocks=64, tensor_parallel_size=2)
    base = LLM(target, **kw)
    want = [o.outputs[0].token_ids for o in base.generate(PROMPTS, params)]
    base.shutdown()
    spec = LLM(target, speculative_config=draft(target), **kw)  # the unsharded target drafting for its TP=2 self
    assert [o.outputs[0].token_ids for o in spec.generate(PROMPTS, params)] == want
    assert spec.engine.num_spec_accepted > 0
    spec.shutdown()
