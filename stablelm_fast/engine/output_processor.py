"""OutputProcessor: what happens to a sampled token. Detokenize, check stops and limits, finish, build outputs.

The engine loop hands it each sequence's new token; it owns the stop rules (eos, stop_token_ids, stop strings with
the text cut before them, or after them with include_stop_str_in_output; max_tokens, max_model_len, min_tokens), the
final text, and RequestOutput construction.
"""

from __future__ import annotations

import time

import torch

from stablelm_fast.engine.scheduler import Scheduler
from stablelm_fast.engine.sequence import Request, Sequence
from stablelm_fast.outputs import CompletionOutput, RequestOutput
from stablelm_fast.sampling_params import SamplingParams
from stablelm_fast.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, scheduler: Scheduler) -> None:
        self.tokenizer, self.max_model_len, self.scheduler = tokenizer, max_model_len, scheduler

    def banned_token_ids(self, params: SamplingParams) -> list[int]:
        """Tokens masked while fewer than min_tokens are out: eos (unless ignore_eos) and stop_token_ids."""
        if params.min_tokens == 0:
            return []
        banned = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            banned |= self.tokenizer.eos_token_ids
        return sorted(banned)

    def append_token(self, req: Request, seq: Sequence, token: int, logprobs: dict[int, float] | None,
                     now: float) -> None:
        seq.token_ids.append(token)
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise RuntimeError(f"structured outputs: token {token} was sampled outside the grammar")
        if seq.first_token_time is None:
            seq.first_token_time = now
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
        if seq.logprobs is not None and logprobs is not None:
            seq.logprobs.append(logprobs)
        p = seq.params
        prev_len = len(seq.text)
        if seq.detokenizer is not None:
            seq.detokenizer.add(token)
            seq.text = seq.detokenizer.text
        num_out = seq.num_output_tokens
        if num_out >= p.min_tokens:
            if not p.ignore_eos and token in self.tokenizer.eos_token_ids:
                return self.finish(seq, "stop", token, strip_token=True)
            if p.stop_token_ids and token in p.stop_token_ids:
                return self.finish(seq, "stop", token, strip_token=not p.include_stop_str_in_output)
            if p.stop_strings:
                # only the tail can hold a new match: the new text and the longest stop string before it
                start = max(0, prev_len - max(len(s) for s in p.stop_strings))
                for stop in p.stop_strings:
                    at = seq.text.find(stop, start)
                    if at != -1:
                        seq.text = seq.text[:at + len(stop) if p.include_stop_str_in_output else at]
                        return self.finish(seq, "stop", stop)
        if seq.matcher is not None and seq.matcher.is_terminated():  # the constraint is complete
            return self.finish(seq, "stop", token, strip_token=token in self.tokenizer.eos_token_ids)
        if num_out >= (p.max_tokens or 0) or seq.num_tokens >= self.max_model_len:
            self.finish(seq, "length", None)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None, strip_token: bool = False) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.detokenizer is not None and reason != "abort" and not isinstance(stop_reason, str):
            # final text: flush a trailing partial character; the eos / stop token itself is not part of the text
            # (it is kept in token_ids, as vLLM does). A stop string already cut the text.
            ids = seq.output_token_ids[:-1] if strip_token else seq.output_token_ids
            seq.text = self.tokenizer.decode(ids, seq.params.skip_special_tokens)
        self.scheduler.finish(seq)

    def append_prompt_logprobs(self, req: Request, seq: Sequence, first_position: int, logits: torch.Tensor) -> None:
        """logits: [R, vocab] fp32 at prompt positions first_position ... first_position + R - 1, which predict
        prompt tokens first_position + 1 ... (vLLM's prompt_logprobs: the actual token plus the top-k)."""
        if seq.index != 0 or req.prompt_logprobs is None:  # n > 1: every sequence computes the prompt; keep one
            return
        top = seq.params.prompt_logprobs or 0
        lps = logits.log_softmax(dim=-1)
        targets = torch.tensor(seq.token_ids[first_position + 1: first_position + 1 + lps.shape[0]],
                               device=lps.device)
        chosen = lps.gather(1, targets[:, None])[:, 0].tolist()
        top_vals, top_ids = lps.topk(top, dim=-1) if top > 0 else (None, None)
        for r, (t, lp) in enumerate(zip(targets.tolist(), chosen)):
            entry = {t: lp}
            if top_ids is not None:
                for tid, v in zip(top_ids[r].tolist(), top_vals[r].tolist()):
                    entry.setdefault(tid, v)
            req.prompt_logprobs.append(entry)

    def make_output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            text = seq.text
            if not seq.is_finished and seq.params.stop_strings:
                # NOTE: hold back a possible partial stop string so that streamed text is never taken back.
                hold = max(len(s) for s in seq.params.stop_strings) - 1
                text = text[: max(0, len(text) - hold)]
            outs.append(CompletionOutput(index=seq.index, text=text, token_ids=list(seq.output_token_ids),
                                         finish_reason=seq.finish_reason,
                                         logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                                         stop_reason=seq.stop_reason))
        req.metrics.num_output_tokens = max(s.num_output_tokens for s in req.seqs)
        if req.finished and req.metrics.finished_time is None:
            req.metrics.finished_time = time.monotonic()
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             outputs=outs, finished=req.finished, metrics=req.metrics,
                             num_cached_tokens=max(s.num_cached_prompt_tokens for s in req.seqs),
                             prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None)
