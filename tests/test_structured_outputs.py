"""Structured outputs through xgrammar: every generated text satisfies its constraint, even with random weights."""

import asyncio
import json
import re

import pytest

from stablelm_fast import LLM, AsyncLLM, SamplingParams
from stablelm_fast.structured_outputs import StructuredOutputsParams

pytest.importorskip("xgrammar", reason="structured outputs need xgrammar (in requirements-dev.txt)")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
          "required": ["ok", "size"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=128)


def _gen(llm, so, n=1, temperature=0.8, max_tokens=48, **kw):
    params = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=3,
                            structured_outputs=so, **kw)
    return llm.generate({"prompt_token_ids": [5, 6, 7]}, params)[0].outputs


def test_json_schema(llm):
    for out in _gen(llm, StructuredOutputsParams(json=SCHEMA), n=3):
        assert out.finish_reason == "stop", out
        value = json.loads(out.text)
        assert set(value) == {"ok", "size"} and isinstance(value["ok"], bool) and value["size"] in "SML"


def test_choice_regex_and_grammar(llm):
    for out in _gen(llm, {"choice": ["alpha", "beta gamma", "δ"]}, n=4, temperature=1.5):
        assert out.text in ("alpha", "beta gamma", "δ") and out.finish_reason == "stop"
    for out in _gen(llm, StructuredOutputsParams(regex=r"[0-9]{3}-[a-c]{2}"), n=2):
        assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", out.text), out.text
    grammar = 'root ::= "(" item ("," item)* ")"\nitem ::= "x" | "y"'
    out = _gen(llm, StructuredOutputsParams(grammar=grammar), temperature=0)[0]
    assert re.fullmatch(r"\([xy](,[xy])*\)", out.text) or (out.finish_reason == "length"
                                                           and re.fullmatch(r"\([xy](,[xy])*", out.text)), out.text


def test_json_object_is_json_or_cut_by_the_limit(llm):
    out = _gen(llm, {"json_object": True}, temperature=0, max_tokens=64)[0]
    assert out.text.startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)


def test_constraints_are_checked_before_anything_is_queued(llm):
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json=SCHEMA, regex="a")
    with pytest.raises(ValueError, match="invalid structured_outputs"):
        _gen(llm, {"json": "{not json"})
    with pytest.raises(ValueError, match="unknown field"):
        SamplingParams(structured_outputs={"jsonn": {}})
    assert not llm.engine.has_unfinished_requests()


def test_streaming_with_a_schema(tiny_model):
    async def go():
        engine = AsyncLLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=64)
        try:
            params = SamplingParams(temperature=0.7, max_tokens=48, seed=1,
                                    structured_outputs=StructuredOutputsParams(json=SCHEMA))
            texts = [out.outputs[0].text async for out in engine.generate("Hello", params)]
        finally:
            engine.shutdown()
        return texts
    texts = asyncio.run(go())
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative, never taken back
    assert set(json.loads(texts[-1])) == {"ok", "size"}


def test_speculation_leaves_constrained_sequences_alone(tiny_model):
    spec = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=64,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    out = _gen(spec, StructuredOutputsParams(json=SCHEMA), temperature=0)[0]
    assert set(json.loads(out.text)) == {"ok", "size"}
    assert spec.engine.num_spec_proposed == 0


@pytest.mark.xdist_group("tp")
def test_json_schema_under_tensor_parallelism(hf_checkpoints):
    llm = LLM(hf_checkpoints["stablelm-2-12b"], dtype="float32", backend="torch", num_kv_blocks=64,
              tensor_parallel_size=2)
    for out in _gen(llm, StructuredOutputsParams(json=SCHEMA), n=2):
        assert set(json.loads(out.text)) == {"ok", "size"}
    llm.shutdown()
