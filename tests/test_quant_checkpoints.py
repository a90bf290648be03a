"""Pre-quantized GPTQ / AWQ checkpoints (written by tests/quant_checkpoint_writers.py, following the documented
layouts) give the same prompt logprobs and greedy tokens as the same model dequantized and saved in fp32."""

from __future__ import annotations

import pytest

from stablelm_fast import LLM
from tests.quant_checkpoint_writers import write_prequantized
from tests.quant_run import BUILTIN, KW, assert_same_run, config_only_copy, run_engine as _run


# NOTE: GPTQ without act-order, asymmetric, is the tensor-parallel test's checkpoint below
@pytest.mark.parametrize("method,group,sym,desc_act", [("gptq", 64, True, True), ("awq", 128, False, False)])
def test_prequantized_matches_dequantized_reference(tmp_path, method, group, sym, desc_act):
    q, ref = str(tmp_path / "q"), str(tmp_path / "ref")
    write_prequantized(BUILTIN, q, ref, method, group, sym=sym, desc_act=desc_act)
    tokens, lps = _run(q)  # quant_method detected from config.json
    want_tokens, want_lps = _run(ref)
    assert_same_run((tokens, lps), (want_tokens, want_lps))


@pytest.mark.xdist_group("tp")
def test_gptq_under_tensor_parallelism(tmp_path):
    """TP=2 shards qweight along N (qkv, gate_up) and along K (o_proj, down_proj: K / 2 = 192 = 3 groups of 64)."""
    q, ref = str(tmp_path / "q"), str(tmp_path / "ref")
    write_prequantized(BUILTIN, q, ref, "gptq", 64, sym=False)
    tokens, lps = _run(q, tensor_parallel_size=2, quantization="gptq")
    want_tokens, want_lps = _run(ref)
    assert_same_run((tokens, lps), (want_tokens, want_lps))


def test_prequantized_refusals(tmp_path):
    # config.json and tokenizer only: every refusal comes before the weights are read
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True}
    q = config_only_copy(str(tmp_path / "q"), gptq)
    with pytest.raises(ValueError, match="already quantized"):
        LLM(q, quantization="int4", **KW)
    with pytest.raises(ValueError, match="quant_method 'awq'"):
        LLM(q, quantization="awq", **KW)
    with pytest.raises(ValueError, match="quant_method 'gptq'"):
        LLM(BUILTIN, quantization="gptq", **KW)
    with pytest.raises(ValueError, match="dummy"):
        LLM(q, load_format="dummy", **KW)
    config_only_copy(q, {**gptq, "bits": 8})
    with pytest.raises(ValueError, match="bits=8 are not supported"):
        LLM(q, **KW)


def test_act_order_refused_for_row_parallel_shards():
    from stablelm_fast.layers.linear import RowParallelLinear
    from stablelm_fast.layers.parallel import TPInfo
    from stablelm_fast.ops import get_ops
    from stablelm_fast.quantization import QuantConfig

    act_order = QuantConfig("gptq", 4, 64, True, desc_act=True, zero_offset=1)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: GPTQ act-order"):
        RowParallelLinear(384, 256, get_ops("torch"), TPInfo(0, 2), "intermediate_size", act_order,
                          "model.layers.0.mlp.down_proj")
    RowParallelLinear(384, 256, get_ops("torch"), TPInfo(0, 1), "intermediate_size", act_order, "down_proj")
