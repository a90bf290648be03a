"""POST /tokenize and /detokenize (vLLM's shapes): a prompt or chat messages -> token ids, token ids -> text."""

from __future__ import annotations

from fastapi.responses import JSONResponse, Response

from stablelm_fast.server.errors import APIError
from stablelm_fast.server.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from stablelm_fast.server.serving import Endpoint
from stablelm_fast.server.serving_chat import render_chat


class ServingTokenization(Endpoint):
    async def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> Response:
        """-> {"count", "max_model_len", "tokens", "token_strs"}. Chat messages are rendered exactly as
        /v1/chat/completions renders them (template, tools), so `count` is that request's prompt_tokens."""
        ctx = self.ctx
        ctx.check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            text, _ = render_chat(ctx.tokenizer, req)
        else:
            text = req.prompt
        ids = ctx.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        # NOTE: token_strs are the tokens' decoded texts (vLLM gives the vocabulary's raw token strings)
        strs = [ctx.token_text(t) for t in ids] if req.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids,
                             "token_strs": strs})

    async def detokenize(self, req: DetokenizeRequest) -> Response:
        """-> {"prompt": text}; 400 for an id outside the vocabulary (the tokenizer would skip it silently)."""
        ctx = self.ctx
        ctx.check_model(req.model)
        vocab = ctx.tokenizer.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
        return JSONResponse({"prompt": ctx.tokenizer.decode(req.tokens, skip_special_tokens=False)})
