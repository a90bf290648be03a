"""The server app mounted inside another ASGI app (FastAPI and plain Starlette), driven in-process."""

import asyncio

import httpx
import openai
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from stablelm_fast import AsyncLLM
from stablelm_fast.server import EngineClient, create_app
from stablelm_fast.tiny import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("server")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-mount")), "stablelm-2-12b", seed=1)
    engine = AsyncLLM(model_dir, dtype="float32", backend="torch")
    assert isinstance(engine, EngineClient)
    yield engine
    engine.shutdown()


def _fastapi_host(llm_app):
    host = FastAPI()

    @host.get("/")
    async def root():
        return {"host": "mine"}

    host.mount("/llm", llm_app)
    return host


def _starlette_host(llm_app):
    async def root(_):
        return PlainTextResponse("mine")

    return Starlette(routes=[Route("/", root), Mount("/llm", app=llm_app)])


@pytest.mark.parametrize("make_host", [_fastapi_host, _starlette_host])
def test_mounted(engine, make_host):
    host = make_host(create_app(engine, served_model_name="m"))

    async def main():
        transport = httpx.ASGITransport(app=host)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as raw:
            assert (await raw.get("/")).status_code == 200
            assert (await raw.get("/llm/health")).json() == {"status": "ok"}
            r = await raw.post("/llm/v1/completions", json={"model": "other", "prompt": "x"})
            assert r.status_code == 404 and r.json()["error"]["code"] == 404
        async with openai.AsyncOpenAI(api_key="x", base_url="http://test/llm/v1",
                                      http_client=httpx.AsyncClient(transport=transport)) as client:
            assert [m.id for m in (await client.models.list()).data] == ["m"]
            kw = dict(model="m", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0,
                      extra_body={"ignore_eos": True})
            ref = await client.chat.completions.create(**kw)
            text = ""
            async for chunk in await client.chat.completions.create(stream=True, **kw):
                text += chunk.choices[0].delta.content or ""
            assert text == ref.choices[0].message.content and ref.usage.completion_tokens == 6
            r = await client.completions.create(model="m", prompt=["a", "b"], max_tokens=3)
            assert len(r.choices) == 2

    asyncio.run(main())
