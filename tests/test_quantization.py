"""Quantization at load (LLM(quantization='int8' | 'int4')): the engine runs exactly the weights the reference
quantizer makes (compared with the dequantized model saved in fp32), shards them under tensor parallelism, keeps no
full-precision copy, and refuses what it cannot do with errors naming the layer."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from stablelm_fast import LLM
from stablelm_fast.ops import get_ops
from stablelm_fast.ops.quant_reference import dequantize_weight, quantize_weight
from stablelm_fast.quantization import QuantConfig, resolve_quant_config

from tests.quant_run import BUILTIN, KW, assert_same_run, run_engine as _run
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _dequantized_copy(out: str, bits: int, group: int, sym: bool, lm_head: bool | str) -> str:
    """The built-in model with every quantized weight replaced by dequantize(quantize_weight(W)), in fp32 (lm_head:
    as quantization_config's: "int8" per output channel, "int6" in groups of 128, True as the others, False
    kept)."""
    os.makedirs(out)
    for f in os.listdir(BUILTIN):
        if not f.endswith(".safetensors") and os.path.isfile(os.path.join(BUILTIN, f)):
            shutil.copy(os.path.join(BUILTIN, f), out)
    tensors = load_file(os.path.join(BUILTIN, "model.safetensors"))
    for name, t in tensors.items():
        parts = name.split(".")
        scheme = (bits, group, sym) if name.endswith(".weight") and parts[-2] in LINEAR else None
        if name == "lm_head.weight" and lm_head:
            scheme = {"int8": (8, -1, True), "int6": (6, 128, True)}.get(lm_head, (bits, group, sym))
        if scheme is not None:
            b, g, sy = scheme
            g = t.shape[1] if g == -1 else g
            tensors[name] = dequantize_weight(*quantize_weight(t, b, g, sy), b, g)
    save_file(tensors, os.path.join(out, "model.safetensors"))
    return out


def test_quantized_at_load_runs_the_reference_quantizer_weights(tmp_path):
    """int4 symmetric groups of 64 with the lm_head (int8 runs the same path: test_dummy_weights_... below)."""
    ref = _dequantized_copy(str(tmp_path / "ref"), 4, 64, True, True)
    tokens, lps = _run(BUILTIN, quantization="int4", quantization_config={"group_size": 64, "sym": True,
                                                                          "lm_head": True})
    want_tokens, want_lps = _run(ref)
    assert_same_run((tokens, lps), (want_tokens, want_lps))


def test_int6_lm_head_runs_the_reference_quantizer_weights(tmp_path):
    """lm_head "int6" (int4's default where the backend has the kernel: every CPU): groups of 128, symmetric."""
    if 6 not in get_ops("cpu").quant_bits():
        pytest.skip("no int6 kernel in this process's layout: the lm_head is int8 (test_int6_lm_head_falls_back)")
    ref = _dequantized_copy(str(tmp_path / "ref"), 8, -1, True, "int6")
    tokens, lps = _run(BUILTIN, quantization="int8", quantization_config={"lm_head": "int6"})
    assert_same_run((tokens, lps), _run(ref))


def test_int6_lm_head_falls_back_to_int8_without_the_kernel():
    class NoInt6:
        @staticmethod
        def quant_bits():
            return (8, 4)

    int4 = resolve_quant_config("int4", None, BUILTIN)
    assert int4.lm_head == "int6"
    assert int4.linear_method(NoInt6, "lm_head", in_features=2048).bits == 8
    head = int4.linear_method(get_ops("torch"), "lm_head", in_features=2048)  # the reference runs every width
    assert (head.bits, head.group_size, head.sym) == (6, 128, True)
    assert int4.linear_method(get_ops("torch"), "lm_head", in_features=96).group_size == -1  # 128 does not divide


def _default_lm_head() -> str:
    return "int6" if 6 in get_ops("cpu").quant_bits() else "int8"


@pytest.mark.xdist_group("tp")
def test_int4_under_tensor_parallelism(tmp_path):
    """Column-parallel shards quantize their rows, row-parallel ones their K slice (192 = 3 groups of 64 here):
    the same groups as TP=1, so the same weights (the lm_head: int4's default, split over the vocabulary)."""
    ref = _dequantized_copy(str(tmp_path / "ref"), 4, 64, False, _default_lm_head())
    tokens, lps = _run(BUILTIN, tensor_parallel_size=2, quantization="int4", quantization_config={"group_size": 64})
    want_tokens, want_lps = _run(ref)
    assert_same_run((tokens, lps), (want_tokens, want_lps))


def test_resident_weights_are_the_quantized_ones():
    from stablelm_fast.layers.linear import LinearBase

    llm = LLM(BUILTIN, quantization="int4", **KW)
    model = llm.engine.executor.model
    layers = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert len(layers) == 4 * 4  # qkv, o, gate_up, down per decoder layer
    for layer in layers:
        full = [p for p in layer.parameters() if p.is_floating_point() and p.numel() >= layer.in_features]
        assert full == [], layer.prefix  # no full-precision copy of the weight is kept
        assert layer.w_q.dtype == torch.uint8 and layer.w_q.numel() == layer.out_features * layer.in_features // 2
        assert layer.w_zeros is not None and layer.w_group == 128  # the int4 default: groups of 128, zero points
    head = model.lm_head  # int4's default: int6 in groups of 128 (int8 per channel without the int6 kernel)
    int6 = _default_lm_head() == "int6"
    assert not hasattr(head, "weight") and head.linear_method.bits == (6 if int6 else 8) and head.w_zeros is None
    assert head.w_group == (128 if int6 else 256)  # int8: the hidden size, one group per output channel
    llm.shutdown()
    llm = LLM(BUILTIN, quantization="int4", quantization_config={"lm_head": False}, **KW)
    assert llm.engine.executor.model.lm_head.weight.dtype == torch.float32  # kept as loaded, as vLLM does
    llm.shutdown()


def test_dummy_weights_quantize_the_same_draw():
    """load_format='dummy' + int8 gives the unquantized dummy model's weights, quantized."""
    runs = []
    for quant in (None, "int8"):
        llm = LLM(BUILTIN, load_format="dummy", quantization=quant, **KW)
        runs.append(llm.engine.executor.model.model.layers[0].mlp.down_proj)
        llm.shutdown()
    plain, quantized = runs
    assert quantized.w_q.dtype == torch.int8 and quantized.w_group == 384 and quantized.w_zeros is None
    want = dequantize_weight(*quantize_weight(plain.weight, 8, 384, True), 8, 384)  # per output channel
    w = dequantize_weight(quantized.w_q, quantized.w_scales, quantized.w_zeros, 8, quantized.w_group)
    torch.testing.assert_close(w, want, atol=0, rtol=0)


def test_group_size_must_divide_the_layer():
    from stablelm_fast.layers.linear import RowParallelLinear
    from stablelm_fast.layers.parallel import TPInfo
    from stablelm_fast.ops import get_ops

    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: 384 input features .* group_size 256"):
        LLM(BUILTIN, quantization="int4", quantization_config={"group_size": 256}, **KW)
    int4 = resolve_quant_config("int4", None, BUILTIN)  # groups of 128: 384 / 2 = 192 per rank does not fit
    with pytest.raises(ValueError, match=r"down_proj: 192 input features \(this rank's part with "
                                         r"tensor_parallel_size=2\) are not divisible .* group_size 128"):
        RowParallelLinear(384, 256, get_ops("torch"), TPInfo(0, 2), "intermediate_size", int4, "down_proj")


@pytest.mark.parametrize("quantization,qconfig,match", [
    ("int3", None, "quantization must be one of"), ("int8", {"sym": False}, "symmetric only"),
    ("int4", {"group_size": 5}, "group_size must be"), ("int4", {"lm_head": "int4"}, "lm_head must be"),
    ("int4", {"groupsize": 64}, "unknown key 'groupsize'"),
    (None, {"group_size": 64}, "needs quantization="), ("gptq", None, "needs a checkpoint")])
def test_quantization_arguments_are_checked(quantization, qconfig, match):
    with pytest.raises(ValueError, match=match):
        resolve_quant_config(quantization, qconfig, BUILTIN)


def test_config_defaults_and_round_trip():
    assert resolve_quant_config(None, None, BUILTIN) is None
    int8 = resolve_quant_config("int8", None, BUILTIN)
    assert (int8.bits, int8.group_for(2048), int8.sym, int8.lm_head) == (8, 2048, True, "int8")
    assert resolve_quant_config("int4", None, BUILTIN).lm_head == "int6"  # as llama.cpp's Q4_0 (Q6_K output)
    int4 = resolve_quant_config("int4", {"group_size": 32, "sym": True, "lm_head": True}, BUILTIN)
    assert (int4.bits, int4.group_size, int4.sym, int4.lm_head) == (4, 32, True, True)
    assert QuantConfig.from_dict(int4.to_dict()) == int4
