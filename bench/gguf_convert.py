"""Convert an HF-format StableLM checkpoint (ours, e.g. the bench's 1.6B-shaped one) to a GGUF for llama.cpp.

    python bench/gguf_convert.py [MODEL] [--out FILE.gguf] [--outtype bf16|f32|f16] [--check]

Only what llama.cpp's "stablelm" architecture needs, so that llama.cpp loads the same weights and runs the same
shapes at full speed: the hyperparameters (stablelm.* keys; rope dimension count = the rotary part of a head),
2-D weights in --outtype (bf16 default: the same bytes our engine reads), 1-D norms/biases in f32 (as llama.cpp's
own converter keeps them), and a gpt2-style BPE tokenizer (tokens + merges from tokenizer.json, padded to the model's
vocab with unused dummy tokens). 12B-style per-head QK-norm weights are stacked into one [heads, head_dim] tensor.
Needs `pip install gguf`. --check loads the file with llama-cpp-python and greedily generates a few tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# HF tensor suffix (after model.layers.N.) -> llama.cpp tensor base name (after blk.N.)
LAYER_MAP = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.q_layernorm": "attn_q_norm",
    "self_attn.k_layernorm": "attn_k_norm",
}
GLOBAL_MAP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def default_out(model_dir: str, outtype: str) -> str:
    return os.path.join(common.RESULTS_DIR, f"{os.path.basename(model_dir.rstrip('/'))}-{outtype}.gguf")


def gguf_name(hf_name: str) -> str:
    base, _, kind = hf_name.rpartition(".")
    if base in GLOBAL_MAP:
        return f"{GLOBAL_MAP[base]}.{kind}"
    parts = base.split(".")
    if parts[:2] == ["model", "layers"]:
        layer, rest = parts[2], ".".join(parts[3:])
        if rest in LAYER_MAP:
            return f"blk.{layer}.{LAYER_MAP[rest]}.{kind}"
    raise ValueError(f"no llama.cpp name for tensor {hf_name!r}")


def tokenizer_metadata(model_dir: str, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges "a b") from tokenizer.json, padded to vocab_size."""
    import gguf

    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    model = tj["model"]
    if model.get("type", "BPE") != "BPE":
        raise SystemExit(f"only BPE tokenizers are converted; got {model.get('type')}")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    special: set[int] = set()
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special", False):
            special.add(added["id"])
    if max(by_id) >= vocab_size:
        raise SystemExit(f"tokenizer has id {max(by_id)} >= the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:  # ids the tokenizer never produces (the model's vocab is padded): unique, unused placeholders
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, [int(t) for t in types], merges


def convert(model_dir: str, out: str, outtype: str = "bf16") -> str:
    import gguf
    import torch
    from safetensors import safe_open

    cfg = common.load_config(model_dir)
    heads = cfg["num_attention_heads"]
    head_dim = cfg["hidden_size"] // heads
    rotary = cfg.get("partial_rotary_factor", cfg.get("rope_pct", 0.25))
    ftype = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "f32": gguf.LlamaFileType.ALL_F32}[outtype]
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "f16": gguf.GGMLQuantizationType.F16,
             "f32": gguf.GGMLQuantizationType.F32}[outtype]

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    w = gguf.GGUFWriter(out, "stablelm")
    w.add_name(os.path.basename(model_dir.rstrip("/")))
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(int(rotary * head_dim))
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads", heads))
    w.add_parallel_residual(bool(cfg.get("use_parallel_residual", False)))
    w.add_layer_norm_eps(float(cfg.get("layer_norm_eps", cfg.get("norm_eps", 1e-5))))
    w.add_file_type(ftype)

    tokens, types, merges = tokenizer_metadata(model_dir, cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # our tokenizer's pre-tokenizer: byte-level with GPT-2's split regex
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = cfg.get("eos_token_id", 0)
    eos = eos[0] if isinstance(eos, list) else eos
    w.add_bos_token_id(int(cfg.get("bos_token_id", eos) or 0))
    w.add_eos_token_id(int(eos or 0))
    w.add_add_bos_token(False)

    qk_norms: dict[str, list] = {}
    files = [os.path.join(model_dir, f) for f in sorted(os.listdir(model_dir)) if f.endswith(".safetensors")]
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                t = f.get_tensor(name)
                if ".q_layernorm.norms." in name or ".k_layernorm.norms." in name:
                    # per-head norms -> one [heads, head_dim] tensor per layer (in head order)
                    base, idx = name.rsplit(".norms.", 1)
                    qk_norms.setdefault(base, []).append((int(idx.split(".")[0]), t))
                    continue
                add(w, gguf_name(name), t, qtype, torch)
    for base, parts in qk_norms.items():
        stacked = torch.stack([t for _, t in sorted(parts, key=lambda p: p[0])])
        add(w, gguf_name(base + ".weight"), stacked, qtype, torch, force_f32=True)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def add(w, name: str, t, qtype, torch, force_f32: bool = False) -> None:
    import gguf
    if t.ndim == 1 or force_f32 or qtype == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, t.float().contiguous().numpy())
    elif qtype == gguf.GGMLQuantizationType.BF16:
        w.add_tensor(name, t.to(torch.bfloat16).contiguous().view(torch.int16).numpy(), raw_dtype=qtype)
    else:
        w.add_tensor(name, t.to(torch.float16).contiguous().numpy())


def check(path: str, model_dir: str, n: int = 8) -> list[int]:
    """Load with llama-cpp-python and generate n greedy tokens from a random prompt; returns them."""
    import numpy as np
    import llama_cpp

    threads = common.num_threads()
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = common.random_prompts(model_dir, 1, 16, seed=7)[0]
    llm.eval(prompt)
    out = []
    for _ in range(n):
        # logits_all=False: the last token's logits are only in llama.cpp's own buffer
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
        out.append(tok)
        llm.eval([tok])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the cached 1.6B-shaped checkpoint)")
    p.add_argument("--out", default=None, help="output .gguf (default: bench/results/<model>-<outtype>.gguf)")
    p.add_argument("--outtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--force", action="store_true", help="convert even if the output exists and is newer")
    p.add_argument("--check", action="store_true", help="load it with llama-cpp-python and generate a few tokens")
    args = p.parse_args()
    model = common.resolve_model(args.model or args.model_pos)
    out = args.out or default_out(model, args.outtype)
    src = os.path.join(model, "config.json")
    if args.force or not os.path.isfile(out) or os.path.getmtime(out) < os.path.getmtime(src):
        t0 = time.perf_counter()
        convert(model, out, args.outtype)
        print(f"wrote {out} ({os.path.getsize(out) / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    else:
        print(f"{out} is up to date")
    if args.check:
        toks = check(out, model)
        print(f"llama.cpp loaded {out} and generated greedily: {toks}")


if __name__ == "__main__":
    main()
