"""POST /v1/chat/completions: a chat template, tools in StableLM 2 12B Chat's format, whole or streamed."""

from __future__ import annotations

import dataclasses
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, Response

from stablelm_fast import tool_calls as tc
from stablelm_fast.server.engine_client import ServerTokenizer
from stablelm_fast.server.errors import APIError
from stablelm_fast.server.protocol import ChatCompletionRequest, TokenizeChatRequest, now, random_id
from stablelm_fast.server.serving import Endpoint, chunk_body, finish_reason, usage
from stablelm_fast.server.streaming import Fanin, Receive, SSEResponse, collect, sse, sse_events


# variables the server itself hands the template: chat_template_kwargs may not replace them
_TEMPLATE_RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})


def render_chat(tokenizer: ServerTokenizer, req: ChatCompletionRequest | TokenizeChatRequest) -> tuple[str, list[dict]]:
    """A chat request's messages (with its tools, in the 12B's format) through the chat template -> (prompt text,
    the tools shown to the model). With continue_final_message the text ends right after the last message's content
    (no end-of-turn), so the model continues it. 400 for anything the request or the template refuses."""
    kwargs = req.chat_template_kwargs or {}
    clash = sorted(_TEMPLATE_RESERVED & set(kwargs))
    if clash:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(clash)}", "chat_template_kwargs")
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt set to false",
                       "continue_final_message")
    tools_raw = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        tools = tc.select_tools(tools_raw, req.tool_choice)
    except ValueError as e:
        raise APIError(400, str(e), "tool_choice") from None
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    for m, orig in zip(messages, req.messages):  # keep tool-call dumps ordered as given
        if orig.tool_calls:
            m["tool_calls"] = [c.model_dump() for c in orig.tool_calls]
    try:
        rendered = tc.render_messages(messages, tools)
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=req.add_generation_prompt, **kwargs)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), "messages") from None
    if req.continue_final_message:
        last = rendered[-1]["content"]
        end = text.rfind(last) if last else -1
        if end < 0:
            raise APIError(400, "continue_final_message: the final message is empty or the chat template does not "
                           "show its content", "continue_final_message")
        text = text[:end + len(last)]
    return text, tools


class ServingChat(Endpoint):
    async def create(self, req: ChatCompletionRequest, receive: Receive) -> Response:
        ctx = self.ctx
        model = ctx.begin(req.model)
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
            if not 0 <= req.top_logprobs <= 20:
                raise APIError(400, "top_logprobs must be an integer in [0, 20]", "top_logprobs")
        top = req.top_logprobs or 0
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = ctx.make_params(req, max_tokens, top if req.logprobs else None)
        text, tools = render_chat(ctx.tokenizer, req)
        if tools and (req.tool_choice == "required" or isinstance(req.tool_choice, dict)):
            # an enforced call: the reply is constrained to the calls' JSON schema
            if params.structured_outputs is not None:
                raise APIError(400, "tool_choice 'required' or a named function cannot be combined with another "
                                    "structured-output constraint", "tool_choice")
            # one call for a named function, or when parallel_tool_calls is false (OpenAI: at most one call)
            single = isinstance(req.tool_choice, dict) or req.parallel_tool_calls is False
            schema = tc.forced_calls_schema(tools, single=single)
            params = dataclasses.replace(params, structured_outputs={"json": schema})
        ids = ctx.tokenizer.encode(text, add_special_tokens=False)
        inp = dataclasses.replace(ctx.prepare_prompt(ids, params, "messages"), prompt=text)
        rid, created = random_id("chatcmpl"), now()
        fanin = ctx.start([(inp, inp.params, rid)], req.request_timeout)
        tool_names = {(t.get("function") or {}).get("name") for t in tools} if tools else None
        if not req.stream:
            return await self._whole(req, model, rid, created, len(ids), tool_names, fanin, receive)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        completion_tokens: dict[int, int] = {}

        def tail() -> list[str]:
            if not include_usage:
                return []
            return [sse(chunk_body("chat.completion.chunk", rid, created, model, [],
                                   usage(len(ids), sum(completion_tokens.values())), True))]

        chunks = self._chunks(req, model, rid, created, tool_names, fanin, include_usage, completion_tokens)
        return SSEResponse(sse_events(chunks, tail), fanin.close)

    async def _whole(self, req: ChatCompletionRequest, model: str, rid: str, created: int, prompt_tokens: int,
                     tool_names: set[str] | None, fanin: Fanin, receive: Receive) -> Response:
        finals = await collect(fanin, receive, 1)
        if finals is None:
            return Response(status_code=499)
        out = finals[0]
        choices = []
        for c in out.outputs:
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            reason = finish_reason(c.finish_reason)
            content, calls = tc.parse_reply(c.text, tool_names) if tool_names is not None else (c.text, None)
            if calls:  # text before (or after) the calls is kept as content
                message = {"role": "assistant", "content": content if content.strip() else None, "tool_calls": calls}
                reason = "tool_calls"
            lp = self._logprobs(c.token_ids, c.logprobs or [], req.top_logprobs or 0) if req.logprobs else None
            choices.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": reason})
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                             "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})

    async def _chunks(self, req: ChatCompletionRequest, model: str, rid: str, created: int,
                      tool_names: set[str] | None, fanin: Fanin, include_usage: bool,
                      completion_tokens: dict[int, int]) -> AsyncIterator[str]:
        """A role chunk first, then content deltas and tool-call deltas (a call's id, type and name, then fragments
        of its arguments; text that may begin a call is held back until it is known), then the finish."""
        top = req.top_logprobs or 0
        parsers: dict[int, tc.StreamingToolParser] = {}
        sent_text: dict[int, int] = {}
        sent_lps: dict[int, int] = {}

        def chunk(i: int, delta: dict, lp: dict | None = None, reason: str | None = None) -> str:
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
            return sse(chunk_body("chat.completion.chunk", rid, created, model, [choice], None, include_usage))

        async for _, out in fanin:
            for c in out.outputs:
                i = c.index
                if i not in sent_text:
                    sent_text[i] = 0
                    sent_lps[i] = 0
                    parsers[i] = tc.StreamingToolParser(tool_names)
                    yield chunk(i, {"role": "assistant", "content": ""})
                prev = sent_text[i]
                delta = c.text[prev:] if len(c.text) > prev else ""
                sent_text[i] = max(prev, len(c.text))
                completion_tokens[i] = len(c.token_ids)
                lp = None
                if req.logprobs:
                    lp = self._logprobs(c.token_ids[sent_lps[i]:], (c.logprobs or [])[sent_lps[i]:], top)
                    sent_lps[i] = len(c.logprobs or [])
                reason = finish_reason(c.finish_reason)
                call_deltas, complete = [], False
                if tool_names is not None:
                    delta, call_deltas = parsers[i].feed(delta)
                    if reason is not None:
                        rest, last, complete = parsers[i].finish()
                        delta, call_deltas = delta + rest, call_deltas + last
                if delta or (lp and lp["content"]):
                    yield chunk(i, {"content": delta}, lp)
                for d in call_deltas:
                    yield chunk(i, {"tool_calls": [d]})
                if reason is not None:
                    yield chunk(i, {}, None, "tool_calls" if complete else reason)

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]], top: int) -> dict:
        """OpenAI's chat logprobs: per token its text, logprob, bytes and the `top` alternatives."""
        token_text = self.ctx.token_text
        content = []
        for tid, lp in zip(token_ids, logprobs):
            text = token_text(tid)
            ranked = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
            content.append({"token": text, "logprob": lp.get(tid), "bytes": list(text.encode("utf-8")),
                            "top_logprobs": [{"token": token_text(t), "logprob": v,
                                              "bytes": list(token_text(t).encode("utf-8"))} for t, v in ranked]})
        return {"content": content}
