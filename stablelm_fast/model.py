"""StableLM (HF `StableLmForCausalLM`): one implementation for 1.6B, 3B and 12B.

LayerNorm with bias; partial NeoX rotary; optional q/k/v bias (1.6B); GQA and per-head QK LayerNorm (12B);
parallel residual x + attn(ln(x)) + mlp(ln(x)) (12B); untied lm_head. The model holds this rank's shard of every
weight (see layers/parallel.py) and calls `tp.reduce` where a row-parallel output must be summed; with one process
that is a no-op, and no layer ever touches torch.distributed itself.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch
from torch import nn

from stablelm_fast.config import ModelConfig
from stablelm_fast.layers.attention import Attention, AttentionMetadata
from stablelm_fast.layers.embedding import LMHead, VocabEmbedding
from stablelm_fast.layers.mlp import MLP
from stablelm_fast.layers.parallel import TPInfo, head_shard, split_range
from stablelm_fast.loader import load_checkpoint, split_layer_name
from stablelm_fast.ops.reference import rotary_cos_sin


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPInfo, ops: ModuleType) -> None:
        super().__init__()
        self.ops, self.tp, self.eps = ops, tp, config.layer_norm_eps
        self.parallel_residual = config.use_parallel_residual
        h = config.hidden_size
        i_start, i_stop = split_range(config.intermediate_size, tp, "intermediate_size")
        self.ln1_weight = nn.Parameter(torch.ones(h), requires_grad=False)
        self.ln1_bias = nn.Parameter(torch.zeros(h), requires_grad=False)
        if not self.parallel_residual:
            self.ln2_weight = nn.Parameter(torch.ones(h), requires_grad=False)
            self.ln2_bias = nn.Parameter(torch.zeros(h), requires_grad=False)
        self.attn = Attention(config, head_shard(config.num_attention_heads, config.num_key_value_heads, tp), tp, ops)
        self.mlp = MLP(h, i_stop - i_start, ops)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]: the previous layer's output, not yet added to the residual
        residual: torch.Tensor | None,  # [T, hidden]
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.ops.add_layernorm(x, residual, self.ln1_weight, self.ln1_bias, self.eps)
        attn = self.attn(h, positions, cos_sin, meta, *kv_cache)
        if self.parallel_residual:
            # NOTE: attention and MLP both read ln(x); their row-parallel outputs share one all-reduce.
            return self.tp.reduce(attn + self.mlp(h)), residual
        h, residual = self.ops.add_layernorm(self.tp.reduce(attn), residual, self.ln2_weight, self.ln2_bias, self.eps)
        return self.tp.reduce(self.mlp(h)), residual


class StableLM(nn.Module):
    def __init__(self, config: ModelConfig, ops: ModuleType, tp: TPInfo | None = None) -> None:
        super().__init__()
        self.config, self.ops = config, ops
        self.tp = tp or TPInfo()
        self.embed = VocabEmbedding(config.vocab_size, config.hidden_size, self.tp)
        self.layers = nn.ModuleList(DecoderLayer(config, self.tp, ops) for _ in range(config.num_hidden_layers))
        self.norm_weight = nn.Parameter(torch.ones(config.hidden_size), requires_grad=False)
        self.norm_bias = nn.Parameter(torch.zeros(config.hidden_size), requires_grad=False)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, self.tp, ops)
        self.register_buffer(
            "cos_sin", rotary_cos_sin(config.max_position_embeddings, config.rotary_dim, config.rope_theta),
            persistent=False)

    @property
    def head_shard(self):
        return head_shard(self.config.num_attention_heads, self.config.num_key_value_heads, self.tp)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k_cache, v_cache)
    ) -> torch.Tensor:
        """-> final hidden states [T, hidden] (normed)."""
        x, residual = self.embed(input_ids), None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, self.cos_sin, meta, kv)
        x, _ = self.ops.add_layernorm(x, residual, self.norm_weight, self.norm_bias, self.config.layer_norm_eps)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, hidden] -> [B, vocab] fp32."""
        return self.lm_head(hidden)

    # ---- weights -------------------------------------------------------------------------------------------------

    def load_weights(self, model_dir: str) -> None:
        """Read this rank's shard of every tensor from the checkpoint (memory-mapped slices, converted to dtype)."""
        load_checkpoint(model_dir, self.config, self._assign)
        if self.config.tie_word_embeddings:
            self.lm_head.weight.data.copy_(self.embed.weight.data)

    def pack_linear_weights(self, pack: Callable[..., torch.Tensor]) -> None:
        """Replace every linear weight by the backend's load-time layout (cpu: panels, csrc/cpu/panel.h); after
        loading, once. pack(w, halves=True) is told a gate_up weight's two halves must stay apart."""
        for layer in self.layers:
            attn, mlp = layer.attn, layer.mlp
            attn.qkv_weight.data = pack(attn.qkv_weight.data)
            attn.o_weight.data = pack(attn.o_weight.data)
            mlp.gate_up_weight.data = pack(mlp.gate_up_weight.data, halves=True)
            mlp.down_weight.data = pack(mlp.down_weight.data)
        self.lm_head.weight.data = pack(self.lm_head.weight.data)

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights from config.json alone (load_format='dummy'), scaled like a trained model's."""
        gen = torch.Generator().manual_seed(seed + 7919 * self.tp.rank)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.endswith("bias"):
                p.data.zero_()
            elif leaf.endswith("norm_weight") or leaf.startswith("ln"):
                p.data.fill_(1.0)
            else:
                p.data.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))

    def _assign(self, name: str, read_all: Callable[[], torch.Tensor],
                read_slice: Callable[[int, int, int], torch.Tensor]) -> None:
        cfg, tp = self.config, self.tp
        d = cfg.head_dim
        if name == "model.embed_tokens.weight" or name == "lm_head.weight":
            module = self.embed if name.startswith("model.") else self.lm_head
            rows = read_slice(0, module.start, module.stop)
            module.weight.data.zero_()
            module.weight.data[: rows.shape[0]].copy_(rows)
            return
        if name in ("model.norm.weight", "model.norm.bias"):
            target = self.norm_weight if name.endswith("weight") else self.norm_bias
            target.data.copy_(read_all())
            return
        layer_idx, rest = split_layer_name(name)  # type: ignore[misc]  (names were validated by the loader)
        layer = self.layers[layer_idx]
        attn, shard = layer.attn, self.head_shard
        q_rows = (shard.q_start * d, (shard.q_start + shard.num_q) * d)
        kv_rows = (shard.kv_start * d, (shard.kv_start + shard.num_kv) * d)
        q_size, kv_size = shard.num_q * d, shard.num_kv * d
        simple = {"input_layernorm.weight": layer.ln1_weight, "input_layernorm.bias": layer.ln1_bias}
        if not layer.parallel_residual:
            simple["post_attention_layernorm.weight"] = layer.ln2_weight
            simple["post_attention_layernorm.bias"] = layer.ln2_bias
        if rest in simple:
            simple[rest].data.copy_(read_all())
        elif rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            proj, kind = rest.split(".")[1], rest.split(".")[2]
            start, stop = q_rows if proj == "q_proj" else kv_rows
            offset = {"q_proj": 0, "k_proj": q_size, "v_proj": q_size + kv_size}[proj]
            target = attn.qkv_weight if kind == "weight" else attn.qkv_bias
            target.data[offset: offset + stop - start].copy_(read_slice(0, start, stop))
        elif rest == "self_attn.o_proj.weight":
            attn.o_weight.data.copy_(read_slice(1, *q_rows))
        elif ".norms." in rest:
            which, head = rest.split(".")[1], int(rest.split(".")[3])
            target, first = ((attn.q_norm_weight, shard.q_start) if which == "q_layernorm"
                             else (attn.k_norm_weight, shard.kv_start))
            if first <= head < first + target.shape[0]:
                target.data[head - first].copy_(read_all())
        elif rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            start, stop = split_range(cfg.intermediate_size, tp, "intermediate_size")
            part = stop - start
            offset = 0 if rest == "mlp.gate_proj.weight" else part
            layer.mlp.gate_up_weight.data[offset: offset + part].copy_(read_slice(0, start, stop))
        elif rest == "mlp.down_proj.weight":
            layer.mlp.down_weight.data.copy_(read_slice(1, *split_range(cfg.intermediate_size, tp, "intermediate_size")))
        else:  # pragma: no cover  (the loader already refused unknown names)
            raise ValueError(f"no parameter for tensor {name!r}")
