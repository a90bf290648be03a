"""Tensor-parallel decode: measured TP=1 vs TP=2 on this CPU, and an A100 estimate for StableLM 2 12B.

    .venv/bin/python bench/tp_decode.py [--tp 1 2] [--batch 1 4] [--steps 16] [--backend auto]

1. A 1.6B-shaped model (the real stablelm-2-1_6b config, random weights: load_format="dummy", bfloat16) decodes
   `--steps` tokens per sequence at each batch size; decode tokens/s = batch * steps / time of the decode steps
   (the prefill step is excluded). On CPU the ranks share the host's cores (each rank gets cores / TP threads) and
   its memory bandwidth, so TP mainly adds all-reduce cost here: the CPU figure checks the machinery, it is not
   where TP pays off.
2. A100 (2 TB/s HBM, NVLink) estimate for StableLM 2 12B in bf16 at batch 1: decode is memory-bound, so one token
   costs (weight bytes / TP + KV bytes read / TP) / bandwidth per GPU, plus the latency of its collectives.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from stablelm_fast import LLM, SamplingParams  # noqa: E402
from stablelm_fast.config import ModelConfig  # noqa: E402
from stablelm_fast.loader import expected_hf_shapes  # noqa: E402
from stablelm_fast.tiny import TINY_CONFIGS, build_tokenizer, hf_config  # noqa: E402

CONFIG_1_6B = dict(vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                   num_attention_heads=32, num_key_value_heads=32, use_qkv_bias=True, qk_layernorm=False,
                   use_parallel_residual=False, max_position_embeddings=4096, torch_dtype="bfloat16")
CONFIG_12B = dict(vocab_size=100352, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=32, num_key_value_heads=8, use_qkv_bias=False, qk_layernorm=True,
                  use_parallel_residual=True, max_position_embeddings=4096, torch_dtype="bfloat16")


def model_dir_1_6b() -> str:
    path = os.path.join(tempfile.gettempdir(), "stablelm-fast-bench-1_6b-dummy")
    if not os.path.isfile(os.path.join(path, "config.json")):
        spec = TINY_CONFIGS["stablelm-2-1_6b"]
        build_tokenizer(path, spec["chat_template"], spec["eos_token"])
        config = hf_config("stablelm-2-1_6b", CONFIG_1_6B["vocab_size"])
        config.update(CONFIG_1_6B)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1)
    return path


def measure(path: str, tp: int, batches: list[int], steps: int, backend: str) -> dict[int, float]:
    start = time.perf_counter()
    llm = LLM(path, load_format="dummy", dtype="bfloat16", device="cpu", tensor_parallel_size=tp, backend=backend,
              num_kv_blocks=16 * max(batches), block_size=16, max_model_len=256)
    print(f"TP={tp}: engine up in {time.perf_counter() - start:.1f} s (backend {llm.engine.backend})", flush=True)
    engine = llm.engine
    results = {}
    try:
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        for batch in batches:
            params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
            for i in range(batch):
                engine.add_request({"prompt_token_ids": [10 + i, 11, 12, 13, 14, 15, 16, 17]}, params)
            engine.step()  # prefill (+ the first token)
            t0 = time.perf_counter()
            n = 0
            while engine.has_unfinished_requests():
                n += sum(1 for _ in engine.step())
            elapsed = time.perf_counter() - t0
            results[batch] = batch * steps / elapsed
            print(f"  batch {batch}: {steps} decode steps in {elapsed:.2f} s -> {results[batch]:.2f} tokens/s "
                  f"({1000 * elapsed / steps:.0f} ms/step)", flush=True)
    finally:
        llm.shutdown()
        del llm, engine
        gc.collect()
    return results


def a100_estimate(context: int = 1024, bandwidth: float = 2.0e12, efficiency: float = 0.8,
                  collective_latency_s: float = 15e-6) -> None:
    cfg = ModelConfig.from_dict({**hf_config("stablelm-2-12b", CONFIG_12B["vocab_size"]), **CONFIG_12B})
    params = sum(_numel(s) for s in expected_hf_shapes(cfg).values())
    weight_bytes = 2 * params
    kv_bytes = context * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    per_layer = 1 if cfg.use_parallel_residual else 2
    reduces = cfg.num_hidden_layers * per_layer + 1  # + the vocab-parallel embedding's
    print(f"\nA100 estimate, StableLM 2 12B bf16, batch 1, context {context}: {params / 1e9:.2f} B parameters "
          f"({weight_bytes / 1e9:.1f} GB), KV read {kv_bytes / 1e6:.0f} MB/token; {bandwidth / 1e12:.0f} TB/s at "
          f"{efficiency:.0%}; per token {reduces} all-reduces of {cfg.hidden_size * 2 / 1024:.0f} KiB "
          f"({cfg.num_hidden_layers} layers x {per_layer} with the parallel residual, + embedding) and 1 lm_head "
          f"all-gather, ~{collective_latency_s * 1e6:.0f} us each over NVLink")
    print(f"{'TP':>3} {'GB/GPU/token':>13} {'memory ms':>10} {'comm ms':>8} {'tokens/s':>9} {'ideal tokens/s':>15}")
    for tp in (1, 2, 4):
        per_gpu = (weight_bytes + kv_bytes) / tp  # kv heads 8: every rank reads its own 8 / tp of them
        memory_s = per_gpu / (bandwidth * efficiency)
        comm_s = 0.0 if tp == 1 else (reduces + 1) * collective_latency_s
        print(f"{tp:>3} {per_gpu / 1e9:>13.2f} {memory_s * 1e3:>10.2f} {comm_s * 1e3:>8.2f} "
              f"{1 / (memory_s + comm_s):>9.0f} {bandwidth / per_gpu:>15.0f}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--backend", default="auto")
    p.add_argument("--skip-cpu", action="store_true", help="print the A100 estimate only")
    args = p.parse_args()
    if not args.skip_cpu:
        path = model_dir_1_6b()
        print(f"1.6B-shaped dummy model (bf16) on {os.cpu_count()} CPU cores; {args.steps} decode steps")
        results = {tp: measure(path, tp, args.batch, args.steps, args.backend) for tp in args.tp}
        if 1 in results:
            for tp in results:
                if tp != 1:
                    print(f"TP={tp} / TP=1: " + ", ".join(f"batch {b}: {results[tp][b] / results[1][b]:.2f}x"
                                                       for b in args.batch))
    a100_estimate()


if __name__ == "__main__":
    main()
