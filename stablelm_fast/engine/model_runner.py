"""ModelRunner: owns the device, the model shard and its KV cache; runs one flattened varlen step.

The driver turns a ScheduledBatch into a StepInput (plain CPU tensors, cheap to broadcast to tensor-parallel
workers); every rank's runner executes it; rank 0 gets the logits of the tokens to sample from.
"""

from __future__ import annotations

import os

import torch

from stablelm_fast.config import ModelConfig
from stablelm_fast.engine import cpu_forward, kv_cache
from stablelm_fast.engine.step_input import StepInput
from stablelm_fast.layers.attention import AttentionMetadata
from stablelm_fast.layers.parallel import TPInfo
from stablelm_fast.loader import load_model
from stablelm_fast.model import StableLM
from stablelm_fast.ops import cpu_memory, get_ops
from stablelm_fast.quantization import QuantConfig


class ModelRunner:
    """The Executor (engine/executor.py) of one process; under tensor parallelism every rank runs one."""

    is_dead = False  # nothing outside this process can fail it

    def __init__(self, config: ModelConfig, model_dir: str | None, load_format: str, dtype: torch.dtype,
                 device: torch.device, backend: str, tp: TPInfo | None = None, seed: int = 0,
                 quantization: dict | None = None) -> None:
        self.config, self.dtype, self.device, self.backend = config, dtype, device, backend
        self.tp = tp or TPInfo()
        self.ops = get_ops(backend)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                self.model = StableLM(config, self.ops, self.tp, QuantConfig.from_dict(quantization))
        finally:
            torch.set_default_dtype(prev)
        load_model(self.model, model_dir, load_format, seed)
        self.model.eval()
        if device.type == "cpu":
            cpu_memory.release_free_heap()  # what loading's temporaries freed
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.graph_decoder = None
        self.cpu_forward: cpu_forward.CpuForward | None = None

    def kv_bytes_per_block(self, block_size: int) -> int:
        shard = self.model.head_shard
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.config.num_hidden_layers * block_size * shard.num_kv * self.config.head_dim * itemsize

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        # one allocation, per-layer (k, v) views; on the CPU its pages are committed as sequences write them
        self.kv_caches = kv_cache.allocate(self.config.num_hidden_layers, num_blocks, block_size,
                                           self.model.head_shard.num_kv, self.config.head_dim, self.dtype, self.device)
        self.num_blocks = num_blocks
        # the cpu backend in one process: every decoder layer in one C++ call (engine/cpu_forward.py)
        self.cpu_forward = cpu_forward.build(self.model, self.kv_caches, self.backend)

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
        elif self.cpu_forward is not None:
            hidden = self.cpu_forward(step.input_ids, step.positions, meta)
        else:
            hidden = self.model(step.input_ids.to(dev), step.positions.to(dev), meta, self.kv_caches)
        if step.logits_indices.numel() == 0:
            # NOTE: under tensor parallelism every rank must still join the lm_head gather: run it on nothing.
            return self.model.compute_logits(hidden[:0]) if self.tp.size > 1 else None
        return self.model.compute_logits(hidden[step.logits_indices.to(dev)])

    def shutdown(self) -> None:
        """Nothing to stop: the model and its cache go with this object."""
