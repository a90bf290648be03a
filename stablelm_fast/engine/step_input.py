"""StepInput: one engine step as flat tensors (no padding), built on the driver from a ScheduledBatch.

Plain CPU tensors, cheap to broadcast to tensor-parallel workers (distributed/ sends `tensors()` and the ints).
Which rows are sampled is decided here, once: `logits_indices` (rows of the flattened batch the model computes logits
for) and, on the driver only, `sample_seqs` (the batch positions of the sequences those rows belong to).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stablelm_fast.engine.scheduler import ScheduledBatch


@dataclass
class StepInput:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32 (padded with 0: never read past context_lens)
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32
    logits_indices: torch.Tensor  # [S] int64: rows of the flattened batch whose next token is sampled
    is_decode: bool
    max_q_len: int
    # driver only (not broadcast): the sequences that sample (batch index) and how many logits rows each has
    # (1, or 1 + its drafts), in order: together the LAST sum(sample_rows) rows of the logits; and prompt-logprob
    # rows: (batch index, first logits row, count, first position)
    sample_seqs: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    prompt_logprob_rows: list[tuple[int, int, int, int]] = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        return [self.input_ids, self.positions, self.slot_mapping, self.block_tables, self.cu_seqlens_q,
                self.context_lens, self.logits_indices]


def prepare_step(batch: ScheduledBatch, block_size: int) -> StepInput:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cu = [0]
    context_lens: list[int] = []
    logits_indices: list[int] = []
    sample_row_ids: list[int] = []
    sample_seqs: list[int] = []
    sample_rows: list[int] = []
    prompt_rows: list[tuple[int, int, int, int]] = []
    max_blocks = max(len(s.block_table) for s in batch.seqs)
    tables = torch.zeros(len(batch.seqs), max_blocks, dtype=torch.int32)
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        start, stop = seq.num_computed_tokens, seq.num_computed_tokens + n
        drafts = seq.spec_token_ids  # computed after the sequence's known tokens (speculative decoding)
        input_ids.extend(seq.token_ids[start: stop - len(drafts)])
        input_ids.extend(drafts)
        positions.extend(range(start, stop))
        table = seq.block_table
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, stop))
        tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        cu.append(cu[-1] + n)
        context_lens.append(stop)
        if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
            # positions start .. last - 1 predict prompt tokens start + 1 .. last
            last = min(stop, seq.num_prompt_tokens - 1)
            prompt_rows.append((i, len(logits_indices), last - start, start))
            logits_indices.extend(range(cu[-2], cu[-2] + last - start))
        if stop == seq.num_tokens + len(drafts):  # this step completes the known tokens: sample the next one
            sample_row_ids.extend(range(cu[-1] - 1 - len(drafts), cu[-1]))
            sample_seqs.append(i)
            sample_rows.append(1 + len(drafts))
    max_q_len = max(batch.num_new_tokens)
    return StepInput(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=tables,
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        logits_indices=torch.tensor(logits_indices + sample_row_ids, dtype=torch.int64),
        is_decode=max_q_len == 1,
        max_q_len=max_q_len,
        sample_seqs=sample_seqs,
        sample_rows=sample_rows,
        prompt_logprob_rows=prompt_rows,
    )
