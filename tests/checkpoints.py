"""Small random StableLM checkpoints written by HF transformers itself (the oracle), one per model family."""

from __future__ import annotations

import json
import os

import torch

from stablelm_fast.tiny import TINY_CONFIGS, build_tokenizer, hf_config, to_legacy

VARIANTS = ("stablelm-2-1_6b", "stablelm-zephyr-3b", "stablelm-2-12b")


def update_json(path: str, **updates) -> None:
    """Set keys of a JSON file in place (a checkpoint's config.json, tokenizer_config.json)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**data, **updates}, f)


def make_hf_checkpoint(out_dir: str, variant: str, seed: int = 0, overrides: dict | None = None) -> str:
    """transformers' StableLmForCausalLM(config).save_pretrained(out_dir) + our tokenizer. The 3B-like variant's
    config.json is rewritten in the legacy StableLMEpoch spelling, as on the hub."""
    from transformers import StableLmConfig, StableLmForCausalLM

    spec = TINY_CONFIGS[variant]
    vocab = build_tokenizer(out_dir, spec["chat_template"], spec["eos_token"])
    cfg = hf_config(variant, vocab)
    cfg.update(overrides or {})
    torch.manual_seed(seed)
    fields = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = StableLmForCausalLM(StableLmConfig(**fields)).eval()
    with torch.no_grad():  # HF's init leaves norms at 1/0 and biases at 0: perturb them so they are exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)
    if variant == "stablelm-zephyr-3b":
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(to_legacy(cfg), f, indent=1)
    return out_dir


def load_hf(model_dir: str, variant: str, dtype: torch.dtype = torch.float32):
    """The HF model for a checkpoint made above (the legacy config is read back in the modern spelling)."""
    from transformers import StableLmConfig, StableLmForCausalLM

    spec = TINY_CONFIGS[variant]
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    cfg = hf_config(variant, raw["vocab_size"])
    fields = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    del spec
    config = StableLmConfig(**fields)
    model = StableLmForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype).eval()
    return model
