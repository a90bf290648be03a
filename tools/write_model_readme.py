"""Write README.md next to a model made by tools/train_small_model.py, from its training_log.json (the figures are
never typed by hand).

    python tools/write_model_readme.py stablelm_fast/assets/stablelm-pystdlib-4m
"""

from __future__ import annotations

import json
import os
import sys


def render(model_dir: str) -> str:
    with open(os.path.join(model_dir, "training_log.json"), encoding="utf-8") as f:
        log = json.load(f)
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    a = log["args"]
    size = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
    rope = cfg.get("rope_parameters") or cfg
    hist = log["history"]
    curve = ", ".join(f"{h['step']}: {h['train_loss']:.2f}" for h in hist[:: max(1, len(hist) // 8)])
    return f"""# stablelm-pystdlib-4m

A {log['parameters'] / 1e6:.2f} M-parameter `StableLmForCausalLM` trained from scratch on the Python {log['python']}
standard library's source, in the shape of stablelm-2-12b: GQA ({cfg['num_attention_heads']} query heads, \
{cfg['num_key_value_heads']} key/value head), per-head QK LayerNorm, parallel residual, partial rotary
({rope['partial_rotary_factor']:.0%} of each {cfg['hidden_size'] // cfg['num_attention_heads']}-wide head), \
{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']}, untied lm_head.
Tokenizer: byte-level BPE, {cfg['vocab_size']} tokens (`<|endoftext|>` = 0, `<|im_start|>` = 1, `<|im_end|>` = 2),
trained on the training files only; `tokenizer_config.json` carries a ChatML chat template (the model itself was
never trained on chat). Weights: bf16 safetensors, {size / 2**20:.2f} MiB. It is `make run`'s model and the
yardstick of `bench/quality.py`. Made by `tools/train_small_model.py` (seeded: the same Python and torch give the
same weights):

    PYTHONPATH=. python tools/train_small_model.py --out {model_dir} --steps {a['steps']} --batch {a['batch']}

## Training (training_log.json, train.log.txt)

| | |
|---|---|
| data | {log['train_files']} stdlib .py files ({log['train_tokens_available']:,} tokens; tests, idlelib, lib2to3, encodings, pydoc_data left out), each ended by `<|endoftext|>` |
| held out | {len(log['heldout_files'])} files, by SHA-256 of the path (tools/stdlib_corpus.py): {', '.join(log['heldout_files'])} |
| steps | {log['steps']} x batch {a['batch']} x {a['seq_len']} tokens = {log['tokens_seen']:,} tokens seen (random windows) |
| optimizer | AdamW (0.9, 0.95), lr {a['lr']} after {a['warmup']} warmup steps, cosine to 10%, weight decay {a['weight_decay']}, clip 1.0 |
| wall time | {log['train_wall_s'] / 60:.1f} min of training ({log['total_wall_s'] / 60:.1f} min in all), {log['threads']} threads of an AMD EPYC Zen 4 shared with other jobs, torch {log['torch']} fp32 |
| final train loss | {log['final_train_loss']:.3f} (mean of the last {a['log_every']} steps) |
| held-out loss | {log['heldout_loss_fp32']:.3f} nats/token, perplexity **{log['heldout_perplexity_fp32']:.1f}** (fp32 weights, first {log['heldout_tokens_scored']:,} held-out tokens, 256-token windows) |

Train loss by step: {curve}.

Context: trained on {a['seq_len']}-token windows; `max_position_embeddings` is {cfg['max_position_embeddings']}, and
beyond {a['seq_len']} tokens its quality is not measured. It is a very small model that has seen a few hundred
thousand tokens: it writes Python-shaped text (indentation, `self.`, docstrings, `return`, `raise ValueError`),
not working programs.
"""


if __name__ == "__main__":
    model_dir = sys.argv[1]
    with open(os.path.join(model_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(render(model_dir))
