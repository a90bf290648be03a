"""The HTTP server end to end: a real uvicorn on 127.0.0.1 with a tiny checkpoint, driven by the official client."""

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from stablelm_fast import AsyncLLM
from stablelm_fast.server import create_app
from stablelm_fast.tiny import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("server")

MODEL = "tiny-stablelm"
KEY = "test-key"
MAX_BODY = 64 * 1024


class Server:
    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-server")), "stablelm-2-1_6b", seed=0)
    engine = AsyncLLM(model_dir, dtype="float32", backend="torch")
    server = Server(create_app(engine, served_model_name=MODEL, api_key=KEY, max_body_bytes=MAX_BODY))
    yield engine, server
    server.stop()
    engine.shutdown()


@pytest.fixture()
def client(served):
    with openai.OpenAI(api_key=KEY, base_url=served[1].url + "/v1", max_retries=0, timeout=120) as c:
        yield c


def wait_idle(engine, timeout=15.0) -> None:
    """Every request gone from the engine and every KV block free again."""
    bm = engine.engine.block_manager
    deadline = time.monotonic() + timeout
    while engine.engine.has_unfinished_requests() or bm.num_free_blocks != bm.num_blocks:
        assert time.monotonic() < deadline, (f"not idle: {len(engine.engine.requests)} requests, "
                                             f"{bm.num_free_blocks}/{bm.num_blocks} blocks free")
        time.sleep(0.02)


GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


def test_health_and_models(served):
    engine, server = served
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    with openai.OpenAI(api_key=KEY, base_url=server.url + "/v1") as c:
        models = c.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion(client):
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", **GREEDY)
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completion_prompt_forms_n_and_seed(client, served):
    tok = served[0].tokenizer
    by_text = client.completions.create(model=MODEL, prompt="Hello, world", **GREEDY).choices[0].text
    by_ids = client.completions.create(model=MODEL, prompt=tok.encode("Hello, world"), **GREEDY).choices[0].text
    assert by_ids == by_text
    r = client.completions.create(model=MODEL, prompt=["Hello, world", "Paris is"], n=2, max_tokens=4, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == sum(len(tok.encode(c.text)) for c in r.choices) or r.usage.completion_tokens
    again = client.completions.create(model=MODEL, prompt=["Hello, world", "Paris is"], n=2, max_tokens=4, seed=3)
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == \
        [c.text for c in sorted(r.choices, key=lambda c: c.index)]


def test_completion_logprobs_and_stop(client):
    r = client.completions.create(model=MODEL, prompt="Hello", logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 12 and len(lp.token_logprobs) == 12 and all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    full = r.choices[0].text
    stop = full[3:5]
    s = client.completions.create(model=MODEL, prompt="Hello", stop=[stop], **GREEDY)
    assert s.choices[0].finish_reason == "stop" and s.choices[0].text == full[: full.index(stop)]


def test_chat(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Hi!"}],
                                       logprobs=True, top_logprobs=2, max_completion_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant" and c.finish_reason == "length"
    assert isinstance(c.message.content, str) and r.usage.completion_tokens == 6
    assert len(c.logprobs.content) == 6 and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)


def test_streaming_equals_non_streaming(client):
    ref = client.completions.create(model=MODEL, prompt="Once upon a time", **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == ref.usage.prompt_tokens

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ref = client.chat.completions.create(model=MODEL, messages=msgs, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_sse_ends_with_done(served):
    engine, server = served
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    json.loads(events[0][6:])


def test_48_concurrent_streams(served):
    engine, server = served

    async def one(client, i):
        text, reason = "", None
        stream = await client.completions.create(model=MODEL, prompt=f"Request {i}: hello", max_tokens=8,
                                                 stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def main():
        async with openai.AsyncOpenAI(api_key=KEY, base_url=server.url + "/v1", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(48)))

    results = asyncio.run(main())
    assert len(results) == 48 and all(reason == "length" for _, reason in results)
    wait_idle(engine)


def test_error_400_names_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", temperature=-1)
    assert e.value.status_code == 400 and "temperature" in e.value.message
    body = e.value.body
    assert set(body) >= {"message", "type", "code"} and body["code"] == 400
    with pytest.raises(openai.BadRequestError) as e:  # a pydantic type error, same shape
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n="many")
    assert "'n'" in e.value.message and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=3)
    assert "messages" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", extra_body={"top_k": -5})
    assert "top_k" in e.value.message


def test_error_400_over_context(client, served):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=served[0].max_model_len)
    assert "maximum context length" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "fox " * 600}])
    assert "maximum context length" in e.value.message


def test_error_401_404_413(served):
    engine, server = served
    with openai.OpenAI(api_key="wrong-key", base_url=server.url + "/v1", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == 401
    r = httpx.get(server.url + "/v1/models")  # no key at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with openai.OpenAI(api_key=KEY, base_url=server.url + "/v1", max_retries=0) as c:
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
        assert e.value.status_code == 404 and "no-such-model" in e.value.message
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model=MODEL, prompt="x" * (MAX_BODY + 10), max_tokens=2)
        assert e.value.status_code == 413 and e.value.body["code"] == 413
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_disconnect_mid_stream_aborts(served, client):
    engine, server = served
    wait_idle(engine)
    reference = client.completions.create(model=MODEL, prompt="The quick brown fox", **GREEDY).choices[0].text
    steps_before = engine.engine.num_steps
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": "A paged KV cache", "max_tokens": 480, "stream": True,
                            "ignore_eos": True}, timeout=60) as r:
        lines = r.iter_lines()
        got = [line for _, line in zip(range(4), lines)]
        assert any(line.startswith("data: ") for line in got)
    # closed after a few tokens: the request must be aborted well before its 480 tokens, its blocks freed
    wait_idle(engine)
    assert engine.engine.num_steps - steps_before < 400
    again = client.completions.create(model=MODEL, prompt="The quick brown fox", **GREEDY).choices[0].text
    assert again == reference
    wait_idle(engine)


def test_disconnect_non_stream_aborts(served):
    engine, server = served
    wait_idle(engine)
    steps_before = engine.engine.num_steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": MODEL, "prompt": "A paged KV cache", "max_tokens": 480, "ignore_eos": True},
                   timeout=httpx.Timeout(10, read=0.3))
    wait_idle(engine)
    assert engine.engine.num_steps - steps_before < 400


def test_engine_error_fails_request_server_keeps_serving(served, client):
    engine, server = served
    wait_idle(engine)
    executor = engine.engine.executor
    real_execute = executor.execute
    calls = {"n": 0}

    def failing_execute(step):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure")
        return real_execute(step)

    executor.execute = failing_execute
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
        assert e.value.status_code == 500 and "injected failure" in e.value.message
    finally:
        executor.execute = real_execute
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4
    assert httpx.get(server.url + "/health").status_code == 200
    wait_idle(engine)
