"""The paged engine against HF greedy outputs: prefix caching on/off, chunked prefill, preemption."""

import pytest
import torch

from checkpoints import VARIANTS, load_hf
from stablelm_fast import LLM, SamplingParams

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _workload(vocab: int) -> list[list[int]]:
    """Mixed lengths, with shared prefixes (so the prefix cache has something to hit) and a duplicate."""
    g = torch.Generator().manual_seed(3)
    common = torch.randint(6, vocab, (37,), generator=g).tolist()
    prompts = [common + torch.randint(6, vocab, (n,), generator=g).tolist() for n in (1, 5, 12)]
    prompts += [torch.randint(6, vocab, (n,), generator=g).tolist() for n in (3, 20, 64)]
    return prompts + [prompts[1], [9]]


@pytest.fixture(scope="module")
def hf_reference(hf_checkpoints):
    refs = {}
    for variant in VARIANTS:
        hf = load_hf(hf_checkpoints[variant], variant)
        prompts = _workload(hf.config.vocab_size)
        refs[variant] = (prompts, [hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
                                   for p in prompts])
    return refs


def _run(model_dir: str, prompts, **kw):
    llm = LLM(model_dir, dtype="float32", backend="torch", block_size=4, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_matches_hf(hf_checkpoints, hf_reference, variant, prefix_caching):
    prompts, want = hf_reference[variant]
    llm, got = _run(hf_checkpoints[variant], prompts, enable_prefix_caching=prefix_caching, num_kv_blocks=256)
    assert got == want
    if prefix_caching:
        assert llm.engine.block_manager.num_hit_blocks > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_prefill(hf_checkpoints, hf_reference, variant):
    prompts, want = hf_reference[variant]
    llm, got = _run(hf_checkpoints[variant], prompts, max_num_batched_tokens=7, num_kv_blocks=256)
    assert got == want
    assert llm.engine.num_steps > sum(len(p) for p in prompts) // 7  # prompts really were cut into chunks


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption(hf_checkpoints, hf_reference, variant, prefix_caching):
    prompts, want = hf_reference[variant]
    # 22 blocks of 4 tokens: the longest request (64 + 12 tokens) needs 19, so requests must take turns
    llm, got = _run(hf_checkpoints[variant], prompts, num_kv_blocks=22, enable_prefix_caching=prefix_caching)
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == want


def test_continuous_batching_admits_new_requests_while_decoding(tiny_model):
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=64)
    engine = llm.engine
    engine.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.add_request({"prompt_token_ids": [8, 9]}, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    batch_sizes = []
    while engine.has_unfinished_requests():
        batch_sizes.append(len(engine.scheduler.running))
        engine.step()
    assert max(batch_sizes) == 2  # the second request joined the running one


def test_request_that_can_never_fit_is_refused(tiny_model):
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV-cache blocks"):
        llm.generate({"prompt_token_ids": list(range(6, 16))}, SamplingParams(max_tokens=4))
    out = llm.generate({"prompt_token_ids": [6, 7]}, SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_bad_input_raises_before_any_work(tiny_model):
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=64, max_model_len=64)
    vocab = llm.engine.config.vocab_size
    good = {"prompt_token_ids": [5, 6]}
    cases = [("", "empty"), ({"prompt_token_ids": []}, "empty"), ({"prompt_token_ids": [5, vocab]}, "vocabulary"),
             ({"prompt_token_ids": list(range(6, 66))}, "max_model_len"), (12, "prompt must be")]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            llm.generate([good, bad], SamplingParams(max_tokens=8))
        assert not llm.engine.has_unfinished_requests()  # nothing was queued, not even the good prompt
        assert llm.engine.num_steps == 0
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(good, SamplingParams(max_tokens=63))
    out = llm.generate(good, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_outputs_in_input_order_and_metrics(tiny_model):
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=64)
    prompts = ["Hello, world!", "The quick brown fox jumps over", "A"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=True)
    assert [o.prompt for o in outs] == prompts
    for o in outs:
        assert o.finished and o.outputs[0].finish_reason == "length"
        assert o.prompt_token_ids == llm.tokenizer.encode(o.prompt)
        assert o.metrics.time_to_first_token > 0 and o.metrics.time_per_output_token > 0
        assert o.outputs[0].text == llm.tokenizer.decode(o.outputs[0].token_ids)
