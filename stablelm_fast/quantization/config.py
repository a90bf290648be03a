"""Which quantization a model runs with: `LLM(..., quantization=..., quantization_config=...)` and config.json.

    quantization="int8"   quantize at load from a bf16/fp16/fp32 checkpoint: symmetric, per output channel
    quantization="int4"   quantize at load: groups of 128 along K with zero points (asymmetric)
    quantization="gptq"   a GPTQ 4-bit checkpoint (AutoGPTQ / GPTQModel / llm-compressor's GPTQ export)
    quantization="awq"    an AWQ 4-bit GEMM checkpoint (AutoAWQ)
    quantization="compressed-tensors"  an llm-compressor checkpoint (vLLM's `compressed_tensors`): weight-only int4
                          (symmetric or with zero points) or symmetric int8, group-wise or per channel, act-order,
                          in the 'pack-quantized' format, with its `ignore` list (compressed_tensors.py says what
                          else it can say and is refused: activation quantization, fp8, 2:4 sparsity, ...)
    quantization=None     what config.json's `quantization_config` says (vLLM's auto-detection), else none

`quantization_config` (a dict; CLI: `--quantization-config JSON`) tunes int8 / int4 with the keys a checkpoint's
`quantization_config` uses: `group_size` (32 / 64 / 128 ...; -1 = one group per output channel), `sym` (True:
symmetric, no zero points; int4 only may be False), `lm_head`: "int8" (per output channel; the default of
quantization="int8", as llama.cpp's Q8_0 files keep their output layer in Q8_0), "int6" (symmetric, groups of 128;
the default of quantization="int4", as llama.cpp's Q4_0 files keep theirs in Q6_K: 6.25 bits a weight, 22% fewer
bytes than int8; int8 where the backend has no int6 kernel, `ops.quant_bits()`: Triton), True (the same scheme as
the other layers) or False (kept in the model's dtype, as vLLM does). The lm_head of a 1.6B is a quarter of its weights
(100352 x 2048): in bf16 it would read more bytes per decoded token than every int4 decoder layer together.
Embeddings and norms are never quantized. Pre-quantized checkpoints keep their lm_head as stored.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

METHODS = ("int8", "int4", "gptq", "awq", "compressed-tensors")
_PREQUANTIZED = ("gptq", "awq", "compressed-tensors")
_DEFAULTS = {"int8": dict(bits=8, group_size=-1, sym=True), "int4": dict(bits=4, group_size=128, sym=False)}
_TUNABLE = ("group_size", "sym", "lm_head")
LM_HEAD_DEFAULT = {"int8": "int8", "int4": "int6"}  # as llama.cpp's Q8_0 / Q4_0 files (module doc)
INT6_GROUP = 128


@dataclass(frozen=True)
class QuantConfig:
    method: str  # one of METHODS
    bits: int
    group_size: int  # -1: one group per output channel (K)
    sym: bool
    lm_head: bool | str = False  # False: unquantized; True: as the other layers; "int8" / "int6" (module doc)
    desc_act: bool = False  # GPTQ act-order: g_idx permutes the input features
    zero_offset: int = 0  # GPTQ v1 checkpoints store zero points minus one
    modules_to_not_convert: tuple[str, ...] = field(default_factory=tuple)  # compressed-tensors: its `ignore`
    targets: tuple[str, ...] = field(default_factory=tuple)  # compressed-tensors: what its config_groups target

    @property
    def prequantized(self) -> bool:
        return self.method in _PREQUANTIZED

    def group_for(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size

    def skips(self, hf_module: str) -> bool:
        """AWQ's modules_to_not_convert (matched as a part of the HF module name), compressed-tensors' targets and
        ignore (compressed_tensors.skips): kept in full precision."""
        if self.method == "compressed-tensors":
            from stablelm_fast.quantization.compressed_tensors import skips
            return skips(self.targets, self.modules_to_not_convert, hf_module)
        return any(m and m in hf_module for m in self.modules_to_not_convert)

    def linear_method(self, ops: Any, prefix: str, in_features: int | None = None) -> Any:
        """The method of the layer named prefix (HF module names; packed layers: qkv_proj, gate_up_proj), or None
        to keep it unquantized. in_features: the lm_head's (its int6 groups: 128 where they divide it, else one per
        output channel)."""
        from stablelm_fast.quantization.linear_method import QuantizedLinearMethod
        from stablelm_fast.quantization.prequantized import PrequantizedLinearMethod

        if prefix == "lm_head":
            if not self.lm_head:
                return None
            if self.lm_head == "int6" and 6 in ops.quant_bits():
                g = INT6_GROUP if in_features is None or in_features % INT6_GROUP == 0 else -1
                return QuantizedLinearMethod(ops, 6, g, True, prefix)
            if self.lm_head in ("int8", "int6"):
                return QuantizedLinearMethod(ops, 8, -1, True, prefix)
        skipped = [self.skips(name) for name in unpacked_names(prefix)]
        if any(skipped):
            if not all(skipped):
                raise ValueError(f"{prefix}: modules_to_not_convert keeps only some of its packed projections "
                                 f"unquantized; that is not supported")
            return None
        if self.prequantized:
            return PrequantizedLinearMethod(ops, self, prefix)
        return QuantizedLinearMethod(ops, self.bits, self.group_size, self.sym, prefix)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "QuantConfig | None":
        return None if d is None else cls(**dict(d, modules_to_not_convert=tuple(d.get("modules_to_not_convert", ())),
                                                 targets=tuple(d.get("targets", ()))))


PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def unpacked_names(prefix: str) -> list[str]:
    """Our layer name -> the HF module names packed into it ('...qkv_proj' -> '...q_proj', '...k_proj', ...)."""
    head, _, last = prefix.rpartition(".")
    return [f"{head}.{p}" if head else p for p in PACKED.get(last, (last,))]


def read_hf_quant_config(model_dir: str | None) -> dict | None:
    """config.json's `quantization_config` (None if the folder or the key is absent)."""
    path = os.path.join(model_dir, "config.json") if model_dir else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("quantization_config")


def _on_the_fly(method: str, overrides: dict) -> QuantConfig:
    unknown = sorted(set(overrides) - set(_TUNABLE))
    if unknown:
        raise ValueError(f"quantization_config has unknown key {unknown[0]!r} (known for {method!r}: "
                         f"{', '.join(_TUNABLE)})")
    cfg = dict(_DEFAULTS[method], lm_head=LM_HEAD_DEFAULT[method])
    cfg.update(overrides)
    if cfg["lm_head"] not in (True, False, "int8", "int6"):
        raise ValueError(f"quantization_config lm_head must be \"int8\", \"int6\", true or false; got "
                         f"{cfg['lm_head']!r}")
    g = cfg["group_size"]
    if not isinstance(g, int) or isinstance(g, bool) or (g != -1 and (g < 2 or g % 2)):
        raise ValueError(f"quantization_config group_size must be -1 (per output channel) or an even integer >= 2; "
                         f"got {g!r}")
    if method == "int8" and not cfg["sym"]:
        raise ValueError("quantization 'int8' is symmetric only: quantization_config sym=False is not supported")
    return QuantConfig(method, cfg["bits"], g, bool(cfg["sym"]), lm_head=cfg["lm_head"])


def _from_checkpoint(hf: dict) -> QuantConfig:
    method = str(hf.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        from stablelm_fast.quantization.compressed_tensors import parse
        return QuantConfig(**parse(hf))
    bits, group = hf.get("bits", hf.get("w_bit")), hf.get("group_size", hf.get("q_group_size", -1))
    if bits != 4:
        raise ValueError(f"{method} checkpoints with bits={bits} are not supported (4-bit only)")
    if not isinstance(group, int) or (group != -1 and group < 8):
        raise ValueError(f"{method} checkpoint group_size {group!r} is not supported")
    if method == "gptq":
        fmt = hf.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported ('gptq' or 'gptq_v2')")
        if hf.get("lm_head"):
            raise ValueError("GPTQ checkpoints with a quantized lm_head are not supported")
        return QuantConfig("gptq", 4, group, bool(hf.get("sym", True)), desc_act=bool(hf.get("desc_act", False)),
                           zero_offset=1 if fmt == "gptq" else 0)
    version = str(hf.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported (only 'gemm', AutoAWQ's default)")
    if not hf.get("zero_point", True):
        raise ValueError("AWQ checkpoints without zero points (zero_point=false) are not supported")
    return QuantConfig("awq", 4, group, False, modules_to_not_convert=tuple(hf.get("modules_to_not_convert") or ()))


def resolve_quant_config(quantization: str | None, overrides: dict | None, model_dir: str | None,
                         load_format: str = "auto") -> QuantConfig | None:
    """LLM(quantization=, quantization_config=) and the checkpoint's config.json -> the QuantConfig (or None)."""
    if quantization is not None and quantization not in METHODS:
        raise ValueError(f"quantization must be one of {', '.join(repr(m) for m in METHODS)} or None; "
                         f"got {quantization!r}")
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"quantization_config must be a dict; got {type(overrides).__name__}")
    hf = read_hf_quant_config(model_dir)
    hf_method = str(hf.get("quant_method", "")).lower() if hf else None
    if hf_method is not None and hf_method not in _PREQUANTIZED:
        raise ValueError(f"checkpoint quantization_config quant_method {hf_method!r} is not supported "
                         f"(supported: {', '.join(repr(m) for m in _PREQUANTIZED)})")
    if quantization is None:
        quantization = hf_method
        if quantization is None:
            if overrides:
                raise ValueError("quantization_config needs quantization='int8' or 'int4'")
            return None
    if quantization in _PREQUANTIZED:
        if hf_method != quantization:
            raise ValueError(f"quantization={quantization!r} needs a checkpoint whose config.json has a "
                             f"quantization_config with quant_method {quantization!r}; found "
                             f"{hf_method or 'none'}")
        if overrides:
            raise ValueError(f"quantization_config overrides apply to 'int8' / 'int4' only, not {quantization!r} "
                             f"(the checkpoint's config.json says how it is quantized)")
        if load_format == "dummy":
            raise ValueError(f"load_format='dummy' cannot make {quantization!r} weights; load the checkpoint")
        return _from_checkpoint(hf)
    if hf_method is not None:
        raise ValueError(f"the checkpoint is already quantized ({hf_method}); drop quantization={quantization!r} "
                         f"(or pass quantization={hf_method!r})")
    return _on_the_fly(quantization, overrides or {})
