"""Weight-only int8 / int4 quantization: at load from a full-precision checkpoint, or pre-quantized GPTQ / AWQ /
compressed-tensors checkpoints. See config.py for how to ask for it, linear_method.py and prequantized.py for what a
layer holds."""

from stablelm_fast.quantization.config import METHODS, QuantConfig, resolve_quant_config

__all__ = ["METHODS", "QuantConfig", "resolve_quant_config", "rewrite_expected_shapes"]

LINEAR_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rewrite_expected_shapes(shapes: dict[str, tuple[int, ...]], quant: QuantConfig | None) -> set[str]:
    """A pre-quantized checkpoint: replace each quantized linear weight's entry by its packed tensors (in place);
    -> the names that may be absent (GPTQ's g_idx)."""
    from stablelm_fast.quantization.prequantized import checkpoint_shapes, optional_parts

    optional: set[str] = set()
    if quant is None or not quant.prequantized:
        return optional
    if quant.method == "compressed-tensors" and "lm_head.weight" in shapes and not quant.skips("lm_head"):
        raise ValueError("the compressed-tensors checkpoint quantizes lm_head (its config_groups target it and "
                         "`ignore` does not list it); a pre-quantized lm_head is not supported")
    for name in [n for n in shapes if n.endswith(".weight") and n.split(".")[-2] in LINEAR_WEIGHTS]:
        module = name[: -len(".weight")]
        if quant.skips(module):
            continue
        n, k = shapes.pop(name)
        for part, shape in checkpoint_shapes(quant, n, k, module).items():
            shapes[f"{module}.{part}"] = shape
            if part in optional_parts(quant):
                optional.add(f"{module}.{part}")
    return optional
