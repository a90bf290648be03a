"""engine/cpu_forward.py: every decoder layer in one C++ call. It runs the Python forward's kernels in the same order,
so an engine run through it must give the Python path's tokens and logprobs to the bit, for every model family,
dtype and linear method (float, int8 / int4 quantized at load, GPTQ act-order), through prefill, chunked prefill
mixed with decode, and decode steps."""

from __future__ import annotations

import pytest
import torch

from checkpoints import VARIANTS
from stablelm_fast import LLM, SamplingParams
from stablelm_fast.engine import cpu_forward
from stablelm_fast.ops import extension_available
from tests.quant_checkpoint_writers import write_prequantized
from tests.quant_run import BUILTIN

pytestmark = pytest.mark.skipif(not extension_available(), reason="the C++ extension is not built")

PARAMS = SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2, ignore_eos=True)


def _prompts(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"prompt_token_ids": torch.randint(6, vocab, (n,), generator=g).tolist()} for n in (9, 1, 30, 4)]


def _run(llm: LLM) -> list[tuple]:
    outs = llm.generate(_prompts(llm.engine.config.vocab_size), PARAMS)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.prompt_logprobs) for o in outs]


def _assert_fused_equals_python(model_dir: str, **kw) -> None:
    llm = LLM(model_dir, backend="cpu", num_kv_blocks=64, block_size=4, enable_prefix_caching=False, **kw)
    try:
        runner = llm.engine.executor
        assert runner.cpu_forward is not None, "the C++ forward should apply on the cpu backend in one process"
        fused = _run(llm)
        runner.cpu_forward = None  # the model's own (Python) forward, same weights, same cache
        python = _run(llm)
    finally:
        llm.shutdown()
    assert fused == python  # tokens and every logprob, exactly


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype,quant", [("bfloat16", {}), ("float32", {"quantization": "int8"}),
                                         ("bfloat16", {"quantization": "int4",
                                                       "quantization_config": {"group_size": 16}})])
def test_fused_forward_is_the_python_forward(hf_checkpoints, variant, dtype, quant):
    # max_num_batched_tokens 8: the 30-token prompt is prefilled in chunks, in steps shared with the others' decode
    _assert_fused_equals_python(hf_checkpoints[variant], dtype=dtype, max_num_batched_tokens=8, max_num_seqs=4,
                                **quant)


def test_fused_forward_gptq_act_order(tmp_path):
    """GPTQ with desc_act: the C++ layers permute x (x_perm) before the int4 GEMM, as the linear method does."""
    q, ref = str(tmp_path / "q"), str(tmp_path / "ref")
    write_prequantized(BUILTIN, q, ref, "gptq", 64, sym=True, desc_act=True)
    _assert_fused_equals_python(q, dtype="bfloat16")


def test_fused_forward_applies_only_where_it_can(tiny_model, monkeypatch):
    torch_llm = LLM(tiny_model, backend="torch", num_kv_blocks=16)
    assert torch_llm.engine.executor.cpu_forward is None  # another backend's ops
    monkeypatch.setenv(cpu_forward.ENV, "0")
    off = LLM(tiny_model, backend="cpu", num_kv_blocks=16)
    assert off.engine.executor.cpu_forward is None
    monkeypatch.delenv(cpu_forward.ENV)
    on = LLM(tiny_model, backend="cpu", num_kv_blocks=16)
    runner = on.engine.executor
    assert runner.cpu_forward is not None
    assert runner.cpu_forward.cpp.num_layers() == on.engine.config.num_hidden_layers
    # a linear layer whose weight was not packed for the C++ kernels: the model's own forward
    qkv = runner.model.model.layers[0].self_attn.qkv_proj
    qkv.weight.data = torch.zeros(qkv.out_features, qkv.in_features, dtype=qkv.weight.dtype)
    assert cpu_forward.build(runner.model, runner.kv_caches, "cpu") is None


def test_cpp_object_refuses_an_incomplete_layer():
    cpp = torch.classes.stablelm_fast.CpuForward(2, 2, 8, 1e-5, 8 ** -0.5, False)
    w = torch.zeros(16, 8, 2, dtype=torch.bfloat16)
    cpp.add_linear(w, None, None, None, None, 0, 0, False)
    ln = torch.ones(16, dtype=torch.bfloat16)
    cache = torch.zeros(4, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="expected 4 linear layers"):
        cpp.add_layer(ln, ln, ln, ln, None, None, cache, cache)
    with pytest.raises(RuntimeError, match="must be packed"):
        cpp.add_linear(torch.zeros(16, 16, dtype=torch.bfloat16), None, None, None, None, 0, 0, False)
    with pytest.raises(RuntimeError, match="not complete"):
        cpp.forward(torch.zeros(1, 16, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.int64),
                    torch.zeros(8, 4), torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int32),
                    torch.zeros(2, dtype=torch.int32), torch.ones(1, dtype=torch.int32), True)
