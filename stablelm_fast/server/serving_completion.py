"""POST /v1/completions: prompts (text, token ids, or lists of either) x n choices, whole or streamed."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi.responses import JSONResponse, Response

from stablelm_fast.engine.input_processor import ProcessedPrompt
from stablelm_fast.server.errors import APIError
from stablelm_fast.server.protocol import MAX_PROMPTS, CompletionRequest, now, random_id
from stablelm_fast.server.serving import Endpoint, chunk_body, finish_reason, usage
from stablelm_fast.server.streaming import Fanin, Receive, SSEResponse, collect, sse, sse_events


def split_prompts(raw: str | list) -> list[str | list[int]]:
    """The request's `prompt` as a list of prompts (a list of ints is one tokenized prompt)."""
    if isinstance(raw, str):
        return [raw]
    if raw and all(isinstance(p, int) for p in raw):
        return [raw]
    return list(raw)


class ServingCompletion(Endpoint):
    async def create(self, req: CompletionRequest, receive: Receive) -> Response:
        ctx = self.ctx
        model = ctx.begin(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (only best_of == n)", "best_of")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise APIError(400, "logprobs must be an integer in [0, 20]", "logprobs")
        params = ctx.make_params(req, req.max_tokens, req.logprobs)
        prompts = split_prompts(req.prompt)
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request; got {len(prompts)}", "prompt")
        inputs = [ctx.prepare_prompt(p, params, "prompt") for p in prompts]
        rid, created = random_id("cmpl"), now()
        jobs = [(inp, inp.params, f"{rid}-{i}") for i, inp in enumerate(inputs)]
        fanin = ctx.start(jobs, req.request_timeout)
        if not req.stream:
            return await self._whole(req, model, rid, created, inputs, fanin, receive)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        prompt_tokens = sum(len(i.prompt_token_ids) for i in inputs)
        completion_tokens: dict[tuple[int, int], int] = {}

        def tail() -> list[str]:
            if not include_usage:
                return []
            return [sse(chunk_body("text_completion", rid, created, model, [],
                                   usage(prompt_tokens, sum(completion_tokens.values())), True))]

        chunks = self._chunks(req, model, rid, created, inputs, fanin, include_usage, completion_tokens)
        return SSEResponse(sse_events(chunks, tail), fanin.close)

    def _echo_text(self, req: CompletionRequest, inp: ProcessedPrompt) -> str:
        if not req.echo:
            return ""
        return inp.prompt if inp.prompt is not None else self.ctx.tokenizer.decode(inp.prompt_token_ids)

    async def _whole(self, req: CompletionRequest, model: str, rid: str, created: int,
                     inputs: list[ProcessedPrompt], fanin: Fanin, receive: Receive) -> Response:
        finals = await collect(fanin, receive, len(inputs))
        if finals is None:
            return Response(status_code=499)
        choices, completion_tokens = [], 0
        for p_index, out in enumerate(finals):
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                prefix = self._echo_text(req, inputs[p_index])
                lp = (self._logprobs(c.token_ids, c.logprobs or [], len(prefix), req.logprobs)
                      if req.logprobs is not None else None)
                choices.append({"index": p_index * req.n + c.index, "text": prefix + c.text, "logprobs": lp,
                                "finish_reason": finish_reason(c.finish_reason), "stop_reason": c.stop_reason})
        prompt_tokens = sum(len(i.prompt_token_ids) for i in inputs)
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})

    async def _chunks(self, req: CompletionRequest, model: str, rid: str, created: int,
                      inputs: list[ProcessedPrompt], fanin: Fanin, include_usage: bool,
                      completion_tokens: dict[tuple[int, int], int]) -> AsyncIterator[str]:
        """One event per new piece of text (or logprobs, or the finish) of a choice; counts tokens as it goes."""
        sent_text: dict[tuple[int, int], int] = {}
        sent_lps: dict[tuple[int, int], int] = {}
        lp_offset: dict[tuple[int, int], int] = {}
        async for p_index, out in fanin:
            echo = self._echo_text(req, inputs[p_index])
            for c in out.outputs:
                key = (p_index, c.index)
                first = key not in sent_text
                prev = sent_text.get(key, 0)
                delta = c.text[prev:] if len(c.text) > prev else ""
                if first:
                    delta = echo + delta
                lp = None
                if req.logprobs is not None:
                    start = sent_lps.get(key, 0)
                    lp = self._logprobs(c.token_ids[start:], (c.logprobs or [])[start:],
                                        lp_offset.get(key, len(echo)), req.logprobs)
                    lp_offset[key] = (lp["text_offset"][-1] + len(lp["tokens"][-1]) if lp["tokens"]
                                      else lp_offset.get(key, len(echo)))
                    sent_lps[key] = len(c.logprobs or [])
                sent_text[key] = max(prev, len(c.text))
                completion_tokens[key] = len(c.token_ids)
                reason = finish_reason(c.finish_reason)
                if delta or reason is not None or (lp and lp["tokens"]):
                    choice = {"index": p_index * req.n + c.index, "text": delta, "logprobs": lp,
                              "finish_reason": reason, "stop_reason": c.stop_reason if reason else None}
                    yield sse(chunk_body("text_completion", rid, created, model, [choice], None, include_usage))

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]], offset: int, top: int) -> dict:
        """OpenAI's completion logprobs: tokens, their logprobs, the top alternatives, text offsets from `offset`."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, lp in zip(token_ids, logprobs):
            text = self.ctx.token_text(tid)
            tokens.append(text)
            token_lps.append(lp.get(tid))
            ranked = sorted(lp.items(), key=lambda kv: -kv[1])[: max(top, 1)]
            tops.append({self.ctx.token_text(t): v for t, v in ranked})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
