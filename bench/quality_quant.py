"""Quality of weight-only quantization: held-out perplexity and next-token KL against the unquantized model, per mode.

    python bench/quality_quant.py                         # built-in model (trained on the Python stdlib), bf16
    python bench/quality_quant.py --outliers              # random 1.6B-shaped small model with outlier channels
    python bench/quality_quant.py --modes int8,int4-g128 --dtype float32 --backend torch --max-windows 8

Modes: 'int8' (symmetric per output channel) and 'int4-gG' (groups of G with zero points) / 'int4-gG-sym'
(symmetric), each optionally followed by the lm_head's scheme: ':int8', ':int6' (the defaults of int8 and int4),
':bf16' (unquantized) or ':same', each run as LLM(quantization=..., quantization_config={"group_size": G, "sym":
...}) against the same engine unquantized (same dtype and backend). Scoring is bench/quality.py's: perplexity of the
held-out text, KL(ref || run) over the reference's top k plus a rest bucket (a lower bound of the full-vocabulary
KL), top-1 agreement.

--outliers: random weights have no outlier channels, trained models do. This writes a random model with the 1.6B's
architecture (qkv bias, sequential residual, head_dim 64, intermediate / hidden = 2.75) shrunk to hidden 512 and 4
layers, linear weights of std 0.02, and injects (a) outlier input channels: 1% of every linear's input columns
scaled by 8, the same channels across layers, as the hidden states' outlier features; (b) outlier weights: 0.1% of
each linear's weights scaled by 10. Its perplexity means nothing (random model); its KL says how much each mode
loses to outliers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.quality import (BUILTIN_MODEL, cpu_name, heldout_windows, perplexity, run_engine,  # noqa: E402
                           topk_kl)

DEFAULT_MODES = "int8,int4-g32,int4-g32-sym,int4-g64,int4-g64-sym,int4-g128,int4-g128-sym"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


LM_HEAD = {"int8": "int8", "int6": "int6", "bf16": False, "same": True}


def mode_kwargs(mode: str) -> dict:
    """'int8' / 'int4-g64' / 'int4-g64-sym', optionally ':int8' / ':int6' / ':bf16' / ':same' (the lm_head: int8
    per channel; int6 in groups of 128; unquantized; as the other layers) -> LLM kwargs."""
    base, _, head = mode.partition(":")
    parts = base.split("-")
    if head and head not in LM_HEAD:
        raise ValueError(f"unknown lm_head {head!r} in mode {mode!r}: one of {', '.join(LM_HEAD)}")
    extra = {"lm_head": LM_HEAD[head]} if head else {}
    if parts == ["int8"]:
        return {"quantization": "int8", "quantization_config": extra}
    if parts[0] == "int4" and len(parts) in (2, 3) and parts[1].startswith("g") and parts[1][1:].isdigit() \
            and (len(parts) == 2 or parts[2] == "sym"):
        return {"quantization": "int4", "quantization_config": {"group_size": int(parts[1][1:]),
                                                                "sym": len(parts) == 3, **extra}}
    raise ValueError(f"unknown mode {mode!r}: 'int8', 'int4-g<G>' or 'int4-g<G>-sym', then optionally "
                     f"':int8', ':int6', ':bf16' or ':same' for the lm_head")


def write_outlier_model(out_dir: str, seed: int = 0) -> str:
    """A random 1.6B-shaped small model with injected outlier channels and weights (module doc), using the
    built-in model's tokenizer so the held-out text scores."""
    from safetensors.torch import load_file, save_file

    from stablelm_fast.tiny import write_random_weights

    os.makedirs(out_dir, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(BUILTIN_MODEL, f), out_dir)
    config = {"architectures": ["StableLmForCausalLM"], "model_type": "stablelm", "vocab_size": 4096,
              "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 8, "use_qkv_bias": True, "qk_layernorm": False, "use_parallel_residual": False,
              "max_position_embeddings": 1024, "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
              "layer_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 0,
              "eos_token_id": 0, "torch_dtype": "bfloat16"}
    write_random_weights(out_dir, config, seed, torch.bfloat16)
    path = os.path.join(out_dir, "model.safetensors")
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(seed + 1)
    channels: dict[int, torch.Tensor] = {}  # input width -> its outlier channels, shared by every layer
    for name, t in tensors.items():
        if name.endswith(".weight") and name.split(".")[-2] in LINEAR:
            w = t.float() * 0.25  # std 0.02 as a trained model's (0.08 makes a chaotic random model)
            k = w.shape[1]
            cols = channels.setdefault(k, torch.randperm(k, generator=gen)[: max(1, k // 100)])
            w[:, cols] *= 8
            spots = torch.rand(w.shape, generator=gen) < 1e-3
            w[spots] *= 10
            tensors[name] = w.to(t.dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    return out_dir


def measure(model: str, modes: list[str], windows: list[list[int]], top_k: int, base: dict) -> list[dict]:
    """The unquantized reference, then every mode; -> one row per run."""
    ref, ref_s = run_engine(model, windows, top_k, dict(base))
    rows = [{"mode": "unquantized", "perplexity": perplexity(ref), "kl_mean": 0.0, "kl_p99": 0.0, "top1": 1.0,
             "time_s": ref_s}]
    for mode in modes:
        run, run_s = run_engine(model, windows, top_k, dict(base, **mode_kwargs(mode)))
        kl = topk_kl(ref, run)
        rows.append({"mode": mode, "perplexity": perplexity(run), "kl_mean": kl.mean().item(),
                     "kl_p99": kl.quantile(0.99).item(),
                     "top1": (ref["top_ids"][:, 0] == run["top_ids"][:, 0]).double().mean().item(),
                     "time_s": run_s})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=BUILTIN_MODEL)
    ap.add_argument("--outliers", action="store_true", help="score the random outlier model instead (module doc)")
    ap.add_argument("--modes", default=DEFAULT_MODES)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        mode_kwargs(m)  # bad modes fail before any run
    from stablelm_fast.tokenizer import Tokenizer

    tmp = tempfile.mkdtemp(prefix="quality-outliers-") if args.outliers else None
    try:
        model = write_outlier_model(tmp) if tmp else args.model
        windows = heldout_windows(Tokenizer(model), args.window, args.max_windows or None)
        base = dict(dtype=args.dtype, backend=args.backend, num_kv_blocks=max(64, len(windows) * 2 * (
            args.window // 16 + 2)))
        rows = measure(model, modes, windows, args.top_k, base)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    n_pos = sum(len(w) - 1 for w in windows)
    print(f"{'outlier model (random, 1.6B-shaped)' if tmp else model}: {len(windows)} held-out windows, {n_pos} "
          f"scored tokens, top-{args.top_k} KL; dtype {args.dtype}, backend {args.backend}; {cpu_name()}")
    print("| mode | perplexity | ppl vs unquantized | KL mean | KL p99 | top-1 agreement | time s |")
    print("|---|---|---|---|---|---|---|")
    ref_ppl = rows[0]["perplexity"]
    for r in rows:
        print(f"| {r['mode']} | {r['perplexity']:.4f} | {100 * (r['perplexity'] / ref_ppl - 1):+.2f}% | "
              f"{r['kl_mean']:.3e} | {r['kl_p99']:.3e} | {r['top1']:.4f} | {r['time_s']:.1f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "outliers": bool(tmp), "dtype": args.dtype, "backend": args.backend,
                       "machine": cpu_name()}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
