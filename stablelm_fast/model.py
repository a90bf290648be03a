"""StableLM (HF `StableLmForCausalLM`): one implementation for 1.6B, 3B and 12B.

LayerNorm with bias; partial NeoX rotary; optional q/k/v bias (1.6B); GQA and per-head QK LayerNorm (12B);
parallel residual x + attn(ln(x)) + mlp(ln(x)) (12B); untied lm_head. Modules are named as in HF checkpoints, so a
checkpoint tensor finds its parameter by name (after the packed-modules mapping); every parameter loads and shards
itself (layers/weights.py). The model holds this rank's shard of every weight and calls `tp.reduce` where a
row-parallel output must be summed; with one process that is a no-op, and no layer touches torch.distributed.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from stablelm_fast.config import ModelConfig
from stablelm_fast.layers.attention import Attention, AttentionMetadata
from stablelm_fast.layers.embedding import LMHead, VocabEmbedding
from stablelm_fast.layers.layernorm import LayerNorm
from stablelm_fast.layers.mlp import MLP
from stablelm_fast.layers.parallel import HeadShard, TPInfo, head_shard
from stablelm_fast.layers.weights import CheckpointTensor
from stablelm_fast.ops.reference import rotary_cos_sin


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPInfo, ops: Any, quant: Any = None, prefix: str = "") -> None:
        super().__init__()
        self.tp = tp
        self.parallel_residual = config.use_parallel_residual
        h, eps = config.hidden_size, config.layer_norm_eps
        self.input_layernorm = LayerNorm(h, eps, ops)
        self.post_attention_layernorm = None if self.parallel_residual else LayerNorm(h, eps, ops)
        self.self_attn = Attention(config, head_shard(config.num_attention_heads, config.num_key_value_heads, tp),
                                   tp, ops, quant, f"{prefix}.self_attn")
        self.mlp = MLP(h, config.intermediate_size, ops, tp, quant, f"{prefix}.mlp")

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]: the previous layer's output, not yet added to the residual
        residual: torch.Tensor | None,  # [T, hidden]
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # NOTE: submodules' forward called directly: nn.Module.__call__ costs ~3 us (hooks, tracing checks) and a
        # decode step makes ~200 such calls; no hooks are ever registered on these modules.
        h, residual = self.input_layernorm.forward(x, residual)
        attn = self.self_attn.forward(h, positions, cos_sin, meta, *kv_cache)
        if self.post_attention_layernorm is None:
            # NOTE: attention and MLP both read ln(x); their row-parallel outputs share one all-reduce.
            return self.tp.reduce(attn + self.mlp.forward(h)), residual
        h, residual = self.post_attention_layernorm.forward(self.tp.reduce(attn), residual)
        return self.tp.reduce(self.mlp.forward(h)), residual


class StableLmModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPInfo, ops: Any, quant: Any = None) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, tp, ops, quant, f"model.layers.{i}")
                                    for i in range(config.num_hidden_layers))
        self.norm = LayerNorm(config.hidden_size, config.layer_norm_eps, ops)
        # [max_positions, rotary_dim] fp32 whatever the model dtype: the rotary angles are always computed in fp32
        self.register_buffer("cos_sin", rotary_cos_sin(config.max_position_embeddings, config.rotary_dim,
                                                       config.rope_theta).to(torch.float32), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer.forward(x, residual, positions, self.cos_sin, meta, kv)  # (see DecoderLayer)
        x, _ = self.norm(x, residual)
        return x


class StableLM(nn.Module):
    # HF checkpoint name part -> (our packed parameter's name part, shard_id)
    packed_modules_mapping = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    _PER_HEAD_NORM = re.compile(r"\.(q|k)_layernorm\.norms\.(\d+)\.weight$")

    def __init__(self, config: ModelConfig, ops: Any, tp: TPInfo | None = None, quant_config: Any = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp or TPInfo()
        self.quant_config = quant_config  # stablelm_fast.quantization.QuantConfig, or None
        self.model = StableLmModel(config, self.tp, ops, quant_config)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, self.tp, ops, quant_config)

    @property
    def head_shard(self) -> HeadShard:
        return head_shard(self.config.num_attention_heads, self.config.num_key_value_heads, self.tp)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k_cache, v_cache)
    ) -> torch.Tensor:
        """-> final hidden states [T, hidden] (normed)."""
        return self.model(input_ids, positions, meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, hidden] -> [B, vocab] fp32."""
        return self.lm_head(hidden)

    # ---- weights -------------------------------------------------------------------------------------------------

    def load_weight(self, hf_name: str, loaded: CheckpointTensor) -> None:
        """Route one checkpoint tensor to the parameter that owns it (which loads this rank's part)."""
        name, shard_id = hf_name, None
        m = self._PER_HEAD_NORM.search(name)
        if m:
            name, shard_id = name[: m.start()] + f".{m.group(1)}_layernorm.weight", int(m.group(2))
        else:
            for part, (packed, sid) in self.packed_modules_mapping.items():
                if f".{part}." in name:
                    name, shard_id = name.replace(f".{part}.", f".{packed}."), sid
                    break
        param = self.get_parameter(name)
        param.weight_loader(param, loaded, shard_id)

    def tie_weights(self) -> None:
        """tie_word_embeddings: the lm_head is the embedding (call after loading, before repacking)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight.data.copy_(self.model.embed_tokens.weight.data)

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights from config.json alone (load_format='dummy'), scaled like a trained model's."""
        gen = torch.Generator().manual_seed(seed + 7919 * self.tp.rank)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.data.zero_()
            elif "norm" in name:
                p.data.fill_(1.0)
            elif hasattr(p, "dummy_loader"):  # a weight quantized as it loads: the same draw, then quantized
                p.dummy_loader(torch.randn(p.dummy_shape, generator=gen).mul_(0.02).to(p.dtype))
            else:
                p.data.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
