"""compressed-tensors (llm-compressor) pack-quantized checkpoints, written by tests/quant_checkpoint_writers.py from the
documented format, give the same greedy tokens and prompt logprobs as the same model dequantized and saved in fp32;
what the format can say beyond weight-only int4 / int8 is refused naming it."""

from __future__ import annotations

import copy

import pytest
import torch

from stablelm_fast import LLM
from stablelm_fast.ops.quant_reference import dequantize_weight, pack_int4
from stablelm_fast.quantization.config import _from_checkpoint
from stablelm_fast.quantization.formats import compressed_tensors_to_canonical
from tests.quant_checkpoint_writers import ct_quant_config, pack_ct, quantize_layer, write_compressed_tensors
from tests.quant_run import BUILTIN, KW, assert_same_run, config_only_copy, run_engine as _run

IGNORE_SOME = ("lm_head", "model.layers.0.self_attn.o_proj", r"re:.*layers\.2\.mlp\.(gate|up)_proj$")


def _check_same(q: str, ref: str, **kw) -> None:
    tokens, lps = _run(q, **kw)
    want_tokens, want_lps = _run(ref)
    assert_same_run((tokens, lps), (want_tokens, want_lps))


@pytest.mark.parametrize("bits,group,sym", [(4, 64, True), (4, 32, False), (4, -1, False), (8, -1, True),
                                            (8, 64, True)])
def test_converter_matches_documented_dequantization(bits, group, sym):
    """W = (q - z) * scale of the writer's quantization == the canonical form's dequantization, exactly."""
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(bits + group))
    g = 256 if group == -1 else group
    half = 1 << (bits - 1)
    q, scales, zeros, _, deq = quantize_layer(w, g, sym, None, bits, torch.bfloat16)
    zp = None if sym else pack_ct(zeros.t() - half, bits, dim=0)
    cq, cs, cz, g_idx = compressed_tensors_to_canonical(pack_ct(q - half, bits, dim=1), scales.t().contiguous(), zp,
                                                        None, bits, g)
    assert g_idx is None and (cz is None) == sym
    assert cq.dtype == (torch.uint8 if bits == 4 else torch.int8)
    got = dequantize_weight(pack_int4(cq) if bits == 4 else cq, cs, cz, bits, g)
    torch.testing.assert_close(got, deq, atol=0, rtol=0)


@pytest.mark.parametrize("bits,group,sym,actorder,ignore", [
    (4, 64, True, "group", ("lm_head",)),  # W4A16 GPTQ with act-order: g_idx permutes K
    (4, 128, False, None, IGNORE_SOME),  # asymmetric (packed zero points), an exact and a regex ignore
    (4, -1, False, "weight", ("lm_head",)),  # channel-wise; actorder 'weight' stores no g_idx
    (8, -1, True, None, ("re:lm_head",)),  # W8A16 per channel
    (8, 128, True, None, ("lm_head",)),  # W8A16 as compressed-tensors' preset now says: groups of 128
])
def test_compressed_tensors_matches_dequantized_reference(tmp_path, bits, group, sym, actorder, ignore):
    q, ref = str(tmp_path / "q"), str(tmp_path / "ref")
    write_compressed_tensors(BUILTIN, q, ref, bits, group, sym, actorder, ignore)
    _check_same(q, ref)  # quant_method detected from config.json


@pytest.mark.xdist_group("tp")
def test_compressed_tensors_under_tensor_parallelism(tmp_path):
    """TP=2 slices weight_packed / weight_scale along N (qkv, gate_up) and K (o_proj, down_proj), and the zero points
    packed along N: this rank's columns 8 to an int32."""
    q, ref = str(tmp_path / "q"), str(tmp_path / "ref")
    write_compressed_tensors(BUILTIN, q, ref, 4, 64, sym=False)
    _check_same(q, ref, tensor_parallel_size=2, quantization="compressed-tensors")


def _with(change) -> dict:
    hf = copy.deepcopy(ct_quant_config(4, 128, True))
    change(hf)
    return hf


def _group(hf: dict) -> dict:
    return hf["config_groups"]["group_0"]


REFUSED = {
    "W8A8 (input_activations)": (lambda hf: _group(hf).update(input_activations={
        "num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}), "input_activations"),
    "FP8 weights": (lambda hf: _group(hf)["weights"].update(type="float", num_bits=8), "type 'float'"),
    "marlin-24": (lambda hf: (hf.update(format="marlin-24"), _group(hf).pop("format")), "format 'marlin-24'"),
    "naive-quantized": (lambda hf: _group(hf).update(format="naive-quantized"), "format 'naive-quantized'"),
    "int-quantized": (lambda hf: (hf.update(format="int-quantized"), _group(hf).pop("format")),
                      "format 'int-quantized'"),
    "2:4 sparsity": (lambda hf: hf.update(sparsity_config={"format": "sparse-24-bitmask",
                                                           "sparsity_structure": "2:4"}), "sparsity"),
    "kv cache": (lambda hf: hf.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    "per-tensor": (lambda hf: _group(hf)["weights"].update(strategy="tensor", group_size=None), "strategy 'tensor'"),
    "asymmetric int8": (lambda hf: _group(hf)["weights"].update(num_bits=8, symmetric=False), "asymmetric int8"),
    "int2": (lambda hf: _group(hf)["weights"].update(num_bits=2), "num_bits=2"),
    "act-order per channel": (lambda hf: _group(hf)["weights"].update(strategy="channel", group_size=None,
                                                                      actorder="group"), "with strategy 'channel'"),
    "not compressed": (lambda hf: hf.update(quantization_status="frozen"), "quantization_status 'frozen'"),
    "preset group": (lambda hf: hf.update(config_groups={"W4A16": ["Linear"]}), "preset"),
    "class target": (lambda hf: _group(hf).update(targets=["Embedding"]), "module class 'Embedding'"),
    "two schemes": (lambda hf: hf["config_groups"].update(group_1=dict(
        copy.deepcopy(_group(hf)), targets=["re:.*mlp.*"],
        weights=dict(_group(hf)["weights"], group_size=64))), "different weight schemes"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_name_what_is_not_supported(case):
    change, match = REFUSED[case]
    with pytest.raises(ValueError, match=match):
        _from_checkpoint(_with(change))


def test_parsed_config():
    cfg = _from_checkpoint(ct_quant_config(4, 128, False, "group", IGNORE_SOME))
    assert (cfg.method, cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act) == ("compressed-tensors", 4, 128, False, True)
    assert not cfg.skips("model.layers.0.self_attn.q_proj") and cfg.skips("model.layers.0.self_attn.o_proj")
    assert cfg.skips("model.layers.2.mlp.up_proj") and not cfg.skips("model.layers.1.mlp.up_proj")
    assert cfg.skips("lm_head")
    # several groups with the same weight scheme: their targets joined (the rest is left in full precision)
    hf = _with(lambda hf: _group(hf).update(targets=["re:.*self_attn.*"]))
    hf["config_groups"]["group_1"] = dict(copy.deepcopy(_group(hf)), targets=["model.layers.0.mlp.down_proj"])
    cfg = _from_checkpoint(hf)
    assert not cfg.skips("model.layers.3.self_attn.k_proj") and not cfg.skips("model.layers.0.mlp.down_proj")
    assert cfg.skips("model.layers.1.mlp.down_proj")


def _config_only(tmp_path, quant_config: dict) -> str:
    return config_only_copy(str(tmp_path / "q"), quant_config)


def test_engine_refusals(tmp_path):
    q = _config_only(tmp_path, ct_quant_config(4, 128, True, ignore=()))
    with pytest.raises(ValueError, match="quantizes lm_head"):
        LLM(q, **KW)
    q = _config_only(tmp_path, ct_quant_config(4, 128, True, ignore=("lm_head", "model.layers.1.self_attn.k_proj")))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj: .*only some of its packed"):
        LLM(q, **KW)
    with pytest.raises(ValueError, match="already quantized"):
        LLM(q, quantization="int8", **KW)
    with pytest.raises(ValueError, match="quant_method 'compressed-tensors'"):
        LLM(BUILTIN, quantization="compressed-tensors", **KW)
    q = _config_only(tmp_path, _with(lambda hf: _group(hf)["weights"].update(type="float", num_bits=8)))
    with pytest.raises(ValueError, match="type 'float'"):
        LLM(q, **KW)
