"""The three StableLM shapes, and the launcher calls that exercise every Triton kernel at those shapes.

`run_scenarios` calls the real launchers of kernels/ (what ops/triton_ops.py calls) with tensors of each model's
shapes, so whatever the launchers pick (tile sizes, num_warps, split-K or not) is what gets exercised. The tensors
are CPU tensors from torch.empty (never touched, so even the 12B gate/up weight costs no memory): gpu/aot_compile.py
runs this with recorders in place of the kernels; nothing is computed.
"""

from __future__ import annotations

import torch

# name -> hidden, intermediate, q heads, kv heads, head dim, qkv bias, QK LayerNorm (the hub config.json values)
MODEL_SHAPES = {
    "1.6B": dict(hidden=2048, inter=5632, hq=32, hkv=32, d=64, layers=24, vocab=100352, qkv_bias=True,
                 qk_norm=False, parallel_residual=False),
    "3B": dict(hidden=2560, inter=6912, hq=32, hkv=32, d=80, layers=32, vocab=50304, qkv_bias=False,
               qk_norm=False, parallel_residual=False),
    "12B": dict(hidden=5120, inter=13824, hq=32, hkv=8, d=160, layers=40, vocab=100352, qkv_bias=False,
                qk_norm=True, parallel_residual=True),
}
BLOCK_SIZE = 16  # the engine's default KV page size
MAX_MODEL_LEN = 4096  # CUDA graphs pad block tables to this: 256 pages -> the split-K decode path


def _e(*shape, dtype):
    return torch.empty(*shape, dtype=dtype)


def _attention(label_ref: list, tag: str, hq: int, hkv: int, d: int, dtype: torch.dtype, qk_norm: bool) -> None:
    from stablelm_fast.kernels.paged_attention_decode import paged_attention_decode
    from stablelm_fast.kernels.paged_attention_prefill import paged_attention
    from stablelm_fast.kernels.rope_qknorm_cache import qk_norm_rope_cache

    num_blocks = 64
    kc, vc = _e(num_blocks, BLOCK_SIZE, hkv, d, dtype=dtype), _e(num_blocks, BLOCK_SIZE, hkv, d, dtype=dtype)
    rot = d // 4
    T = 3
    label_ref[0] = f"{tag} rope"
    qw = _e(hq, d, dtype=dtype) if qk_norm else None
    kw = _e(hkv, d, dtype=dtype) if qk_norm else None
    qk_norm_rope_cache(_e(T, (hq + 2 * hkv) * d, dtype=dtype), torch.zeros(T, dtype=torch.int64),
                       _e(MAX_MODEL_LEN, rot, dtype=torch.float32), qw, kw, 1e-5, kc, vc,
                       torch.zeros(T, dtype=torch.int64), hq, hkv, d)
    for width, what in ((4, "decode 1 partition"), (MAX_MODEL_LEN // BLOCK_SIZE, "decode split-K")):
        label_ref[0] = f"{tag} {what}"
        B = 2
        paged_attention_decode(_e(B, hq, d, dtype=dtype), kc, vc, torch.zeros(B, width, dtype=torch.int32),
                               torch.ones(B, dtype=torch.int32), d ** -0.5)
    label_ref[0] = f"{tag} prefill"
    paged_attention(_e(T, hq, d, dtype=dtype), kc, vc, torch.zeros(1, 4, dtype=torch.int32),
                    torch.tensor([0, T], dtype=torch.int32), torch.tensor([T], dtype=torch.int32), d ** -0.5)


def _quantized(label_ref: list, tag: str, s: dict, dtype: torch.dtype) -> None:
    """Weight-only int8 (per channel, G = K) and int4 (G = 128, zero points) GEMMs at decode and prefill sizes:
    qkv (with a bias) and gate_up (fused SiLU). The configuration depends on M, the dtype, bits and HALVES, not on
    the model (all its dims are multiples of 128), so one model's shapes cover every launch the others make."""
    from stablelm_fast.kernels.quant_matmul import quant_gate_up_silu, quant_linear

    H, inter, qkv = s["hidden"], s["inter"], (s["hq"] + 2 * s["hkv"]) * s["d"]
    for bits in (8, 4):
        g = H if bits == 8 else 128
        for m in (1, 32, 512):
            label_ref[0] = f"{tag} int{bits} M={m}"
            x = _e(m, H, dtype=dtype)
            for n in (qkv, 2 * inter):
                qw = _e(n, H if bits == 8 else H // 2, dtype=torch.int8 if bits == 8 else torch.uint8)
                sc, z = _e(n, H // g, dtype=torch.float32), None if bits == 8 else _e(n, H // g, dtype=torch.uint8)
                if n == qkv:
                    quant_linear(x, qw, sc, z, _e(n, dtype=dtype), bits, g)
                else:
                    quant_gate_up_silu(x, qw, sc, z, bits, g)


def run_scenarios(label_ref: list, quick: bool = False) -> None:
    """Call every launcher at every model shape; label_ref[0] names the current scenario for the recorder."""
    from stablelm_fast.kernels.add_layernorm import add_layernorm, layernorm
    from stablelm_fast.kernels.silu_and_mul import gate_up_silu, silu_and_mul

    for name, s in MODEL_SHAPES.items():
        H, inter = s["hidden"], s["inter"]
        for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32, torch.float16):
            tag = f"{name} {str(dtype).replace('torch.', '')}"
            mma_only = dtype == torch.float16  # fp16 differs from bf16 only where tl.dot is involved
            if not mma_only:
                label_ref[0] = f"{tag} norms"
                w, b = _e(H, dtype=dtype), _e(H, dtype=dtype)
                layernorm(_e(4, H, dtype=dtype), w, b, 1e-5)
                add_layernorm(_e(4, H, dtype=dtype), _e(4, H, dtype=dtype), w, b, 1e-5)
                label_ref[0] = f"{tag} silu_and_mul"
                silu_and_mul(_e(4, 2 * inter, dtype=dtype))
            for m in (1, 32, 512):  # decode batch 1 / 32, prefill chunk
                label_ref[0] = f"{tag} gate_up_silu M={m}"
                gate_up_silu(_e(m, H, dtype=dtype), _e(2 * inter, H, dtype=dtype))
            if name == "1.6B" and not mma_only:  # fp16 takes bf16's configurations
                _quantized(label_ref, tag, s, dtype)
            groups = (s["hq"] // s["hkv"],) if s["hq"] != s["hkv"] or quick else (1, 4)
            for group in groups:  # head sizes 64 / 80 also with GQA 4 (the 12B's ratio)
                _attention(label_ref, f"{tag} gqa{group}", s["hq"], s["hq"] // group, s["d"], dtype,
                           s["qk_norm"] and not mma_only)
