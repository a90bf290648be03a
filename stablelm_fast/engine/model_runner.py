"""ModelRunner: owns the device, the model shard and its KV cache; runs one flattened varlen step.

The driver turns a ScheduledBatch into a StepInput (plain CPU tensors, cheap to broadcast to tensor-parallel
workers); every rank's runner executes it; rank 0 gets the logits of the tokens to sample from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from stablelm_fast.config import ModelConfig
from stablelm_fast.engine.scheduler import ScheduledBatch
from stablelm_fast.layers.attention import AttentionMetadata
from stablelm_fast.layers.parallel import TPInfo
from stablelm_fast.model import StableLM
from stablelm_fast.ops import get_ops


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
    max_blocks = max(len(s.block_table) for s in batch.seqs)
    tables = torch.zeros(len(batch.seqs), max_blocks, dtype=torch.int32)
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        start, stop = seq.num_computed_tokens, seq.num_computed_tokens + n
        input_ids.extend(seq.token_ids[start:stop])
        positions.extend(range(start, stop))
        table = seq.block_table
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, stop))
        tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        cu.append(cu[-1] + n)
        context_lens.append(stop)
        if stop == seq.num_tokens:  # this step completes the sequence's known tokens: sample the next one
            logits_indices.append(cu[-1] - 1)
    max_q_len = max(batch.num_new_tokens)
    return StepInput(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=tables,
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
        is_decode=max_q_len == 1,
        max_q_len=max_q_len,
    )


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class ModelRunner:
    def __init__(self, config: ModelConfig, model_dir: str | None, load_format: str, dtype: torch.dtype,
                 device: torch.device, backend: str, tp: TPInfo | None = None, seed: int = 0) -> None:
        self.config, self.dtype, self.device, self.backend = config, dtype, device, backend
        self.tp = tp or TPInfo()
        self.ops = get_ops(backend)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                self.model = StableLM(config, self.ops, self.tp)
        finally:
            torch.set_default_dtype(prev)
        self.model.cos_sin = self.model.cos_sin.float()
        if load_format == "dummy":
            self.model.init_dummy_weights(seed)
        else:
            assert model_dir is not None
            self.model.load_weights(model_dir)
        if hasattr(self.ops, "pack_linear_weight"):
            self.model.pack_linear_weights(self.ops.pack_linear_weight)
        self.model.eval()
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.graph_decoder = None

    def kv_bytes_per_block(self, block_size: int) -> int:
        shard = self.model.head_shard
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.config.num_hidden_layers * block_size * shard.num_kv * self.config.head_dim * itemsize

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        shard = self.model.head_shard
        # [layers, 2, num_blocks, block_size, Hkv, D] in one allocation; each layer gets (k, v) views
        cache = torch.zeros(self.config.num_hidden_layers, 2, num_blocks, block_size, shard.num_kv,
                            self.config.head_dim, dtype=self.dtype, device=self.device)
        self.kv_caches = [(cache[i, 0], cache[i, 1]) for i in range(self.config.num_hidden_layers)]
        self.num_blocks = num_blocks

    def enable_cuda_graphs(self, max_batch: int, max_blocks_per_seq: int) -> None:
        """Capture decode CUDA graphs (CUDA only; STABLELM_FAST_CUDA_GRAPHS=0 turns them off)."""
        if self.device.type != "cuda" or os.environ.get("STABLELM_FAST_CUDA_GRAPHS", "1") == "0":
            return
        from stablelm_fast.engine.cuda_graph import CudaGraphDecoder

        self.graph_decoder = CudaGraphDecoder(self.model, self.kv_caches, max_batch, max_blocks_per_seq,
                                              self.config.hidden_size, self.device)
        self.graph_decoder.capture()

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor | None:
        """Run one step; -> logits [S, vocab] fp32 for step.logits_indices (None if nothing to sample)."""
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=step.slot_mapping.to(dev, non_blocking=True),
            block_tables=step.block_tables.to(dev, non_blocking=True),
            cu_seqlens_q=step.cu_seqlens_q.to(dev, non_blocking=True),
            context_lens=step.context_lens.to(dev, non_blocking=True),
            is_decode=step.is_decode,
            max_q_len=step.max_q_len,
        )
        graphs = self.graph_decoder
        if graphs is not None and step.is_decode and graphs.can_run(step.input_ids.numel()):
            hidden = graphs.run(step.input_ids.to(dev), step.positions.to(dev), meta)
        else:
            hidden = self.model(step.input_ids.to(dev), step.positions.to(dev), meta, self.kv_caches)
        if step.logits_indices.numel() == 0:
            # NOTE: under tensor parallelism every rank must still join the lm_head gather: run it on nothing.
            return self.model.compute_logits(hidden[:0]) if self.tp.size > 1 else None
        return self.model.compute_logits(hidden[step.logits_indices.to(dev)])


def default_num_blocks(runner_bytes_per_block: int, block_size: int, max_model_len: int, max_num_seqs: int,
                       device: torch.device, kv_cache_memory_gb: float | None) -> int:
    """KV-cache size: kv_cache_memory_gb if given; else CPU: 30% of available RAM, CUDA: 90% of free memory
    (after the model is loaded), never more than max_num_seqs full-length sequences need."""
    if kv_cache_memory_gb is not None:
        if kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0; got {kv_cache_memory_gb}")
        budget = int(kv_cache_memory_gb * (1 << 30))
    else:
        fraction = float(os.environ.get("STABLELM_FAST_KV_FRACTION", "0.3" if device.type == "cpu" else "0.9"))
        budget = int(available_memory_bytes(device) * fraction)
    needed = max_num_seqs * -(-max_model_len // block_size)
    return max(1, min(budget // runner_bytes_per_block, needed))
