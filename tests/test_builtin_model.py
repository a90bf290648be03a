"""The trained model shipped in the package (stablelm_fast/assets/stablelm-pystdlib-4m, `make run`'s default):
it loads through the normal loader, and HF transformers (the oracle) and stablelm-fast agree on it in fp32: the same
greedy continuation of a real prompt and the same held-out perplexity. Also bench/quality.py's pieces."""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.quality import heldout_windows, perplexity, records_from_outputs, topk_kl  # noqa: E402
from stablelm_fast import LLM, SamplingParams  # noqa: E402
from stablelm_fast.config import ModelConfig  # noqa: E402
from stablelm_fast.demo import BUILTIN_MODEL  # noqa: E402
from stablelm_fast.tokenizer import Tokenizer  # noqa: E402
from tools.stdlib_corpus import is_heldout, split  # noqa: E402

pytestmark = pytest.mark.xdist_group("builtin_model")
N_WINDOWS = 4


@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("transformers")
    from transformers import StableLmForCausalLM

    return StableLmForCausalLM.from_pretrained(BUILTIN_MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm():
    engine = LLM(BUILTIN_MODEL, dtype="float32", backend="torch", num_kv_blocks=128)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def windows() -> list[list[int]]:
    return heldout_windows(Tokenizer(BUILTIN_MODEL), 256, N_WINDOWS)


def test_folder_loads_through_the_normal_loader():
    files = sorted(os.listdir(BUILTIN_MODEL))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert name in files
    assert os.path.getsize(os.path.join(BUILTIN_MODEL, "model.safetensors")) < 10 * 2**20
    cfg = ModelConfig.from_pretrained(BUILTIN_MODEL)
    # stablelm-2-12b's features: GQA, per-head QK LayerNorm, parallel residual, partial rotary
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.qk_layernorm and cfg.use_parallel_residual
    assert cfg.rotary_dim < cfg.head_dim and cfg.torch_dtype == "bfloat16"
    tok = Tokenizer(BUILTIN_MODEL)
    assert tok.vocab_size == cfg.vocab_size
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.eos_token_ids == frozenset({0})
    text = "def fibonacci(n):\n    return n"
    assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    log = json.load(open(os.path.join(BUILTIN_MODEL, "training_log.json"), encoding="utf-8"))
    assert log["steps"] > 0 and log["heldout_perplexity_fp32"] > 1


def test_default_dtype_runs_the_builtin_model():
    llm = LLM(BUILTIN_MODEL, num_kv_blocks=64)  # as `make run` does: bf16 from config.json, the auto backend
    try:
        out = llm.generate("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == 8 and out.outputs[0].text
    finally:
        llm.shutdown()


@torch.no_grad()
def test_same_greedy_continuation_as_hf(hf_model, llm):
    prompt, n = "def fibonacci(n):", 48
    ids = llm.tokenizer.encode(prompt)
    cache_kw = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    out = hf_model(torch.tensor([ids]), use_cache=True)
    expected = []
    for _ in range(n):  # HF's greedy decoding with its own KV cache, no stopping at <|endoftext|>
        expected.append(int(out.logits[0, -1].argmax()))
        cache = out.cache if cache_kw == "cache" else out.past_key_values
        out = hf_model(torch.tensor([[expected[-1]]]), use_cache=True, **{cache_kw: cache})
    got = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
    assert got.outputs[0].token_ids == expected
    assert got.outputs[0].text == llm.tokenizer.decode(expected)


@pytest.fixture(scope="module")
def hf_logprobs(hf_model, windows) -> list[torch.Tensor]:
    """HF's fp32 next-token log-probabilities over each held-out window, [len - 1, vocab] float64."""
    with torch.no_grad():
        return [torch.log_softmax(hf_model(torch.tensor([w[:-1]])).logits[0].double(), -1) for w in windows]


def hf_records(logprobs: list[torch.Tensor], windows: list[list[int]], k: int) -> dict[str, torch.Tensor]:
    """The records bench/quality.py builds from prompt_logprobs, built from HF's full logits instead."""
    outs = []
    for w, logp in zip(windows, logprobs):
        plp = [None]
        for pos in range(1, len(w)):
            row = logp[pos - 1]
            top = row.topk(k)
            entry = {int(t): float(v) for t, v in zip(top.indices, top.values)}
            entry[w[pos]] = float(row[w[pos]])
            plp.append(entry)
        outs.append(SimpleNamespace(prompt_logprobs=plp))
    return records_from_outputs(windows, outs, k)


def test_heldout_windows_and_hf_perplexity(hf_logprobs, windows):
    assert len(windows) == N_WINDOWS and all(len(w) == 257 for w in windows)
    assert windows[1][0] == windows[0][-1]  # windows step by 256 tokens: each scores the 256 after its first
    train, heldout = split()
    assert heldout and not {r for r, _ in train} & {r for r, _ in heldout}
    assert all(is_heldout(r) for r, _ in heldout) and not any(is_heldout(r) for r, _ in train)
    rec = hf_records(hf_logprobs, windows, 20)
    # the plain cross-entropy over the same windows gives the same perplexity
    loss = sum(torch.nn.functional.nll_loss(lp, torch.tensor(w[1:]), reduction="sum").item()
               for lp, w in zip(hf_logprobs, windows))
    assert perplexity(rec) == pytest.approx(math.exp(loss / (N_WINDOWS * 256)), rel=1e-9)
    assert perplexity(rec) < 400  # a trained model (random weights: about the vocabulary size, 4096)


def test_topk_kl(hf_logprobs, windows):
    ref = hf_records(hf_logprobs[:1], windows[:1], 20)
    assert torch.equal(topk_kl(ref, ref), torch.zeros(256, dtype=torch.float64))
    # with k = the whole vocabulary the bucketed KL is the exact KL
    w, logp = windows[0][:33], hf_logprobs[0][:32]
    noisy = torch.log_softmax(logp + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(0),
                                                       dtype=torch.float64), -1)

    def records(lp):
        plp = [None] + [dict(enumerate(lp[p - 1].tolist())) for p in range(1, len(w))]
        return records_from_outputs([w], [SimpleNamespace(prompt_logprobs=plp)], lp.shape[-1])

    exact = (logp.exp() * (logp - noisy)).sum(-1)
    assert torch.allclose(topk_kl(records(logp), records(noisy)), exact, rtol=1e-6, atol=1e-9)
    assert exact.mean() > 1e-3
    # with k = 20 the reference's top 20 and one bucket: no more than the exact KL here, and of its size
    small = topk_kl(hf_records([logp], [w], 20), hf_records([noisy], [w], 20))
    assert 0 < small.mean() <= exact.mean()


def test_heldout_perplexity_matches_hf(hf_logprobs, llm, windows):
    outs = llm.generate([{"prompt_token_ids": w} for w in windows],
                        SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=5))
    ours = records_from_outputs(windows, outs, 5)
    ref = hf_records(hf_logprobs, windows, 5)
    assert torch.allclose(ours["actual"], ref["actual"], atol=1e-4)
    assert perplexity(ours) == pytest.approx(perplexity(ref), rel=1e-5)
    assert topk_kl(ref, ours).mean().item() < 1e-6


def test_quality_script_same_configuration_gives_zero_kl(tmp_path):
    from bench.quality import main

    out = tmp_path / "q.json"
    res = main(["--max-windows", "1", "--dtype", "float32", "--backend", "torch", "--save-ref",
                str(tmp_path / "ref.safetensors"), "--json", str(out)])
    assert res["positions"] == 256 and res["run"]["resolved"] == "float32/torch"
    assert res["run_perplexity"] == res["ref_perplexity"] and res["kl_mean"] == 0 and res["top1_agreement"] == 1
    again = main(["--max-windows", "1", "--dtype", "float32", "--backend", "torch", "--load-ref",
                  str(tmp_path / "ref.safetensors")])
    assert again["run_perplexity"] == res["ref_perplexity"] and again["kl_mean"] == 0
    assert json.loads(out.read_text())["positions"] == 256
    with pytest.raises(ValueError, match="scored other tokens"):
        main(["--max-windows", "2", "--load-ref", str(tmp_path / "ref.safetensors")])
    with pytest.raises(ValueError, match="engine-arg"):
        main(["--max-windows", "1", "--engine-arg", "nokey"])
