"""Batched sampling on the device: penalties, temperature, top-k, top-p, min-p, greedy, seeded sampling, logprobs.

Order (as vLLM): the structured-outputs mask, min_tokens masking, logit_bias and penalties on the raw logits, then
temperature, then top-k / top-p / min-p filters, then sampling. Logprobs are the model's own log-softmax (before any
processing), as vLLM returns them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stablelm_fast.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One row of the batch: the parameters of the sequence and what penalties need."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    banned_token_ids: list[int]  # masked while fewer than min_tokens are out (eos and stop ids)
    allowed: torch.Tensor | None = None  # [vocab] bool: the only tokens it may sample (structured outputs)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place. repetition (prompt + output tokens, HF/vLLM rule), presence and frequency (output tokens)."""
    num_rows, vocab = logits.shape
    device = logits.device
    rep = torch.tensor([r.params.repetition_penalty for r in rows], device=device)
    pres = torch.tensor([r.params.presence_penalty for r in rows], device=device)
    freq = torch.tensor([r.params.frequency_penalty for r in rows], device=device)
    counts = torch.zeros(num_rows, vocab, device=device)
    seen = torch.zeros(num_rows, vocab, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        if r.output_token_ids:
            out = torch.tensor(r.output_token_ids, device=device)
            counts[i].index_add_(0, out, torch.ones(len(out), device=device))
        if r.params.repetition_penalty != 1.0 and r.prompt_token_ids:
            seen[i, torch.tensor(r.prompt_token_ids, device=device)] = True
    seen |= counts > 0
    penalized = torch.where(logits > 0, logits / rep[:, None], logits * rep[:, None])
    logits.copy_(torch.where(seen, penalized, logits))
    logits -= freq[:, None] * counts + pres[:, None] * (counts > 0).float()


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] (already temperature-scaled); top_k: [B] int (vocab = off); top_p, min_p: [B]. -> filtered."""
    vocab = logits.shape[1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    remove = ranks >= top_k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    # NOTE: a token is kept while the mass of the tokens ranked above it is below top_p (the top one always stays).
    remove |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    remove |= probs < (min_p[:, None] * probs[:, :1])
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[dict[int, float] | None]]:
        """logits: [B, V] fp32 -> (sampled token per row, logprobs dict per row or None)."""
        processed = self.process(logits, rows)
        greedy = torch.tensor([r.params.greedy for r in rows], device=logits.device)
        tokens = processed.argmax(dim=-1)
        if not bool(greedy.all()):
            tokens = torch.where(greedy, tokens, self.draw(self.probs(processed, rows), rows))
        token_list = tokens.tolist()
        return token_list, self.logprobs(logits, rows, token_list)

    @staticmethod
    def process(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The logits every later step reads: grammar mask, min_tokens bans, logit_bias and penalties (a copy)."""
        logits = logits.clone()
        for i, r in enumerate(rows):
            if r.allowed is not None:
                logits[i].masked_fill_(~r.allowed.to(logits.device), float("-inf"))
            if r.banned_token_ids and len(r.output_token_ids) < r.params.min_tokens:
                kept = logits[i, r.banned_token_ids].clone()
                logits[i, r.banned_token_ids] = float("-inf")
                if r.allowed is not None and not bool(torch.isfinite(logits[i]).any()):
                    logits[i, r.banned_token_ids] = kept  # the grammar allows only a stop: it wins over min_tokens
            if r.params.logit_bias:
                bias = r.params.logit_bias
                logits[i, list(bias)] += torch.tensor(list(bias.values()), device=logits.device)
        if any(r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty
               for r in rows):
            apply_penalties(logits, rows)
        return logits

    @staticmethod
    def probs(processed: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The distribution a sampled row draws from: temperature, then top-k / top-p / min-p, then softmax."""
        vocab = processed.shape[1]
        device = processed.device
        temp = torch.tensor([r.params.temperature if r.params.temperature > 0 else 1.0 for r in rows], device=device)
        logits = processed / temp[:, None]
        top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in rows], device=device)
        top_p = torch.tensor([r.params.top_p for r in rows], device=device)
        min_p = torch.tensor([r.params.min_p for r in rows], device=device)
        if bool((top_k < vocab).any() or (top_p < 1).any() or (min_p > 0).any()):
            logits = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
        return logits.softmax(dim=-1)

    @staticmethod
    def draw(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """One token per row from probs [B, V] (rows need not be normalized)."""
        num_rows, vocab = probs.shape
        device = probs.device
        # NOTE: the exponential race argmax(p / E), E ~ Exp(1), samples from p without a multinomial sync, and lets
        # each seeded row draw its noise from its own generator, whatever else is in the batch.
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), vocab, device=device).exponential_()
        for i, r in enumerate(rows):
            if r.generator is not None:
                noise[i] = torch.empty(vocab).exponential_(generator=r.generator).to(device)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def logprobs(logits: torch.Tensor, rows: list[SamplingRow], tokens: list[int]) -> list[dict[int, float] | None]:
        """The model's own log-softmax (before any processing) of each chosen token, plus the top-k, where asked."""
        out: list[dict[int, float] | None] = [None] * len(rows)
        if not any(r.params.logprobs is not None for r in rows):
            return out
        raw = logits.log_softmax(dim=-1)
        for i, r in enumerate(rows):
            if r.params.logprobs is None:
                continue
            entry = {tokens[i]: float(raw[i, tokens[i]])}
            if r.params.logprobs > 0:
                top = raw[i].topk(r.params.logprobs)
                entry.update({int(t): float(v) for t, v in zip(top.indices, top.values)})
            out[i] = entry
        return out
