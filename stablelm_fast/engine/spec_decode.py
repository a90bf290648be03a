"""Speculative decoding: n-gram prompt lookup proposes draft tokens, the target model verifies them in one step.

A running sequence in decode proposes up to k drafts (the tokens that followed the most recent earlier occurrence of
its last n tokens, n from prompt_lookup_max down to prompt_lookup_min). The scheduler gives it 1 + d new tokens
(its last token and the drafts) and the model computes logits at each of them in one varlen step. `verify` then walks
the rows: a greedy row accepts a draft when it is the argmax, a sampled row accepts draft x with probability p(x)
(the draft distribution is a point mass, so this rejection rule leaves the target distribution exact) and on
rejection draws from p with x removed. The first rejected row, or the row after the last draft, yields one more
token, so every step emits between 1 and d + 1 tokens. The KV of rejected drafts is simply overwritten later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stablelm_fast.layers.sampler import Sampler, SamplingRow


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    disable_by_batch_size: int | None = 16  # no drafts while more sequences than this are running

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
        method = raw.get("method", "ngram")
        if method == "draft_model":
            raise ValueError("speculative_config method 'draft_model' is not supported yet; use 'ngram'")
        if method != "ngram":
            raise ValueError(f"speculative_config method must be 'ngram'; got {method!r}")
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
        return cls("ngram", k, lo, hi, disable)


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


def verify(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow], drafts: list[int]
           ) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits: [d + 1, V] fp32 at the last token and at each draft; rows[j] sees the outputs plus drafts[:j].
    -> (emitted tokens: the accepted drafts then one more, their logprob dicts)."""
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
            if u >= float(probs[j, draft]):  # rejected: draw from p with the draft removed
                residual = probs[j: j + 1].clone()
                residual[0, draft] = 0.0
                tokens.append(int(sampler.draw(residual, rows[j: j + 1])[0]))
                break
        tokens.append(draft)
    else:  # every draft accepted: the bonus token from the last row
        last = len(drafts)
        if greedy:
            tokens.append(int(processed[last].argmax()))
        else:
            tokens.append(int(sampler.draw(probs[last: last + 1], rows[last: last + 1])[0]))
    return tokens, sampler.logprobs(logits[: len(tokens)], rows[: len(tokens)], tokens)
