"""Small StableLM checkpoints made locally, in HF format: for tests and benchmarks (no downloads).

A byte-level BPE tokenizer is trained with `tokenizers` on a built-in text, with the StableLM special tokens and the
checkpoint's chat template; weights are random (or written by HF transformers in the tests).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from stablelm_fast.config import ModelConfig
from stablelm_fast.loader import expected_hf_shapes

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """StableLM is a family of language models. The quick brown fox jumps over the lazy dog.
A paged KV cache stores keys and values in fixed-size blocks shared by every sequence.
Continuous batching lets new requests join running ones at every step of the engine.
Once upon a time there was a small model that answered questions about the weather, cooking and travel.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is the capital.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: {} [] () <> + - * / = _ : ; , . ! ? ' " @ # $ % & |
Unicode: café, naïve, Grüße, 東京, 😀 emoji, ñ, ø, ß, привет, مرحبا.
def generate(prompt): return model(prompt) # code also appears in training text
"""

# Dimensions of the three families, shrunk: the head sizes (64, 80, 160), rotary fraction, GQA ratio, qkv bias,
# QK-norm and parallel residual are the real models'; widths and depths are small.
TINY_CONFIGS: dict[str, dict] = {
    "stablelm-2-1_6b": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, use_qkv_bias=True, qk_layernorm=False,
                            use_parallel_residual=False, chat_template=ZEPHYR_TEMPLATE, eos_token="<|endoftext|>"),
    "stablelm-zephyr-3b": dict(hidden_size=160, intermediate_size=432, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=2, use_qkv_bias=False, qk_layernorm=False,
                               use_parallel_residual=False, chat_template=ZEPHYR_TEMPLATE, eos_token="<|endoftext|>"),
    "stablelm-2-12b": dict(hidden_size=640, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1, use_qkv_bias=False, qk_layernorm=True,
                           use_parallel_residual=True, chat_template=CHATML_TEMPLATE, eos_token="<|im_end|>"),
}


def build_tokenizer(out_dir: str, chat_template: str, eos_token: str, vocab_size: int = 320) -> int:
    """Train and save tokenizer.json + tokenizer_config.json; returns the tokenizer's size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False} for t in SPECIAL_TOKENS}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
                   "eos_token": eos_token, "unk_token": "<|endoftext|>", "chat_template": chat_template,
                   "added_tokens_decoder": added, "model_max_length": 4096, "clean_up_tokenization_spaces": False},
                  f, indent=1)
    return tok.get_vocab_size()


def hf_config(variant: str, vocab_size: int, max_position_embeddings: int = 512) -> dict:
    spec = {k: v for k, v in TINY_CONFIGS[variant].items() if k not in ("chat_template", "eos_token")}
    return {"architectures": ["StableLmForCausalLM"], "model_type": "stablelm", "vocab_size": vocab_size,
            "max_position_embeddings": max_position_embeddings, "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25, "layer_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float32", **spec}


def to_legacy(config: dict) -> dict:
    """The spelling stablelm-zephyr-3b was first published with (StableLMEpochForCausalLM)."""
    legacy = {k: v for k, v in config.items()
              if k not in ("partial_rotary_factor", "layer_norm_eps", "qk_layernorm", "use_parallel_residual")}
    legacy.update(architectures=["StableLMEpochForCausalLM"], model_type="stablelm_epoch",
                  rope_pct=config["partial_rotary_factor"], norm_eps=config["layer_norm_eps"])
    return legacy


def write_random_weights(out_dir: str, config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
    """model.safetensors with every tensor of a StableLM checkpoint, random like a small trained model."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_hf_shapes(ModelConfig.from_dict(config)).items():
        if "norm" in name and name.endswith("weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("bias"):
            t = 0.05 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * (0.5 if "embed" in name else 0.08)
        tensors[name] = t.to(dtype).contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def keep_readable_tokens(out_dir: str) -> None:
    """Zero the lm_head rows of tokens that do not decode to plain readable text (partial UTF-8 bytes, control
    characters, special tokens) and scale the others up: a random model's logits for the zeroed tokens are then 0,
    far below the best readable ones, so its samples read as (random) words instead of byte soup. For demos only."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    path = os.path.join(out_dir, "model.safetensors")
    tensors = load_file(path)
    head = tensors["lm_head.weight"]
    for token_id in range(head.shape[0]):
        text = tok.decode([token_id], skip_special_tokens=True) if token_id < tok.get_vocab_size() else ""
        if not text or not all(c.isascii() and (c.isalnum() or c in " ,.!?'") for c in text):
            head[token_id] = 0
        else:  # sharpen: the best readable token's logit then sits far above the zeroed ones
            head[token_id] *= 8
    save_file(tensors, path, metadata={"format": "pt"})


def make_tiny_checkpoint(out_dir: str, variant: str = "stablelm-2-1_6b", seed: int = 0,
                         legacy_config: bool = False, readable: bool = False) -> str:
    """A complete HF-format folder (config, tokenizer, random safetensors weights); returns out_dir.
    readable=True: see keep_readable_tokens (readable random-weight demos)."""
    spec = TINY_CONFIGS[variant]
    vocab = build_tokenizer(out_dir, spec["chat_template"], spec["eos_token"])
    config = hf_config(variant, vocab)
    write_random_weights(out_dir, config, seed)
    if readable:
        keep_readable_tokens(out_dir)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(to_legacy(config) if legacy_config else config, f, indent=1)
    return out_dir
