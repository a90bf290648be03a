"""Write GPTQ / AWQ 4-bit checkpoints the way AutoGPTQ / AutoAWQ lay them out, and compressed-tensors int4 / int8
checkpoints the way llm-compressor does, from a full-precision checkpoint, plus the dequantize-then-save reference
checkpoint the engine is compared against.

Written from the formats' documentation (packing loops kept deliberately plain, independent of the engine's
unpacking in stablelm_fast/quantization/formats.py):
- GPTQ: qweight int32 [K/8, N], value of input feature k = 8 i + j in bits 4 j of row i; qzeros int32 [K/G, N/8],
  zero of output n = 8 c + j in bits 4 j of column c, stored minus one (checkpoint_format 'gptq', v1); scales fp16
  [K/G, N]; g_idx int32 [K] (act-order: perm = the order features were quantized in, g_idx[perm[i]] = i // G).
- AWQ GEMM: qweight int32 [K, N/8] and qzeros [K/G, N/8] packed along N, nibble i of column c holding output
  n = 8 c + [0, 2, 4, 6, 1, 3, 5, 7][i]; scales fp16 [K/G, N]; zero points as is.
- compressed-tensors pack-quantized (>= 0.10): signed values q in [-2^(b-1), 2^(b-1)) stored as q + 2^(b-1), 32 / b
  of them per int32, value i in bits b i; weight_packed int32 [N, K*b/32] packed along K, weight_zero_point (asymmetric
  only, signed, same offset) int32 [N*b/32, K/G] packed along N, weight_scale [N, K/G] in the model's dtype,
  weight_shape [N, K], weight_g_idx int32 [K] (actorder 'group'); W = (q - z) * scale. config.json: quant_method
  'compressed-tensors', format 'pack-quantized', config_groups {group_0: {targets, weights: {...}}}, ignore.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
# which projections share their input (and so, in AutoGPTQ, one act-order permutation)
INPUT_OF = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o", "gate_proj": "mlp", "up_proj": "mlp",
            "down_proj": "down"}


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    return ((x + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32)


def _rtn(w: torch.Tensor, sym: bool, bits: int = 4, scale_dtype: torch.dtype = torch.float16
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One group w [N, G] -> (q [N, G] in 0..2^bits-1, scale [N] (scale_dtype), zero [N]), GPTQ's min-max rule."""
    levels = (1 << bits) - 1
    if sym:
        amax = w.abs().amax(1)
        scale = (2 * amax / levels).clamp_min(1e-8)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        scale = ((hi - lo) / levels).clamp_min(1e-8)
        zero = torch.round(-lo / scale)
    scale = scale.to(scale_dtype)
    q = torch.clamp(torch.round(w / scale.float()[:, None]) + zero[:, None], 0, levels)
    return q.to(torch.int64), scale, zero.to(torch.int64)


def quantize_layer(w: torch.Tensor, group: int, sym: bool, perm: torch.Tensor | None, bits: int = 4,
                   scale_dtype: torch.dtype = torch.float16):
    """W [N, K] -> (q [N, K], scales [K/G, N], zeros [K/G, N], g_idx [K], dequantized W [N, K] fp32); q and zeros
    unsigned (0 .. 2^bits - 1)."""
    n, k = w.shape
    perm = torch.arange(k) if perm is None else perm
    q = torch.zeros(n, k, dtype=torch.int64)
    deq = torch.zeros(n, k)
    scales = torch.zeros(k // group, n, dtype=scale_dtype)
    zeros = torch.zeros(k // group, n, dtype=torch.int64)
    g_idx = torch.zeros(k, dtype=torch.int32)
    for g in range(k // group):
        cols = perm[g * group: (g + 1) * group]
        qg, s, z = _rtn(w[:, cols].float(), sym, bits, scale_dtype)
        q[:, cols], scales[g], zeros[g], g_idx[cols] = qg, s, z, g
        deq[:, cols] = (qg - z[:, None]).float() * s.float()[:, None]
    return q, scales, zeros, g_idx, deq


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    intweight = q.t().contiguous()  # [K, N]
    k, n = intweight.shape
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for j in range(8):
        qweight |= intweight[j::8] << (4 * j)
    stored = (zeros - 1) & 15  # v1: zero points minus one
    qzeros = torch.zeros(zeros.shape[0], n // 8, dtype=torch.int64)
    for j in range(8):
        qzeros |= stored[:, j::8] << (4 * j)
    return _to_int32(qweight), _to_int32(qzeros)


def pack_awq(q: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def pack_cols(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
        for i, col in enumerate(AWQ_PACK_ORDER):
            out |= v[:, col::8] << (4 * i)
        return _to_int32(out)
    return pack_cols(q.t().contiguous()), pack_cols(zeros)


def write_prequantized(src: str, out: str, ref: str, method: str, group: int, sym: bool = False,
                       desc_act: bool = False, seed: int = 0) -> None:
    """src checkpoint -> out (GPTQ or AWQ, config.json with its quantization_config) and ref (same model with
    every linear weight replaced by its dequantized value, fp32, no quantization_config)."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    perms: dict[str, torch.Tensor] = {}
    qt, rt = {}, {}
    for name, t in tensors.items():
        parts = name.split(".")
        if name.endswith(".weight") and parts[-2] in LINEAR:
            key = ".".join(parts[:-2]) + INPUT_OF[parts[-2]]
            perm = None
            if desc_act:
                perm = perms.setdefault(key, torch.randperm(t.shape[1], generator=gen))
            q, scales, zeros, g_idx, deq = quantize_layer(t.float(), group, sym, perm)
            base = name[: -len(".weight")]
            if method == "gptq":
                qweight, qzeros = pack_gptq(q, zeros)
                qt.update({base + ".qweight": qweight, base + ".qzeros": qzeros, base + ".scales": scales,
                           base + ".g_idx": g_idx})
            else:
                qweight, qzeros = pack_awq(q, zeros)
                qt.update({base + ".qweight": qweight, base + ".qzeros": qzeros, base + ".scales": scales})
            rt[name] = deq
        else:
            qt[name] = rt[name] = t
    if method == "gptq":
        quant_config = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": desc_act, "sym": sym,
                        "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": "gptq",
                        "static_groups": False}
    else:
        quant_config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
                        "modules_to_not_convert": None}
    _save_pair(src, out, ref, qt, rt, quant_config)

def pack_ct(signed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """compressed-tensors' pack_to_int32: signed values [R, C] -> + 2^(bits-1), 32 / bits per int32 along dim, value i
    in bits (bits i)."""
    u = (signed + (1 << (bits - 1))).t() if dim == 0 else signed + (1 << (bits - 1))
    per = 32 // bits
    out = torch.zeros(u.shape[0], u.shape[1] // per, dtype=torch.int64)
    for i in range(per):
        out |= u[:, i::per] << (bits * i)
    out = _to_int32(out)
    return out.t().contiguous() if dim == 0 else out


def ct_matches(target: str, module: str) -> bool:
    """compressed-tensors' target / ignore matching: 're:' regex from the start, 'Linear', or the exact name."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == "Linear" or target == module


def ct_quant_config(bits: int, group: int, sym: bool, actorder: str | None = None,
                    ignore: tuple[str, ...] = ("lm_head",)) -> dict:
    """config.json's quantization_config as llm-compressor writes it for one weight-only scheme."""
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "group_size": None if group == -1 else group,
               "strategy": "channel" if group == -1 else "group", "block_structure": None, "dynamic": False,
               "actorder": actorder, "observer": "minmax", "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": list(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}, "version": "0.10.2"}


def write_compressed_tensors(src: str, out: str, ref: str, bits: int, group: int, sym: bool,
                             actorder: str | None = None, ignore: tuple[str, ...] = ("lm_head",),
                             seed: int = 0) -> None:
    """src checkpoint -> out (compressed-tensors pack-quantized; modules matched by ignore kept as they are) and ref
    (every quantized weight replaced by its dequantized value, fp32). group -1: channel-wise."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    perms: dict[str, torch.Tensor] = {}
    half = 1 << (bits - 1)
    qt, rt = {}, {}
    for name, t in tensors.items():
        parts, base = name.split("."), name[: -len(".weight")]
        if not (name.endswith(".weight") and parts[-2] in LINEAR) or any(ct_matches(i, base) for i in ignore):
            qt[name] = rt[name] = t
            continue
        n, k = t.shape
        g = k if group == -1 else group
        perm = None
        if actorder == "group":
            perm = perms.setdefault(".".join(parts[:-2]) + INPUT_OF[parts[-2]], torch.randperm(k, generator=gen))
        q, scales, zeros, g_idx, deq = quantize_layer(t.float(), g, sym, perm, bits, torch.bfloat16)
        qt[base + ".weight_packed"] = pack_ct(q - half, bits, dim=1)
        qt[base + ".weight_scale"] = scales.t().contiguous()
        qt[base + ".weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if not sym:
            qt[base + ".weight_zero_point"] = pack_ct(zeros.t() - half, bits, dim=0)
        if actorder == "group":
            qt[base + ".weight_g_idx"] = g_idx
        rt[name] = deq
    _save_pair(src, out, ref, qt, rt, ct_quant_config(bits, group, sym, actorder, ignore))


def _save_pair(src: str, out: str, ref: str, qt: dict, rt: dict, quant_config: dict) -> None:
    for d in (out, ref):
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(src):
            if not f.endswith(".safetensors") and os.path.isfile(os.path.join(src, f)):
                shutil.copy(os.path.join(src, f), d)
    save_file(qt, os.path.join(out, "model.safetensors"))
    save_file(rt, os.path.join(ref, "model.safetensors"))
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = quant_config
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
