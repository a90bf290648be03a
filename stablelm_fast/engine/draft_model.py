"""DraftModel: a small model in the engine's process that proposes k tokens per step for speculative decoding.

Its KV cache lives in its own tensors (same number of blocks and block size as the target's) addressed through the
TARGET's block tables: slot s of the draft cache holds the draft's K/V of the token whose target K/V is in slot s.
So the block manager, prefix caching, preemption and rollback need nothing new, provided the draft writes K/V for
every known token the target computes, in the same step: then every block the prefix cache publishes (at scheduling
time, for the tokens computed that step) holds valid draft K/V too.

Each engine step, after scheduling (speculated sequences carry placeholder drafts, as many as the scheduler made
room for) and before the target runs:
  pass 1: one varlen forward over every scheduled sequence, of the known tokens the draft has not seen yet (the
          target's new known tokens, plus a draft that was accepted without being fed back); logits at the last
          known token of each speculated sequence give q_1 and draft d_1;
  pass j = 2..k: one batched decode step of the drafts d_{j-1}, giving q_j and d_j.
The draft wrote K/V for d_1 .. d_{d-1}; after verification its valid prefix is min(that, the target's computed
tokens), so rejected drafts are rolled back like the target's. Drafts are drawn as the target would sample (the
same processing, temperature and filters) with the sequence's generator; q (sampled rows) goes to `verify`.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

from stablelm_fast.config import ModelConfig
from stablelm_fast.engine.model_runner import ModelRunner
from stablelm_fast.engine.scheduler import ScheduledBatch
from stablelm_fast.engine.sequence import Sequence
from stablelm_fast.engine.step_input import StepInput
from stablelm_fast.layers.sampler import Sampler, SamplingRow
from stablelm_fast.tokenizer import Tokenizer

RowFn = Callable[[Sequence, list[int]], SamplingRow]  # (seq, drafts so far) -> its sampling row


def check_draft_compatible(draft_dir: str, draft: ModelConfig, target: ModelConfig, target_tok: Tokenizer,
                           max_model_len: int) -> None:
    """ValueError unless the draft shares the target's vocabulary (size and tokenizer) and covers max_model_len."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"speculative_config draft model {draft_dir!r} has vocab_size {draft.vocab_size}; the "
                         f"target's is {target.vocab_size}: a draft must share the target's vocabulary")
    vocab = Tokenizer(draft_dir, draft.eos_token_id).hf.get_vocab(with_added_tokens=True)
    if vocab != target_tok.hf.get_vocab(with_added_tokens=True):
        raise ValueError(f"speculative_config draft model {draft_dir!r} has a different tokenizer from the "
                         f"target's: a draft must share the target's vocabulary")
    if draft.max_position_embeddings < max_model_len:
        raise ValueError(f"speculative_config draft model {draft_dir!r} has max_position_embeddings "
                         f"{draft.max_position_embeddings} < max_model_len {max_model_len}")


class DraftModel:
    def __init__(self, model_dir: str, target: ModelConfig, target_tok: Tokenizer, max_model_len: int,
                 load_format: str, dtype: torch.dtype, device: torch.device, backend: str, seed: int) -> None:
        self.config = ModelConfig.from_pretrained(model_dir)
        check_draft_compatible(model_dir, self.config, target, target_tok, max_model_len)
        self.runner = ModelRunner(self.config, None if load_format == "dummy" else model_dir,
                                  load_format, dtype, device, backend, seed=seed + 1)
        self.device = device
        self.sampler = Sampler()
        # per sequence: (its num_preemptions, tokens whose draft K/V are valid, tokens written this step)
        self._state: weakref.WeakKeyDictionary[Sequence, tuple[int, int, int]] = weakref.WeakKeyDictionary()

    def kv_bytes_per_block(self, block_size: int) -> int:
        return self.runner.kv_bytes_per_block(block_size)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.runner.allocate_kv_cache(num_blocks, block_size)

    def enable_cuda_graphs(self, max_batch: int, max_blocks_per_seq: int) -> None:
        self.runner.enable_cuda_graphs(max_batch, max_blocks_per_seq)

    def _valid(self, seq: Sequence) -> int:
        """Tokens of seq whose draft K/V are in the cache (<= the target's: a preempted sequence starts over)."""
        state = self._state.get(seq)
        if state is None or state[0] != seq.num_preemptions:
            return seq.num_computed_tokens  # new, or re-admitted: its prefix-cache hits hold draft K/V too
        return min(state[1], seq.num_computed_tokens)

    @torch.inference_mode()
    def propose(self, batch: ScheduledBatch, row_fn: RowFn) -> dict[int, torch.Tensor | None]:
        """Fill the placeholder drafts of batch's speculated sequences; write the draft K/V of every known token
        the target computes this step. -> {seq_id: q [d, V] of a sampled sequence, None for a greedy one}."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        cu, ctx, last_rows = [0], [], []
        spec: list[Sequence] = []
        spec_rows: list[int] = []  # their rows in the batch (and its block tables)
        for b, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            d = len(seq.spec_token_ids)
            start, stop = self._valid(seq), seq.num_computed_tokens + n - d  # known tokens at the end of the step
            ids.extend(seq.token_ids[start: stop])
            positions.extend(range(start, stop))
            cu.append(cu[-1] + stop - start)
            ctx.append(stop)
            self._state[seq] = (seq.num_preemptions, start, stop + max(d - 1, 0))
            if d:
                spec.append(seq)
                spec_rows.append(b)
                last_rows.append(cu[-1] - 1)
        tables = _block_tables(batch.seqs)
        logits = self.runner.execute(_step(ids, positions, tables, cu, ctx, last_rows, bs))
        if not spec:
            return {}
        drafts: list[list[int]] = [[] for _ in spec]
        probs: list[list[torch.Tensor]] = [[] for _ in spec]
        live = list(range(len(spec)))  # speculated sequences that still want drafts
        for j in range(max(len(s.spec_token_ids) for s in spec)):
            if j > 0:  # feed back the previous drafts: one batched decode step
                live = [i for i in live if len(spec[i].spec_token_ids) > j]
                pos = [spec[i].num_tokens + j - 1 for i in live]
                step = _step([drafts[i][-1] for i in live], pos, tables[[spec_rows[i] for i in live]],
                             list(range(len(live) + 1)), [p + 1 for p in pos], list(range(len(live))), bs)
                logits = self.runner.execute(step)
            rows = [row_fn(spec[i], drafts[i]) for i in live]
            tokens, q = self._draw(logits, rows)
            for r, i in enumerate(live):
                drafts[i].append(tokens[r])
                probs[i].append(q[r] if q is not None else None)
        out: dict[int, torch.Tensor | None] = {}
        for i, seq in enumerate(spec):
            seq.spec_token_ids = drafts[i]
            out[seq.seq_id] = None if seq.params.greedy else torch.stack(probs[i])
        return out

    def _draw(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], torch.Tensor | None]:
        """Draft tokens as the target would sample them; -> (tokens, q rows or None when every row is greedy)."""
        processed = self.sampler.process(logits, rows)
        tokens = processed.argmax(dim=-1)
        greedy = torch.tensor([r.params.greedy for r in rows], device=logits.device)
        if bool(greedy.all()):
            return tokens.tolist(), None
        q = self.sampler.probs(processed, rows)
        tokens = torch.where(greedy, tokens, self.sampler.draw(q, rows))
        return tokens.tolist(), q

    def after_step(self, batch: ScheduledBatch) -> None:
        """After verification: the draft's valid prefix is what it wrote, cut to the target's computed tokens."""
        for seq in batch.seqs:
            state = self._state.get(seq)
            if state is not None:
                self._state[seq] = (state[0], min(state[2], seq.num_computed_tokens), state[2])

    def shutdown(self) -> None:
        self.runner.shutdown()


def _block_tables(seqs: list[Sequence]) -> torch.Tensor:
    tables = torch.zeros(len(seqs), max(len(s.block_table) for s in seqs), dtype=torch.int32)
    for i, s in enumerate(seqs):
        tables[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
    return tables


def _step(ids: list[int], positions: list[int], tables: torch.Tensor, cu: list[int], ctx: list[int],
          logit_rows: list[int], block_size: int) -> StepInput:
    """A StepInput over the target's block tables (row i of tables: sequence i)."""
    slots, seq_of_row = [], []
    for i in range(len(ctx)):
        seq_of_row.extend([i] * (cu[i + 1] - cu[i]))
    flat = tables.tolist()
    for p, i in zip(positions, seq_of_row):
        slots.append(flat[i][p // block_size] * block_size + p % block_size)
    q_lens = [b - a for a, b in zip(cu, cu[1:])]
    max_q = max(q_lens) if q_lens else 0
    return StepInput(
        input_ids=torch.tensor(ids, dtype=torch.int64), positions=torch.tensor(positions, dtype=torch.int64),
        slot_mapping=torch.tensor(slots, dtype=torch.int64), block_tables=tables,
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32), context_lens=torch.tensor(ctx, dtype=torch.int32),
        logits_indices=torch.tensor(logit_rows, dtype=torch.int64), is_decode=max_q == 1 and min(q_lens) == 1,
        max_q_len=max_q)
