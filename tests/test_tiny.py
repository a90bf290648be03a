"""The locally made checkpoints behind `make run`: loadable by the real loader, and the demo's one reads as words."""

from stablelm_fast import LLM, SamplingParams
from stablelm_fast.tiny import make_tiny_checkpoint


def test_readable_demo_checkpoint_samples_only_readable_tokens(tmp_path):
    model_dir = make_tiny_checkpoint(str(tmp_path / "demo"), "stablelm-2-1_6b", seed=0, readable=True)
    llm = LLM(model_dir, dtype="float32", backend="torch", num_kv_blocks=32)
    outs = llm.generate(["The quick brown fox", "Hello"],
                        SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, seed=1, ignore_eos=True))
    for out in outs:
        text = out.outputs[0].text
        assert len(out.outputs[0].token_ids) == 24 and text
        assert all(c.isascii() and (c.isalnum() or c in " ,.!?'") for c in text), text


def test_legacy_config_checkpoint_loads(tmp_path):
    model_dir = make_tiny_checkpoint(str(tmp_path / "legacy"), "stablelm-zephyr-3b", legacy_config=True)
    llm = LLM(model_dir, dtype="float32", backend="torch", num_kv_blocks=32)
    assert llm.engine.config.head_dim == 80 and llm.engine.config.rotary_dim == 20
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
