"""Sequence: the state of one generated completion (a request with n > 1 owns n of them). State only, no logic
beyond bookkeeping; the scheduler decides, the block manager allocates, the engine appends tokens."""

from __future__ import annotations

import enum
import itertools

import torch

from stablelm_fast.outputs import RequestMetrics
from stablelm_fast.sampling_params import SamplingParams
from stablelm_fast.tokenizer import IncrementalDetokenizer, Tokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer: Tokenizer | None, arrival_time: float) -> None:
        self.seq_id = next(_ids)
        self.request_id, self.index = request_id, index
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_prompt_tokens = 0  # of those, how many came from the prefix cache at admission
        self.num_preemptions = 0
        self.matcher = None  # structured outputs: this sequence's xgrammar GrammarMatcher
        self.spec_token_ids: list[int] = []  # this step's draft tokens (speculative decoding), computed after the rest
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.detokenizer = (IncrementalDetokenizer(tokenizer, params.skip_special_tokens, len(prompt_token_ids),
                                                   len(prompt_token_ids), ids=list(prompt_token_ids))
                            if tokenizer is not None else None)
        # NOTE: a seeded request owns its generator, so its samples do not depend on what else is in the batch.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + 1_000_003 * index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, status={self.status.value})")


class Request:
    """One request: its prompt, params and the n sequences it owns."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 seqs: list[Sequence], arrival_time: float) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.params, self.seqs = params, seqs
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
