"""CUDA graphs for decode steps: one graph captured per batch size, replayed with the step's inputs copied into
static buffers. At batch 1-64 a decode step of a 1.6B model is ~24 layers x ~10 kernel launches; replaying a graph
removes the launch overhead (tens of microseconds per launch from Python) that otherwise rivals the math.

Requirements the kernels meet: no host synchronisation inside the forward (the Triton decode kernel sizes its split-K
grid from block_tables.shape, not from context_lens values), and fixed-shape inputs: block tables are padded to
max_model_len / block_size columns, padded batch rows use slot -1 (no cache write) and context length 1.

NOTE: this path needs a GPU; it cannot run on the CPU machines the tests run on. It is taken only when
device is CUDA, the step is a pure decode step, and the batch fits the largest captured size.
"""

from __future__ import annotations

import torch

from stablelm_fast.layers.attention import AttentionMetadata

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class CudaGraphDecoder:
    def __init__(self, model: torch.nn.Module, kv_caches: list, max_batch: int, max_blocks_per_seq: int,
                 hidden_size: int, device: torch.device) -> None:
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.sizes = [s for s in CAPTURE_SIZES if s <= max_batch] or [1]
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=next(model.parameters()).dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
                                 cu_seqlens_q=self.cu_seqlens_q[: b + 1], context_lens=self.context_lens[:b],
                                 is_decode=True, max_q_len=1)

    @torch.inference_mode()
    def capture(self) -> None:
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            for _ in range(2):  # warm up (autotuning, lazy init) outside the graph
                self.model(self.input_ids[:b], self.positions[:b], self._meta(b), self.kv_caches)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.hidden[:b] = self.model(self.input_ids[:b], self.positions[:b], self._meta(b), self.kv_caches)
            self.pool = graph.pool()
            self.graphs[b] = graph

    def can_run(self, batch_size: int) -> bool:
        return bool(self.graphs) and batch_size <= self.sizes[-1]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= b)
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(meta.slot_mapping)
        self.slot_mapping[b:size].fill_(-1)
        self.context_lens[:b].copy_(meta.context_lens)
        self.context_lens[b:size].fill_(1)
        self.block_tables[:b, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.graphs[size].replay()
        return self.hidden[:b]
