"""Every decoder layer in one C++ call on the cpu backend (csrc/cpu/model_forward.cpp).

The C++ object runs model.DecoderLayer.forward's ops in the same order on the same kernels, so its hidden states are
the Python path's to the bit; it removes the Python between the kernels (wrappers, output allocation, dispatcher
argument parsing: ~5 ms of a ~38 ms int4 batch-1 decode step of the 1.6B on Zen 4, bench/profile_step.py), as the
CUDA graphs of engine/cuda_graph.py do on the GPU. The embedding lookup and the lm_head stay in Python (one call
each).

It applies when the model runs on the cpu backend in one process (tensor parallelism all-reduces between layers in
Python) and every linear layer's weight was packed for the C++ kernels; otherwise `build` returns None and the model
runs its own forward. STABLELM_FAST_CPU_FUSED_FORWARD=0 turns it off.
"""

from __future__ import annotations

import os

import torch

from stablelm_fast.layers.attention import AttentionMetadata
from stablelm_fast.layers.linear import LinearBase, UnquantizedLinearMethod
from stablelm_fast.model import StableLM
from stablelm_fast.quantization.linear_method import QuantLinearMethodBase

ENV = "STABLELM_FAST_CPU_FUSED_FORWARD"


def _linear_args(layer: LinearBase, gate_up: bool) -> tuple | None:
    """The C++ add_linear arguments of one linear layer, or None if the C++ path cannot run it."""
    method = layer.linear_method
    if type(method) is UnquantizedLinearMethod:
        w = layer.weight.data
        return (w, None, None, layer.bias, None, 0, 0, gate_up) if w.dim() == 3 else None
    if isinstance(method, QuantLinearMethodBase) and layer.w_q.dim() == 3:
        # NOTE: apply / apply_silu_mul not overridden: the C++ Linear does what the base class does
        if type(method).apply is not QuantLinearMethodBase.apply or \
                type(method).apply_silu_mul is not QuantLinearMethodBase.apply_silu_mul:
            return None
        return (layer.w_q, layer.w_scales, layer.w_zeros, layer.bias, layer.x_perm, method.bits, layer.w_group,
                gate_up)
    return None


class CpuForward:
    """StableLmModel.forward (the final norm included) as one C++ call; see the module docstring."""

    def __init__(self, model: StableLM, cpp) -> None:
        self.embed_tokens, self.cos_sin, self.cpp = model.model.embed_tokens, model.model.cos_sin, cpp

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return self.cpp.forward(x.contiguous(), positions, self.cos_sin, meta.slot_mapping, meta.block_tables,
                                meta.cu_seqlens_q, meta.context_lens, meta.is_decode)


def build(model: StableLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], backend: str) -> CpuForward | None:
    """The C++ forward of `model` over `kv_caches`, or None where it does not apply (module docstring)."""
    if os.environ.get(ENV, "1") == "0" or backend != "cpu" or model.tp.size != 1 or not kv_caches:
        return None
    import stablelm_fast._C  # noqa: F401  (registers torch.classes.stablelm_fast.CpuForward; the cpu backend has it)

    inner, cfg = model.model, model.config
    if inner.cos_sin.device.type != "cpu" or len(kv_caches) != len(inner.layers):
        return None
    attn0 = inner.layers[0].self_attn
    cpp = torch.classes.stablelm_fast.CpuForward(attn0.num_q, attn0.num_kv, attn0.head_dim, cfg.layer_norm_eps,
                                                 attn0.scale, cfg.use_parallel_residual)
    for layer, (k_cache, v_cache) in zip(inner.layers, kv_caches):
        attn, mlp = layer.self_attn, layer.mlp
        for lin, gate_up in ((attn.qkv_proj, False), (attn.o_proj, False), (mlp.gate_up_proj, True),
                             (mlp.down_proj, False)):
            args = _linear_args(lin, gate_up)
            if args is None:
                return None
            cpp.add_linear(*args)
        ln2 = layer.post_attention_layernorm
        cpp.add_layer(layer.input_layernorm.weight, layer.input_layernorm.bias,
                      None if ln2 is None else ln2.weight, None if ln2 is None else ln2.bias,
                      None if attn.q_layernorm is None else attn.q_layernorm.weight,
                      None if attn.k_layernorm is None else attn.k_layernorm.weight, k_cache, v_cache)
    cpp.set_norm(inner.norm.weight, inner.norm.bias)
    return CpuForward(model, cpp)
