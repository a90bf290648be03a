"""The server through real sockets (uvicorn in a thread) and the official `openai` client: sampling extras
(logit_bias, include_stop_str_in_output), structured outputs sampled at temperature 1, enforced and streamed tool
calls, exact /metrics deltas, the queue cap, per-request deadlines, and abuse answered at once.
One server for the module, on a tiny random-weight model."""

import asyncio
import concurrent.futures
import json
import os
import threading
import time

import httpx
import openai
import pytest

from stablelm_fast import AsyncLLM
from stablelm_fast.cli import build_parser
from stablelm_fast.server import create_app
from stablelm_fast.tiny import CHATML_TEMPLATE, make_tiny_checkpoint
from tests.checkpoints import update_json

from live_server import LiveServer

pytestmark = pytest.mark.xdist_group("server")

MODEL = "m"
MAX_PENDING = 4  # sequences the app admits at once (the queue cap)
MESSAGES = [{"role": "user", "content": "Hi there!"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    model_dir = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-live")), "stablelm-2-1_6b", seed=3)
    update_json(os.path.join(model_dir, "tokenizer_config.json"), chat_template=CHATML_TEMPLATE)
    # room for a tool prompt (random weights anyway)
    update_json(os.path.join(model_dir, "config.json"), max_position_embeddings=1024)
    engine = AsyncLLM(model_dir, dtype="float32", backend="torch", disable_log_stats=True)
    app = create_app(engine, served_model_name=MODEL, max_pending_seqs=MAX_PENDING)
    with LiveServer(app) as url:
        yield engine, app, url
    engine.shutdown()


@pytest.fixture()
def client(live):
    with openai.OpenAI(base_url=live[2] + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


def _bad_request(call, param, *words):
    with pytest.raises(openai.BadRequestError) as e:
        call()
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    for w in words:
        assert w in e.value.body["message"], e.value.body


def test_logit_bias(live, client):
    tok = live[0].tokenizer
    vocab = live[0].input_processor.vocab_size
    base = dict(model=MODEL, prompt=[5, 6, 7], max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    free = client.completions.create(**base).choices[0].text
    target = next(t for t in (11, 12, 13) if tok.decode([t]) not in free)
    forced = client.completions.create(**base, logit_bias={str(target): 100}).choices[0].text
    assert forced == tok.decode([target] * 4)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0,
                                          logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == tok.decode([target] * 3)
    _bad_request(lambda: client.completions.create(**base, logit_bias={"x": 1}), "logit_bias", "token ids")
    _bad_request(lambda: client.completions.create(**base, logit_bias={"5": 101}), "logit_bias", "[-100, 100]")
    _bad_request(lambda: client.completions.create(**base, logit_bias={str(vocab): 1}), "logit_bias", "vocabulary")


@pytest.mark.parametrize("stream", [False, True])
def test_include_stop_str_in_output(client, stream):
    base = dict(model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=0,
                extra_body={"ignore_eos": True})
    free = client.completions.create(**base).choices[0].text
    stop = free[len(free) // 2: len(free) // 2 + 2]
    assert stop
    at = free.index(stop)
    for include, want in ((False, free[:at]), (True, free[:at + len(stop)])):
        kw = dict(base, stop=[stop], stream=stream, extra_body={"ignore_eos": True,
                                                                "include_stop_str_in_output": include})
        if stream:
            chunks = list(client.completions.create(**kw))
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            choice = client.completions.create(**kw).choices[0]
            text, reason = choice.text, choice.finish_reason
        assert text == want and reason == "stop"


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"},
                                           "tag": {"enum": ["a", "b"]}},
          "required": ["ok", "n", "tag"], "additionalProperties": False}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_sampled_at_temperature_1_validates(client, seed):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=80, temperature=1.0, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"ok", "n", "tag"} and isinstance(value["ok"], bool)
    assert isinstance(value["n"], int) and not isinstance(value["n"], bool) and value["tag"] in ("a", "b")


# short names: the tiny tokenizer spends about a token per character
WEATHER = {"type": "function", "function": {"name": "w", "parameters": {
    "type": "object", "properties": {"c": {"enum": ["P", "R"]}, "d": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["c", "d"],
    "additionalProperties": False}}}


def _check_weather_call(name, arguments):
    args = json.loads(arguments)
    assert name == "w" and set(args) == {"c", "d"} and args["c"] in ("P", "R") and 0 <= args["d"] <= 99


@pytest.mark.parametrize("seed", [1, 2])
def test_tool_choice_required_whole_and_streamed(client, seed):
    # parallel_tool_calls=False: one call (a random model would otherwise go on adding calls)
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=1.0, seed=seed, tools=[WEATHER],
              tool_choice="required", parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and len(whole.message.tool_calls) == 1
    for call in whole.message.tool_calls:
        _check_weather_call(call.function.name, call.function.arguments)
    calls, fragments, reasons = {}, 0, []
    for chunk in client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                if d.id is not None:  # a call's first delta: id, type and name, no arguments yet
                    assert d.index not in calls and d.type == "function" and d.function.arguments == ""
                    calls[d.index] = [d.function.name, ""]
                else:
                    assert d.function.name is None and d.function.arguments
                    calls[d.index][1] += d.function.arguments
                    fragments += 1
            reasons += [choice.finish_reason] if choice.finish_reason else []
    assert reasons == ["tool_calls"] and calls and fragments > len(calls)  # arguments came in several pieces
    for name, arguments in calls.values():
        _check_weather_call(name, arguments)
    # the same seed: the streamed calls are the whole answer's
    assert [(n, json.loads(a)) for n, a in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]


def _metrics(url):
    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _wait_idle(engine, timeout=30.0):
    deadline = time.monotonic() + timeout
    while engine.engine.requests or engine.stats().kv_cache_usage > 0:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.02)


def test_request_timeout_aborts_in_the_engine_and_others_go_on(live, client, monkeypatch):
    engine, app, url = live
    gate, step = threading.Event(), engine.engine.step

    def gated_step():  # the engine stalls until the gate opens: the deadlines pass for certain
        gate.wait(30)
        return step()

    monkeypatch.setattr(engine.engine, "step", gated_step)
    before = _metrics(url)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    ordinary = pool.submit(client.completions.create, model=MODEL, prompt="Hello", max_tokens=3,
                           extra_body={"ignore_eos": True})
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, extra_body={"request_timeout": 0.2})
        assert e.value.status_code == 504 and e.value.body["param"] == "request_timeout"
        assert "deadline (0.2 s)" in e.value.body["message"]
        with pytest.raises(openai.APIError, match="deadline"):  # streamed: an error event after the headers
            for _ in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, stream=True,
                                                    extra_body={"request_timeout": 0.2}):
                pass
        # the server's own deadline (create_app(request_timeout=...)) wins over a longer one asked for
        capped = create_app(engine, served_model_name=MODEL, request_timeout=0.2)

        async def ask():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=capped), base_url="http://t") as c:
                return await c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3,
                                                             "request_timeout": 100})

        r = asyncio.run(ask())
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        assert not ordinary.done()
    finally:
        gate.set()
    assert ordinary.result(timeout=30).usage.completion_tokens == 3  # the request without a deadline was served
    _wait_idle(engine)  # the timed-out requests were aborted in the engine and their KV blocks freed
    after = _metrics(url)
    label = f'model_name="{MODEL}"'
    assert after[f'vllm:request_success_total{{finished_reason="abort",{label}}}'] - \
        before.get(f'vllm:request_success_total{{finished_reason="abort",{label}}}', 0) == 3
    assert after[f'vllm:request_success_total{{finished_reason="length",{label}}}'] - \
        before.get(f'vllm:request_success_total{{finished_reason="length",{label}}}', 0) == 1
    with pytest.raises(ValueError, match="request_timeout"):
        create_app(engine, request_timeout=0)
    assert build_parser().parse_args(["serve", "m", "--request-timeout", "2.5"]).request_timeout == 2.5
    _bad_request(lambda: client.completions.create(model=MODEL, prompt="Hi", extra_body={"request_timeout": -1}),
                 "request_timeout")


def test_metrics_move_by_exactly_what_a_request_did(live, client):
    engine, _, url = live
    _wait_idle(engine)
    before = _metrics(url)
    prompt = [40, 41, 42, 43, 44, 45, 46]  # used by no other test: nothing of it is in the prefix cache
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens == 7 and out.usage.completion_tokens == 5
    after = _metrics(url)
    label = f'model_name="{MODEL}"'

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    assert delta(f"vllm:prompt_tokens_total{{{label}}}") == 7
    assert delta(f"vllm:generation_tokens_total{{{label}}}") == 5
    assert delta(f'vllm:request_success_total{{finished_reason="length",{label}}}') == 1
    for other in ("stop", "abort"):
        assert delta(f'vllm:request_success_total{{finished_reason="{other}",{label}}}') == 0
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
                 "request_prompt_tokens"):
        assert delta(f"vllm:{hist}_count{{{label}}}") == 1, hist
    assert delta(f"vllm:request_prompt_tokens_sum{{{label}}}") == 7
    assert after[f"vllm:num_requests_running{{{label}}}"] == 0 and after[f"vllm:num_requests_waiting{{{label}}}"] == 0
    assert after[f"vllm:kv_cache_usage_perc{{{label}}}"] == 0


ORDINARY = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}


def test_a_flood_past_the_queue_cap_is_turned_away_and_nothing_hangs(live, client, monkeypatch):
    engine, app, url = live
    gate, step = threading.Event(), engine.engine.step

    def gated_step():  # the engine stalls until the gate opens: the admitted requests stay pending for certain
        gate.wait(30)
        return step()

    monkeypatch.setattr(engine.engine, "step", gated_step)
    ctx = app.state.serving
    pool = concurrent.futures.ThreadPoolExecutor(8)
    try:
        admitted = [pool.submit(client.completions.create, model=MODEL, prompt="Hello", max_tokens=4,
                                extra_body={"ignore_eos": True}) for _ in range(MAX_PENDING)]
        deadline = time.monotonic() + 30
        while ctx.pending_seqs < MAX_PENDING:
            assert time.monotonic() < deadline and not any(f.done() for f in admitted)
            time.sleep(0.01)
        flood = [pool.submit(httpx.post, url + "/v1/completions", json=ORDINARY, timeout=30) for _ in range(6)]
        flood.append(pool.submit(httpx.post, url + "/v1/chat/completions", timeout=30,
                                 json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "stream": True}))
        for f in flood:  # answered at once, while the engine is stalled
            r = f.result(timeout=30)
            assert r.status_code in (429, 503) and r.headers["retry-after"] and "busy" in r.json()["error"]["message"]
    finally:
        gate.set()
    for f in admitted:
        assert f.result(timeout=30).usage.completion_tokens == 4
    _wait_idle(engine)
    assert ctx.pending_seqs == 0
    assert httpx.post(url + "/v1/completions", json=ORDINARY, timeout=30).json()["usage"]["completion_tokens"] == 3


ABUSE = [
    ("huge n", {**ORDINARY, "n": 100000}, "n"),
    ("n past the queue cap", {**ORDINARY, "n": MAX_PENDING + 1}, "n"),
    ("too many prompts", {**ORDINARY, "prompt": ["Hi"] * 1000}, "prompt"),
    ("JSON nested 100,000 deep", b'{"model": "m", "prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", None),
    ("a number with 100,000 digits", b'{"model": "m", "prompt": "Hi", "max_tokens": ' + b"9" * 100000 + b"}", None),
    ("max_tokens past the context", {**ORDINARY, "max_tokens": 10**9}, "prompt"),
    ("malformed JSON", b'{"model": "m", "prompt": "Hi",', None),
]


@pytest.mark.parametrize("what,body,param", ABUSE, ids=[a[0] for a in ABUSE])
def test_abuse_gets_a_quick_4xx_and_the_next_request_is_served(live, what, body, param):
    url = live[2]
    with httpx.Client(base_url=url, timeout=30) as c:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = c.post("/v1/completions", **kw)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.json()
        ok = c.post("/v1/completions", json=ORDINARY)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
