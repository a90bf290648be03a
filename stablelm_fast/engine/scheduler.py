"""Scheduler: continuous batching with chunked prefill, under a token budget, FCFS, with preemption.

Each step every running sequence gets the tokens it still needs (decode: 1; an unfinished prefill: the next chunk), in
arrival order, then waiting sequences are admitted FCFS while the token budget (`max_num_batched_tokens`), the
sequence limit (`max_num_seqs`) and the free blocks allow. Prefill and decode mix in one step, and a long prompt is
cut into chunks so it never stalls running decodes. When the cache runs out of blocks the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed later.

Speculative decoding: a `propose(seq, num_running)` callback may give a decoding sequence draft tokens
(seq.spec_token_ids); it then computes 1 + d tokens, and `on_spec_verified` rolls back the rejected ones.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from stablelm_fast.engine.block_manager import BlockManager
from stablelm_fast.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens each sequence computes this step

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 propose: Callable[[Sequence, int], list[int]] | None = None) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.propose = propose

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.spec_token_ids = []
        seq.num_computed_tokens = 0  # recomputed from scratch (the prefix cache usually gives most of it back)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # 1. running sequences, oldest first; make room by preempting the newest
        for seq in list(self.running):
            if seq not in self.running:  # preempted while making room for an older one
                continue
            if budget == 0:
                break
            num_new = min(seq.num_uncomputed_tokens, budget)
            seq.spec_token_ids = []
            if self.propose is not None and seq.num_uncomputed_tokens == 1:
                drafts = self.propose(seq, len(self.running))[: budget - 1]
                if drafts and self.bm.can_grow(seq, seq.num_computed_tokens + 1 + len(drafts)):
                    seq.spec_token_ids = drafts  # never preempt anyone for a guess
                    num_new = 1 + len(drafts)
            while not self.bm.can_grow(seq, seq.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.bm.grow(seq, seq.num_computed_tokens + num_new)
            # NOTE: only blocks of known tokens are published, never blocks holding drafts
            self.bm.commit_full_blocks(seq, min(seq.num_computed_tokens + num_new, seq.num_tokens))
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        # 2. waiting sequences, first come first served (no overtaking: a head that does not fit blocks the queue)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # NOTE: prompt logprobs need every prompt position computed: no prefix-cache hits for such requests.
            hits = [] if seq.params.prompt_logprobs is not None else self.bm.match_prefix(seq)
            num_new = min(seq.num_tokens - len(hits) * self.bm.block_size, budget)
            if not self.bm.can_admit(seq, num_new, hits):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = self.bm.admit(seq, hits)
            seq.num_cached_prompt_tokens = seq.num_computed_tokens
            self.bm.grow(seq, seq.num_computed_tokens + num_new)
            self.bm.commit_full_blocks(seq, seq.num_computed_tokens + num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def on_step_done(self, batch: ScheduledBatch) -> int:
        """The batch's tokens are in the KV cache now: advance each sequence (the only place that does).
        -> how many of them were prompt tokens."""
        prompt_tokens = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                prompt_tokens += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += n
        return prompt_tokens

    def on_spec_verified(self, seq: Sequence, num_accepted: int) -> None:
        """After on_step_done: of seq's drafts only the first num_accepted hold valid K/V; the rest are recomputed
        (their slots are overwritten at the next steps)."""
        seq.num_computed_tokens -= len(seq.spec_token_ids) - num_accepted
        seq.spec_token_ids = []

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence, wherever it is, and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.FINISHED
