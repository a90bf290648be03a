"""Train the small StableLM that `make run` embeds: a 12B-shaped StableLmForCausalLM on the Python stdlib's source.

    PYTHONPATH=. python tools/train_small_model.py --out stablelm_fast/assets/stablelm-pystdlib-4m

Architecture: transformers' StableLmForCausalLM in torch fp32 (so the saved folder is exactly HF's format) with the
stablelm-2-12b features: GQA (4 query heads share 1 key/value head), per-head QK LayerNorm, parallel residual, partial
rotary (25% of each 64-wide head). Tokenizer: byte-level BPE trained by `tokenizers` on the training split only.
Data: tools/stdlib_corpus.py (held-out split by file). Each file ends with <|endoftext|>; the token stream is cut
into random windows of --seq-len tokens (seeded). AdamW, linear warmup then cosine decay. Everything is seeded and
runs on --threads CPU threads, so one interpreter + torch version gives the same weights run after run.
Writes model.safetensors (bf16), config.json, generation_config.json, tokenizer.json, tokenizer_config.json (ChatML
chat template) and training_log.json (the figures the README quotes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stdlib_corpus import split  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str, max_len: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False} for t in SPECIAL_TOKENS}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE,
                   "added_tokens_decoder": added, "model_max_length": max_len, "clean_up_tokenization_spaces": False},
                  f, indent=1)
    return tok


def encode_stream(tok, texts: list[str]) -> torch.Tensor:
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def build_model(vocab_size: int, args):
    from transformers import StableLmConfig, StableLmForCausalLM

    config = StableLmConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions, rope_theta=10000.0, partial_rotary_factor=0.25, layer_norm_eps=1e-5,
        use_qkv_bias=False, qk_layernorm=True, use_parallel_residual=True, tie_word_embeddings=False,
        hidden_act="silu", bos_token_id=0, eos_token_id=0, attention_dropout=0.0, hidden_dropout=0.0)
    return StableLmForCausalLM(config)


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, seq_len: int, max_tokens: int) -> tuple[float, int]:
    """Mean next-token loss over non-overlapping seq_len windows of the held-out stream (first max_tokens)."""
    model.eval()
    n = min(len(stream), max_tokens + 1)
    total, count = 0.0, 0
    for start in range(0, n - 1, seq_len):
        chunk = stream[start:min(start + seq_len + 1, n)]
        if len(chunk) < 2:
            break
        logits = model(chunk[None, :-1]).logits.float()
        total += torch.nn.functional.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    model.train()
    return total / count, count


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=360)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-positions", type=int, default=1024, help="config max_position_embeddings")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens scored at the end")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--time-only", type=int, default=0, help="run this many steps, print s/step, write nothing")
    args = p.parse_args()

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)

    train_files, heldout_files = split()
    tok = train_tokenizer([t for _, t in train_files], args.vocab, args.out, args.max_positions)
    train_ids = encode_stream(tok, [t for _, t in train_files])
    heldout_ids = encode_stream(tok, [t for _, t in heldout_files])
    vocab = tok.get_vocab_size()
    print(f"corpus: {len(train_files)} train files ({len(train_ids)} tokens), {len(heldout_files)} held-out files "
          f"({len(heldout_ids)} tokens), vocab {vocab}, tokenizer+encode {time.time() - t_start:.1f} s", flush=True)

    model = build_model(vocab, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    steps = args.time_only or args.steps
    t_train = time.time()
    recent: list[float] = []
    history = []
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s:s + args.seq_len + 1] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-args.log_every:]
        if (step + 1) % args.log_every == 0 or step == 0:
            el = time.time() - t_train
            mean = sum(recent) / len(recent)
            history.append({"step": step + 1, "train_loss": round(mean, 4), "elapsed_s": round(el, 1)})
            print(f"step {step + 1}/{steps} loss {mean:.4f} lr {lr_at(step, args):.2e} {el:.0f} s "
                  f"({(step + 1) / el:.2f} steps/s)", flush=True)
    train_s = time.time() - t_train
    if args.time_only:
        print(f"{train_s / steps:.3f} s/step, {steps * args.batch * args.seq_len / train_s:.0f} tokens/s")
        return

    ho_loss, ho_tokens = heldout_loss(model, heldout_ids, args.seq_len, args.eval_tokens)
    final_train = sum(recent) / len(recent)
    print(f"held-out: loss {ho_loss:.4f}, perplexity {math.exp(ho_loss):.2f} over {ho_tokens} tokens", flush=True)

    model.config.use_cache = True
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 0, "max_length": args.max_positions}, f, indent=1)
    log = {
        "parameters": n_params, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
        "tokens_seen": args.steps * args.batch * args.seq_len, "train_tokens_available": len(train_ids),
        "train_files": len(train_files), "heldout_files": [r for r, _ in heldout_files],
        "heldout_tokens_scored": ho_tokens, "final_train_loss": round(final_train, 4),
        "heldout_loss_fp32": round(ho_loss, 4), "heldout_perplexity_fp32": round(math.exp(ho_loss), 3),
        "train_wall_s": round(train_s, 1), "total_wall_s": round(time.time() - t_start, 1),
        "args": vars(args), "python": platform.python_version(), "torch": torch.__version__,
        "threads": args.threads, "history": history,
    }
    with open(os.path.join(args.out, "training_log.json"), "w", encoding="utf-8") as f:
        json.dump(log, f, indent=1)
    print(json.dumps({k: v for k, v in log.items() if k not in ("history", "heldout_files", "args")}), flush=True)


if __name__ == "__main__":
    main()
