"""Speculative decoding: a proposer guesses draft tokens, the target model verifies them in one step.

Proposers: n-gram prompt lookup (the tokens that followed the most recent earlier occurrence of the last n tokens, n
from prompt_lookup_max down to prompt_lookup_min), or a small draft model sharing the target's vocabulary
(engine/draft_model.py), which samples k tokens autoregressively from its distribution q. The scheduler gives a
decoding sequence 1 + d new tokens (its last token and the drafts) and the model computes logits at each of them in
one varlen step. `verify` then walks the rows: a greedy row accepts a draft when it is the argmax, a sampled row
accepts draft x with probability min(1, p(x) / q(x)) and on rejection draws from the residual (p - q)+ (standard
speculative sampling: the emitted tokens are distributed exactly as the target's p; an n-gram draft is a point mass,
q(x) = 1, so the residual is p with x removed). The first rejected row, or the row after the last draft, yields one
more token, so every step emits between 1 and d + 1 tokens. The KV of rejected drafts is simply overwritten later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stablelm_fast.layers.sampler import Sampler, SamplingRow


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"  # or "draft_model"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    disable_by_batch_size: int | None = 16  # no drafts while more sequences than this are running
    model: str | None = None  # draft_model: the draft's HF-format folder

    @classmethod
    def from_dict(cls, raw: dict | None) -> "SpeculativeConfig | None":
        """vLLM's speculative_config dict -> a checked config (None: no speculation)."""
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise ValueError(f"speculative_config must be a dict; got {type(raw).__name__}")
        known = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                 "disable_by_batch_size", "model"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        method = raw.get("method", "draft_model" if "model" in raw else "ngram")
        if method not in ("ngram", "draft_model"):
            raise ValueError(f"speculative_config method must be 'ngram' or 'draft_model'; got {method!r}")
        model = raw.get("model")
        if method == "draft_model":
            if not isinstance(model, str) or not model:
                raise ValueError("speculative_config method 'draft_model' needs 'model': the draft model's folder")
            lookup = sorted(k for k in raw if k.startswith("prompt_lookup"))
            if lookup:
                raise ValueError(f"speculative_config {lookup[0]!r} applies to method 'ngram' only")
        elif model is not None:
            raise ValueError("speculative_config 'model' applies to method 'draft_model' only")
        k = raw.get("num_speculative_tokens", 4)
        lo = raw.get("prompt_lookup_min", 1)
        hi = raw.get("prompt_lookup_max", max(lo, 4) if isinstance(lo, int) else 4)
        disable = raw.get("disable_by_batch_size", 16)
        for name, v in (("num_speculative_tokens", k), ("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"speculative_config {name} must be an integer >= 1; got {v!r}")
        if hi < lo:
            raise ValueError(f"speculative_config prompt_lookup_max ({hi}) must be >= prompt_lookup_min ({lo})")
        if disable is not None and (not isinstance(disable, int) or isinstance(disable, bool) or disable < 1):
            raise ValueError(f"speculative_config disable_by_batch_size must be an integer >= 1; got {disable!r}")
        return cls(method, k, lo, hi, disable, model)


def ngram_propose(token_ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix n-gram (n_max..n_min)."""
    total = len(token_ids)
    if total < n_min + 1 or k < 1:
        return []
    arr = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(n_max, total - 1), n_min - 1, -1):
        # windows that start at 0 .. total - n - 1 (so at least one token follows each)
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == arr[total - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return token_ids[start: start + k]
    return []


def verify(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow], drafts: list[int],
           draft_probs: torch.Tensor | None = None) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits: [d + 1, V] fp32 at the last token and at each draft; rows[j] sees the outputs plus drafts[:j];
    draft_probs: [d, V], the distribution q each draft was drawn from (sampled rows of a draft model; None: point
    masses). -> (emitted tokens: the accepted drafts then one more, their logprob dicts)."""
    processed = sampler.process(logits, rows)
    greedy = rows[0].params.greedy
    probs = None if greedy else sampler.probs(processed, rows)
    gen = rows[0].generator
    tokens: list[int] = []
    for j, draft in enumerate(drafts):
        if greedy:
            target = int(processed[j].argmax())
            if target != draft:
                tokens.append(target)
                break
        else:
            u = float(torch.rand((), generator=gen)) if gen is not None else float(torch.rand(()))
            q = 1.0 if draft_probs is None else float(draft_probs[j, draft])
            if u * q >= float(probs[j, draft]):  # rejected (accepted with probability min(1, p / q))
                tokens.append(int(sampler.draw(_residual(probs[j], draft, draft_probs, j), rows[j: j + 1])[0]))
                break
        tokens.append(draft)
    else:  # every draft accepted: the bonus token from the last row
        last = len(drafts)
        if greedy:
            tokens.append(int(processed[last].argmax()))
        else:
            tokens.append(int(sampler.draw(probs[last: last + 1], rows[last: last + 1])[0]))
    return tokens, sampler.logprobs(logits[: len(tokens)], rows[: len(tokens)], tokens)


def _residual(p: torch.Tensor, draft: int, draft_probs: torch.Tensor | None, j: int) -> torch.Tensor:
    """[1, V]: what a rejected row draws from, (p - q)+ (unnormalized; draw does not need it normalized)."""
    if draft_probs is None:
        residual = p.clone()
        residual[draft] = 0.0
    else:
        residual = (p - draft_probs[j].to(p.device)).clamp_min_(0.0)
        if not bool(residual.sum() > 0):  # p == q up to rounding: rejection had probability ~0
            residual = p.clone()
    return residual[None]
