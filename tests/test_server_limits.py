"""Server extras (vLLM's /version, /tokenize, /detokenize) and the answers to abusive or unsupported requests: each a
quick 400 naming the problem (never a 500), with ordinary requests served right after. In-process ASGI, tiny model."""

import asyncio
import json
import os

import httpx
import openai
import pytest

import stablelm_fast
from stablelm_fast import AsyncLLM
from stablelm_fast.server import create_app
from stablelm_fast.server.protocol import MAX_N, MAX_PROMPTS
from stablelm_fast.tiny import CHATML_TEMPLATE, make_tiny_checkpoint
from tests.checkpoints import update_json

pytestmark = pytest.mark.xdist_group("server")

MODEL, KEY = "m", "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
# ChatML with an optional variable, to see chat_template_kwargs reach the template
TEMPLATE = "{% if greeting is defined %}{{ greeting + '\\n' }}{% endif %}" + CHATML_TEMPLATE


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-limits")), "stablelm-2-1_6b", seed=2)
    update_json(os.path.join(model_dir, "tokenizer_config.json"), chat_template=TEMPLATE)
    engine = AsyncLLM(model_dir, dtype="float32", backend="torch")
    yield engine, create_app(engine, served_model_name=MODEL, api_key=KEY)
    engine.shutdown()


def _run(app, requests):
    """[(method, path, json body or raw bytes)] -> [httpx.Response], in order, with the API key."""

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH, timeout=60) as c:
            out = []
            for method, path, body in requests:
                kw = {"content": body, "headers": {"content-type": "application/json"}} \
                    if isinstance(body, bytes) else {"json": body}
                out.append(await (c.get(path) if method == "GET" else c.post(path, **kw)))
            return out

    return asyncio.run(main())


ORDINARY = ("POST", "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True})


def _assert_400(r, param=None, *words):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err


def test_version(served):
    (r,) = _run(served[1], [("GET", "/version", None)])
    assert r.status_code == 200 and r.json() == {"version": stablelm_fast.__version__}


def test_tokenize_detokenize(served):
    engine, app = served
    tok = engine.tokenizer
    text = "Hello, world! A paged KV cache."
    r, r_strs, r_chat, chat, r_nospecial = _run(app, [
        ("POST", "/tokenize", {"model": MODEL, "prompt": text}),
        ("POST", "/tokenize", {"prompt": text, "return_token_strs": True}),
        ("POST", "/tokenize", {"model": MODEL, "messages": MESSAGES}),
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}),
        ("POST", "/tokenize", {"prompt": text, "add_special_tokens": False}),
    ])
    body = r.json()
    assert body["tokens"] == tok.encode(text) and body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == engine.max_model_len and body["token_strs"] is None
    assert r_nospecial.json()["tokens"] == tok.encode(text, add_special_tokens=False)
    strs = r_strs.json()["token_strs"]
    assert strs == [tok.decode([t], skip_special_tokens=False) for t in body["tokens"]]
    # chat messages are rendered as /v1/chat/completions renders them
    assert r_chat.json()["count"] == chat.json()["usage"]["prompt_tokens"]
    assert r_chat.json()["tokens"] == tok.encode(tok.apply_chat_template(MESSAGES), add_special_tokens=False)
    (d, bad, empty) = _run(app, [("POST", "/detokenize", {"model": MODEL, "tokens": body["tokens"]}),
                                 ("POST", "/detokenize", {"tokens": [1, tok.vocab_size]}),
                                 ("POST", "/detokenize", {"tokens": []})])
    assert d.status_code == 200 and d.json() == {"prompt": tok.decode(body["tokens"], skip_special_tokens=False)}
    _assert_400(bad, "tokens", str(tok.vocab_size))
    assert empty.json() == {"prompt": ""}


def test_tokenize_needs_the_key_and_a_served_model(served):
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=served[1]), base_url="http://test") as c:
            return (await c.post("/tokenize", json={"prompt": "x"}),
                    await c.post("/tokenize", json={"model": "other", "prompt": "x"}, headers=AUTH))

    no_key, other = asyncio.run(main())
    assert no_key.status_code == 401 and other.status_code == 404


def test_caps_on_n_and_prompts(served):
    rs = _run(served[1], [
        ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1, "n": 100000}),
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 1, "n": MAX_N + 1}),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": ["x"] * (MAX_PROMPTS + 1), "max_tokens": 1}),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": [[5, 6]] * (MAX_PROMPTS + 1), "max_tokens": 1}),
        ORDINARY,
    ])
    _assert_400(rs[0], "n", str(MAX_N))
    _assert_400(rs[1], "n", str(MAX_N))
    _assert_400(rs[2], "prompt", str(MAX_PROMPTS))
    _assert_400(rs[3], "prompt", str(MAX_PROMPTS))
    assert rs[4].status_code == 200 and rs[4].json()["usage"]["completion_tokens"] == 3


def test_malformed_json_is_400_never_500(served):
    deep = b'{"model": "m", "prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    medium = b'{"model": "m", "prompt": "x", "stop": ' + b"[" * 150 + b"]" * 150 + b"}"
    digits = b'{"model": "m", "prompt": "x", "max_tokens": 1' + b"0" * 100000 + b"}"
    big = 10 ** 30
    rs = _run(served[1], [
        ("POST", "/v1/completions", deep), ORDINARY,
        ("POST", "/v1/completions", medium),
        ("POST", "/v1/chat/completions", digits), ORDINARY,
        ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "top_k": big}),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "seed": big}),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "stop_token_ids": [big]}),
        ORDINARY,
    ])
    _assert_400(rs[0], None, "deeper")
    _assert_400(rs[2], None, "deeper")
    _assert_400(rs[3], None, "not valid JSON")
    _assert_400(rs[5], "top_k")
    _assert_400(rs[6], "seed")
    _assert_400(rs[7], "stop_token_ids")
    for r in (rs[1], rs[4], rs[8]):
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


UNSUPPORTED = [("allowed_token_ids", [1]), ("use_beam_search", True), ("chat_template", "{{ messages }}")]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unsupported_fields_are_400_naming_them(served, path):
    base = {"model": MODEL, "max_tokens": 2}
    base.update({"messages": MESSAGES} if "chat" in path else {"prompt": "Hello"})
    fields = [(f, v) for f, v in UNSUPPORTED if "chat" in path or f != "chat_template"]
    rs = _run(served[1], [("POST", path, {**base, f: v}) for f, v in fields])
    for (field, _), r in zip(fields, rs):
        _assert_400(r, field, field, "not supported")
    # the same fields at their no-op values are fine
    noop = {"response_format": {"type": "text"}, "allowed_token_ids": None, "guided_json": None,
            "spaces_between_special_tokens": True}
    (ok,) = _run(served[1], [("POST", path, {**base, **noop})])
    assert ok.status_code == 200, ok.text


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


def test_openai_client_response_format_json_schema(served):
    async def main():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=served[1]))
        async with openai.AsyncOpenAI(api_key=KEY, base_url="http://test/v1", http_client=http) as client:
            r = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0.9, seed=2,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                                     response_format={"type": "json_schema", "json_schema": {}})
            return r, e.value

    r, err = asyncio.run(main())
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)
    assert err.status_code == 400 and err.body["param"] == "response_format"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_structured_output_fields(served, path):
    base = {"model": MODEL, "max_tokens": 24, "temperature": 1.0, "seed": 5}
    base.update({"messages": MESSAGES} if "chat" in path else {"prompt": "Hello"})
    bodies = [{"guided_choice": ["yes", "no"]}, {"structured_outputs": {"regex": "[0-9]{2}"}},
              {"guided_json": SCHEMA}, {"response_format": {"type": "json_object"}, "max_tokens": 4},
              {"guided_choice": ["a"], "guided_regex": "b"}, {"structured_outputs": {"json": "{nope"}}]
    rs = _run(served[1], [("POST", path, {**base, **b}) for b in bodies])
    texts = [(r.json()["choices"][0].get("text") if "text" in r.json()["choices"][0]
              else r.json()["choices"][0]["message"]["content"]) for r in rs[:4]]
    assert texts[0] in ("yes", "no") and len(texts[1]) == 2 and texts[1].isdigit()
    assert isinstance(json.loads(texts[2])["ok"], bool) and texts[3].startswith("{")
    _assert_400(rs[4], "guided_choice", "only one")
    assert rs[5].status_code == 400 and "invalid structured_outputs" in rs[5].json()["error"]["message"]


def test_chat_template_options(served):
    engine, app = served
    tok = engine.tokenizer
    turn = [*MESSAGES, {"role": "assistant", "content": "The answer is"}]
    chat = {"model": MODEL, "max_tokens": 2, "ignore_eos": True}
    rs = _run(app, [
        ("POST", "/tokenize", {"messages": MESSAGES, "chat_template_kwargs": {"greeting": "Ahoy"}}),
        ("POST", "/v1/chat/completions", {**chat, "messages": MESSAGES, "chat_template_kwargs": {"greeting": "Ahoy"}}),
        ("POST", "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}),
        ("POST", "/tokenize", {"messages": turn, "add_generation_prompt": False, "continue_final_message": True}),
        ("POST", "/v1/chat/completions", {**chat, "messages": turn, "add_generation_prompt": False,
                                          "continue_final_message": True}),
        ("POST", "/v1/chat/completions", {**chat, "messages": turn, "continue_final_message": True}),
        ("POST", "/v1/chat/completions", {**chat, "messages": MESSAGES, "chat_template_kwargs": {"messages": []}}),
    ])
    greeted = tok.apply_chat_template(MESSAGES, greeting="Ahoy")
    assert greeted.startswith("Ahoy\n<|im_start|>system")
    assert rs[0].json()["tokens"] == tok.encode(greeted, add_special_tokens=False)
    assert rs[1].status_code == 200 and rs[1].json()["usage"]["prompt_tokens"] == rs[0].json()["count"]
    plain = tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert rs[2].json()["tokens"] == tok.encode(plain, add_special_tokens=False)
    # the last message is left open: no end-of-turn after it
    continued = tok.apply_chat_template(turn, add_generation_prompt=False)
    cut = continued[:continued.rindex("The answer is") + len("The answer is")]
    assert cut != continued and rs[3].json()["tokens"] == tok.encode(cut, add_special_tokens=False)
    assert rs[4].status_code == 200 and rs[4].json()["usage"]["prompt_tokens"] == rs[3].json()["count"]
    _assert_400(rs[5], "continue_final_message", "add_generation_prompt")
    _assert_400(rs[6], "chat_template_kwargs", "messages")


def test_several_api_keys(served):
    engine, _ = served
    app = create_app(engine, served_model_name=MODEL, api_key=["key-a", "key-b"])

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return [(await c.get("/v1/models", headers=h)).status_code
                    for h in ({"Authorization": "Bearer key-a"}, {"x-api-key": "key-b"},
                              {"Authorization": "Bearer key-c"}, {})]

    assert asyncio.run(main()) == [200, 200, 401, 401]
    with pytest.raises(ValueError, match="api_key"):
        create_app(engine, api_key=["key-a", ""])


def test_pending_cap_turns_a_flood_away(served):
    """Past max_pending_seqs a request gets 503 with Retry-After at once; once the engine is free again, 200."""
    engine, _ = served
    app = create_app(engine, served_model_name=MODEL, max_pending_seqs=2)
    ctx = app.state.serving
    long = {"model": MODEL, "prompt": "A paged KV cache", "max_tokens": 200, "ignore_eos": True, "n": 2}

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
            first = asyncio.create_task(c.post("/v1/completions", json=long))
            while ctx.pending_seqs == 0:  # admitted (synchronously, before its engine requests start)
                assert not first.done(), first.result().text
                await asyncio.sleep(0.01)
            busy = await c.post("/v1/completions", json=ORDINARY[2])
            busy_stream = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES,
                                                                     "stream": True, "max_tokens": 2})
            too_big = await c.post("/v1/completions", json={**ORDINARY[2], "n": 3})
            done = await first
            after = await c.post("/v1/completions", json=ORDINARY[2])
            return busy, busy_stream, too_big, done, after

    busy, busy_stream, too_big, done, after = asyncio.run(main())
    for r in (busy, busy_stream):
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]
    _assert_400(too_big, "n", "at most 2")
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 400
    assert after.status_code == 200 and ctx.pending_seqs == 0
    with pytest.raises(ValueError, match="max_pending_seqs"):
        create_app(engine, max_pending_seqs=0)


def test_cors_only_when_asked(served):
    engine, _ = served
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}

    async def main(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return (await c.options("/v1/completions", headers=preflight),
                    await c.get("/health", headers={"Origin": "https://app.example"}),
                    await c.get("/health", headers={"Origin": "https://evil.example"}))

    pre, simple, other = asyncio.run(main(create_app(engine, allowed_origins=["https://app.example"])))
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert simple.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers
    _, plain, _ = asyncio.run(main(create_app(engine)))
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


# short names: the tiny tokenizer spends about a token per character
WEATHER = {"type": "function", "function": {"name": "w", "parameters": {
    "type": "object", "properties": {"c": {"enum": ["P", "R"]}}, "required": ["c"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "t", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}


# (the tiny tokenizer spells the tool prompt in many tokens: one tool shown per request fits its 512-token context)
@pytest.mark.parametrize("tools,tool_choice", [([WEATHER], "required"),
                                               ([WEATHER, TIME], {"type": "function", "function": {"name": "t"}})])
def test_tool_choice_is_enforced(served, tools, tool_choice):
    body = {"model": MODEL, "messages": MESSAGES[1:], "max_tokens": 40, "temperature": 0.9, "seed": 4,
            "tools": tools, "tool_choice": tool_choice}
    (r,) = _run(served[1], [("POST", "/v1/chat/completions", body)])
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    calls = choice["message"]["tool_calls"]
    names = [c["function"]["name"] for c in calls]
    assert names == ["t"] if isinstance(tool_choice, dict) else set(names) == {"w"}
    for c in calls:
        args = json.loads(c["function"]["arguments"])
        assert args == {} if c["function"]["name"] == "t" else args["c"] in ("P", "R")


def test_llm_chat_renders_tools_as_the_server_does(tiny_model):
    from stablelm_fast import LLM, SamplingParams
    from stablelm_fast.tool_calls import TOOLS_HEADER

    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=32)
    out = llm.chat([{"role": "user", "content": "Weather in Rome?"}], SamplingParams(max_tokens=2), tools=[WEATHER])
    assert TOOLS_HEADER in out[0].prompt and '"name": "w"' in out[0].prompt


def test_metrics_in_prometheus_format(served):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
    rs = _run(served[1], [("POST", "/v1/completions", body), ("POST", "/v1/completions", body),
                          ("GET", "/metrics", None)])
    assert rs[0].status_code == 200 and rs[2].status_code == 200
    text = rs[2].text
    assert rs[2].headers["content-type"].startswith("text/plain")
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    label = f'model_name="{MODEL}"'
    assert values[f"vllm:generation_tokens_total{{{label}}}"] >= 6
    assert values[f'vllm:request_success_total{{finished_reason="length",{label}}}'] >= 2
    assert values[f"vllm:time_to_first_token_seconds_count{{{label}}}"] >= 2
    assert values[f"vllm:time_per_output_token_seconds_count{{{label}}}"] >= 2  # 3 tokens each: 2 gaps
    assert values[f"vllm:num_requests_running{{{label}}}"] == 0 and values[f"vllm:num_requests_waiting{{{label}}}"] == 0
    assert 0 <= values[f"vllm:kv_cache_usage_perc{{{label}}}"] < 1  # finished requests hold no blocks


def test_periodic_stats_log(tiny_model, monkeypatch, caplog):
    import logging

    from stablelm_fast import LLM, SamplingParams
    from stablelm_fast.engine import stats

    monkeypatch.setattr(stats, "LOG_INTERVAL_S", 0.0)
    llm = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=16, disable_log_stats=False)
    with caplog.at_level(logging.INFO, logger="stablelm_fast.engine"):
        llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, ignore_eos=True))
    lines = [r.getMessage() for r in caplog.records if "generation throughput" in r.getMessage()]
    assert lines and "Running:" in lines[-1] and "KV cache usage" in lines[-1]
