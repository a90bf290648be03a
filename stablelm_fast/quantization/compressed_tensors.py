"""config.json's `quantization_config` with quant_method 'compressed-tensors' (llm-compressor, vLLM) -> QuantConfig.

Supported: weight-only integer quantization stored in the `pack-quantized` format (the tensors: formats.py), e.g.

    {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
     "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": null, "output_activations": null,
                                   "weights": {"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
                                               "group_size": 128, "actorder": null, "dynamic": false}}},
     "ignore": ["lm_head"]}

num_bits 4 (symmetric or with zero points) or 8 (symmetric), strategy 'group' or 'channel', actorder None / 'weight'
(same tensors) / 'group' (a weight_g_idx). `format` at the top or per group ('mixed-precision' at the top when groups
carry their own). Several config groups are fine when their weight schemes are the same (their targets are joined).
`targets` and `ignore` name modules as compressed-tensors does: the class name 'Linear' (every linear layer), a module
name ('model.layers.0.mlp.down_proj', 'lm_head'), or 're:' and a regular expression matched from the name's start.

Anything else is refused naming what it is: activation quantization (W8A8, W4A8, FP8), float types (fp8, nvfp4,
mxfp4), other strategies (tensor, block, ...), formats other than pack-quantized (naive-quantized, int-quantized,
float-quantized, marlin-24, sparse ...), sparsity (2:4), transforms, KV-cache quantization, different schemes in
several groups, asymmetric int8, other bit widths, a quantized lm_head.
"""

from __future__ import annotations

import re
from typing import Any

FORMAT = "pack-quantized"
_ACTORDER = {None: False, False: False, "weight": False, "static": False, True: True, "group": True, "dynamic": True}


def _bad(what: str) -> ValueError:
    return ValueError(f"compressed-tensors checkpoint: {what} is not supported (only weight-only int4 / int8 in the "
                      f"'{FORMAT}' format)")


def _weights(name: str, scheme: Any, top_format: str | None) -> tuple:
    """One config group -> its normalized weight scheme (bits, sym, group_size, desc_act, format)."""
    if not isinstance(scheme, dict):
        raise _bad(f"config group {name!r} given as {scheme!r} (a preset name with targets)")
    for key in ("input_activations", "output_activations"):
        args = scheme.get(key)
        if args is not None:
            what = f"{args.get('type', 'int')}{args.get('num_bits', '')}" if isinstance(args, dict) else repr(args)
            raise _bad(f"config group {name!r}: {key} quantization ({what}, as in W8A8 / FP8 schemes)")
    fmt = scheme.get("format") or top_format
    if fmt != FORMAT:
        raise _bad(f"config group {name!r}: format {fmt!r}")
    w = scheme.get("weights")
    if not isinstance(w, dict):
        raise _bad(f"config group {name!r} without weight quantization")
    if str(w.get("type", "int")).lower() != "int":
        raise _bad(f"config group {name!r}: weights of type {w.get('type')!r} (float / fp8 / fp4)")
    bits, sym, group = w.get("num_bits", 8), w.get("symmetric", True), w.get("group_size")
    strategy = w.get("strategy")
    if strategy is None:  # compressed-tensors infers it from group_size
        strategy = "tensor" if group is None else "channel" if group == -1 else "group"
    strategy = str(strategy).lower()
    if bits not in (4, 8):
        raise _bad(f"config group {name!r}: num_bits={bits!r}")
    if strategy == "channel":
        group = -1
    elif strategy != "group":
        raise _bad(f"config group {name!r}: weight strategy {strategy!r}")
    elif not isinstance(group, int) or isinstance(group, bool) or group <= 0:
        raise _bad(f"config group {name!r}: strategy 'group' with group_size {group!r}")
    if bits == 8 and not sym:
        raise _bad(f"config group {name!r}: asymmetric int8 weights (symmetric=false)")
    if w.get("dynamic"):
        raise _bad(f"config group {name!r}: dynamic weight quantization (dynamic={w['dynamic']!r})")
    if w.get("block_structure") is not None:
        raise _bad(f"config group {name!r}: block_structure {w['block_structure']!r}")
    actorder = w.get("actorder")
    actorder = actorder.lower() if isinstance(actorder, str) else actorder
    if actorder not in _ACTORDER:
        raise _bad(f"config group {name!r}: actorder {w.get('actorder')!r}")
    if _ACTORDER[actorder] and group == -1:
        raise _bad(f"config group {name!r}: actorder {w.get('actorder')!r} with strategy 'channel'")
    return bits, bool(sym), group, _ACTORDER[actorder], fmt


def parse(hf: dict) -> dict:
    """quantization_config -> the QuantConfig fields (method 'compressed-tensors'); ValueError naming what is not
    supported."""
    status = hf.get("quantization_status") or "compressed"
    if status != "compressed":
        raise _bad(f"quantization_status {status!r} (weights not stored compressed)")
    for key in ("kv_cache_scheme", "transform_config"):
        if hf.get(key):
            raise _bad(f"{key} {hf[key]!r}")
    sparsity = hf.get("sparsity_config")
    if sparsity and not isinstance(sparsity, dict):
        raise _bad(f"sparsity_config {sparsity!r}")
    if sparsity and (sparsity.get("format", "dense") != "dense" or sparsity.get("sparsity_structure")
                     not in (None, "unstructured")):
        raise _bad(f"sparsity ({sparsity.get('sparsity_structure')!r}, format {sparsity.get('format')!r})")
    groups = hf.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("compressed-tensors checkpoint: quantization_config has no config_groups")
    top_format = hf.get("format")
    if top_format not in (FORMAT, "mixed-precision", None):
        raise _bad(f"format {top_format!r}")
    schemes = {name: _weights(name, scheme, top_format) for name, scheme in groups.items()}
    first, scheme = next(iter(schemes.items()))
    for name, other in schemes.items():
        if other != scheme:
            raise _bad(f"several config groups with different weight schemes ({first}: {_describe(scheme)}; "
                       f"{name}: {_describe(other)})")
    targets = [t for g in groups.values() for t in g.get("targets") or ()]
    ignore = list(hf.get("ignore") or ())
    for t in targets + ignore:
        if not isinstance(t, str):
            raise ValueError(f"compressed-tensors checkpoint: targets / ignore must be strings; got {t!r}")
        if _is_class(t) and t != "Linear":
            raise _bad(f"target / ignore by module class {t!r} (only 'Linear', module names and 're:' patterns)")
    if not targets:
        raise ValueError("compressed-tensors checkpoint: its config_groups target no modules")
    bits, sym, group, desc_act, _ = scheme
    return dict(method="compressed-tensors", bits=bits, group_size=group, sym=sym, desc_act=desc_act,
                modules_to_not_convert=tuple(ignore), targets=tuple(targets))


def _describe(scheme: tuple) -> str:
    bits, sym, group, desc_act, fmt = scheme
    return (f"int{bits} {'symmetric' if sym else 'asymmetric'} group_size {group}"
            f"{' act-order' if desc_act else ''} {fmt}")


def _is_class(target: str) -> bool:
    """'Linear' (a module class) rather than a module name ('lm_head', 'model.layers.0.mlp.down_proj')."""
    return not target.startswith("re:") and "." not in target and target[:1].isupper()


def matches(target: str, module: str) -> bool:
    """compressed-tensors' rule: 're:' + a regex matched at the name's start, a class name ('Linear': every layer
    we quantize is one), else the exact module name."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == "Linear" if _is_class(target) else target == module


def skips(targets: tuple[str, ...], ignore: tuple[str, ...], module: str) -> bool:
    """True: the HF linear module stays in full precision (not targeted, or ignored)."""
    return not any(matches(t, module) for t in targets) or any(matches(i, module) for i in ignore)
