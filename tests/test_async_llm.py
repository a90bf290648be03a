"""AsyncLLM: many concurrent streams on one engine loop; aborts free everything and leave the rest correct."""

import asyncio

import pytest

from stablelm_fast import AsyncLLM, LLM, SamplingParams

pytestmark = pytest.mark.xdist_group("async")


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = AsyncLLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=512, block_size=8)
    yield eng
    eng.shutdown()


def _prompts(n):
    return [{"prompt_token_ids": [6 + (i * 7) % 200, 7 + i % 50, 9, 10 + i % 13]} for i in range(n)]


def test_64_streams_finish_and_10_aborts_leak_nothing(engine, tiny_model):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = _prompts(64)
    aborted = set(range(0, 64, 6)[:10])

    async def consume(i):
        chunks = []
        async for out in engine.generate(prompts[i], params, request_id=f"s{i}"):
            chunks.append(out)
            if i in aborted and len(chunks) == 3:
                await engine.abort(f"s{i}")
        return chunks

    async def main():
        return await asyncio.gather(*(consume(i) for i in range(64)))

    results = asyncio.run(main())
    reference = LLM(tiny_model, dtype="float32", backend="torch", num_kv_blocks=512).generate(prompts, params)
    for i, chunks in enumerate(results):
        last = chunks[-1]
        assert last.finished
        lens = [len(c.outputs[0].token_ids) for c in chunks]
        assert lens == sorted(lens)  # cumulative
        if i in aborted:
            assert last.outputs[0].finish_reason == "abort"
            assert len(last.outputs[0].token_ids) < 16
        else:
            assert last.outputs[0].token_ids == reference[i].outputs[0].token_ids
            assert last.outputs[0].finish_reason == "length"
    bm = engine.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.engine.requests


def test_consumer_that_walks_away_frees_its_request(engine):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        gen = engine.generate({"prompt_token_ids": [5, 6, 7]}, params, request_id="walkaway")
        async for _ in gen:
            break
        await gen.aclose()
        for _ in range(100):
            if not engine.engine.requests:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(main())
    bm = engine.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_bad_input_raises_and_engine_keeps_serving(engine):
    async def main():
        with pytest.raises(ValueError, match="empty"):
            async for _ in engine.generate({"prompt_token_ids": []}, SamplingParams()):
                pass
        outs = [o async for o in engine.generate("Hello", SamplingParams(temperature=0, max_tokens=3,
                                                                          ignore_eos=True))]
        return outs[-1]

    last = asyncio.run(main())
    assert last.finished and len(last.outputs[0].token_ids) == 3
