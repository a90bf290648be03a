import json

import pytest

from stablelm_fast.config import ModelConfig

SHAPES = {  # the three hub checkpoints' config.json (copied from their model pages)
    "stablelm-2-zephyr-1_6b": dict(architectures=["StableLmForCausalLM"], model_type="stablelm", vocab_size=100352,
                                   hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                                   num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                   rope_theta=10000, partial_rotary_factor=0.25, layer_norm_eps=1e-05,
                                   use_qkv_bias=True, qk_layernorm=False, use_parallel_residual=False,
                                   tie_word_embeddings=False, bos_token_id=100257, eos_token_id=100257,
                                   torch_dtype="bfloat16"),
    "stablelm-zephyr-3b.legacy": dict(architectures=["StableLMEpochForCausalLM"], model_type="stablelm_epoch",
                                      vocab_size=50304, hidden_size=2560, intermediate_size=6912,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                      max_position_embeddings=4096, rope_theta=10000, rope_pct=0.25, norm_eps=1e-05,
                                      use_qkv_bias=False, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                                      torch_dtype="bfloat16"),
    "stablelm-2-12b-chat": dict(architectures=["StableLmForCausalLM"], model_type="stablelm", vocab_size=100352,
                                hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                                rope_theta=10000, partial_rotary_factor=0.25, layer_norm_eps=1e-05,
                                use_qkv_bias=False, qk_layernorm=True, use_parallel_residual=True,
                                tie_word_embeddings=False, bos_token_id=100257, eos_token_id=100257,
                                torch_dtype="bfloat16"),
}


def test_real_configs():
    small = ModelConfig.from_dict(SHAPES["stablelm-2-zephyr-1_6b"])
    assert (small.head_dim, small.rotary_dim, small.use_qkv_bias) == (64, 16, True)
    legacy = ModelConfig.from_dict(SHAPES["stablelm-zephyr-3b.legacy"])
    assert (legacy.head_dim, legacy.rotary_dim, legacy.layer_norm_eps) == (80, 20, 1e-5)
    assert legacy.eos_token_id == [0]
    big = ModelConfig.from_dict(SHAPES["stablelm-2-12b-chat"])
    assert (big.head_dim, big.rotary_dim, big.num_key_value_heads) == (160, 40, 8)
    assert big.qk_layernorm and big.use_parallel_residual


def test_rope_parameters_spelling_and_dtype_key():
    raw = dict(SHAPES["stablelm-2-12b-chat"])
    del raw["rope_theta"], raw["partial_rotary_factor"], raw["torch_dtype"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}
    raw["dtype"] = "float16"
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.rope_theta, cfg.rotary_dim, cfg.torch_dtype) == (500.0, 80, "float16")


def test_unknown_architecture_is_named(tmp_path):
    raw = dict(SHAPES["stablelm-2-12b-chat"], architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_unsupported_rope_type_is_refused():
    raw = dict(SHAPES["stablelm-2-12b-chat"], rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_dict(raw)
