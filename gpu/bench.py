"""GPU benchmark on 1.6B-, 3B- and 12B-shaped dummy weights (load_format="dummy", bf16), next to this GPU's limits
measured in the same run: HBM bandwidth (device copy and reduction over 2 GiB, best of both) and bf16 matmul peak
(8192^3 torch.matmul).

Per model: decode tok/s at batch 1 and batch 32 (the engine's own step loop, CUDA graphs on, after the prompts'
prefill), as % of the measured bandwidth (bytes per step from gpu/roofline.py's accounting at the real contexts);
prefill tok/s (8 prompts x 1024 tokens in 8192-token steps) as % of the measured bf16 matmul peak.

Before the models: the weight-only int8 / int4 GEMMs at the 1.6B's / 12B's layer sizes (gpu/quant_bench.py).

    python -m gpu.bench [--models 1.6B 3B 12B] [--json $OUT/gpu-bench.json] [--backend auto]

Needs a CUDA GPU; says so and exits 0 without one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

from gpu.roofline import decode_step_bytes, params, prefill_flops_per_token
from gpu.scenarios import MODEL_SHAPES
from gpu.timing import cuda_times

PROMPT_LEN, DECODE_STEPS, PREFILL_SEQS, PREFILL_LEN = 512, 64, 8, 1024
SMOKE = dict(PROMPT_LEN=24, DECODE_STEPS=3, PREFILL_SEQS=2, PREFILL_LEN=32)  # --smoke: a CPU run of the code path


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> float:
    """Best seconds of fn() over repeats, by CUDA events."""
    return cuda_times(fn, repeats)[0]


def measure_limits() -> dict:
    n = (2 << 30) // 4
    x = torch.ones(n, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    copy_gbps = 2 * n * 4 / _timed(lambda: y.copy_(x), 10) / 1e9  # read + write
    sum_gbps = n * 4 / _timed(lambda: x.sum(), 10) / 1e9
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    a @ b
    tflops = 2 * 8192 ** 3 / _timed(lambda: a @ b, 10) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return {"hbm_gbps": max(copy_gbps, sum_gbps), "copy_gbps": copy_gbps, "sum_gbps": sum_gbps,
            "bf16_matmul_tflops": tflops}


def model_dir(name: str, root: str, layers: int | None = None) -> str:
    """config.json (the model's shapes) + the small tokenizer: all load_format='dummy' needs."""
    from stablelm_fast.tiny import ZEPHYR_TEMPLATE, build_tokenizer, hf_config

    s = MODEL_SHAPES[name]
    out = os.path.join(root, name)
    os.makedirs(out, exist_ok=True)
    build_tokenizer(out, ZEPHYR_TEMPLATE, "<|endoftext|>")
    cfg = hf_config("stablelm-2-12b" if s["qk_norm"] else "stablelm-2-1_6b", s["vocab"], max_position_embeddings=4096)
    cfg.update(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
               num_hidden_layers=layers or s["layers"], num_attention_heads=s["hq"], num_key_value_heads=s["hkv"],
               use_qkv_bias=s["qkv_bias"], qk_layernorm=s["qk_norm"], use_parallel_residual=s["parallel_residual"],
               partial_rotary_factor=0.25, tie_word_embeddings=False, torch_dtype="bfloat16",
               bos_token_id=0, eos_token_id=0)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    return out


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(10, vocab, (length,), generator=g).tolist()} for _ in range(n)]


def _init_dummy_on_device(model, seed: int = 0) -> None:
    """StableLM.init_dummy_weights' scheme (biases 0, norms 1, N(0, 0.02) elsewhere) drawn where the parameters
    live: the library draws on the CPU, which for 12B parameters would spend a minute of a scarce GPU lease."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data.zero_()
        elif "norm" in name:
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02)


def bench_model(name: str, root: str, backend: str, limits: dict, device: str = "cuda",
                layers: int | None = None) -> dict:
    from stablelm_fast import LLM, SamplingParams
    from stablelm_fast.model import StableLM

    s = dict(MODEL_SHAPES[name], layers=layers or MODEL_SHAPES[name]["layers"])
    t0 = time.perf_counter()
    library_init = StableLM.init_dummy_weights
    StableLM.init_dummy_weights = _init_dummy_on_device
    try:
        llm = LLM(model_dir(name, root, layers), load_format="dummy", device=device, dtype="bfloat16",
                  backend=backend, max_model_len=2048, max_num_seqs=32, max_num_batched_tokens=8192,
                  enable_prefix_caching=False, kv_cache_memory_gb=16.0 if device == "cuda" else 1.0)
    finally:
        StableLM.init_dummy_weights = library_init
    engine = llm.engine
    res = {"model": name, "backend": engine.backend, "params": params(s)["total"],
           "cuda_graphs": engine.executor.graph_decoder is not None, "load_s": round(time.perf_counter() - t0, 1)}
    greedy = dict(temperature=0.0, ignore_eos=True)
    llm.generate(_prompts(2, 64, s["vocab"], 0), SamplingParams(max_tokens=8, **greedy))  # compile / warm up

    for batch in (1, 32):
        for p in _prompts(batch, PROMPT_LEN, s["vocab"], batch):
            engine.add_request(p, SamplingParams(max_tokens=DECODE_STEPS + 1, **greedy))
        while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in engine.scheduler.running +
                  list(engine.scheduler.waiting)):
            engine.step()  # prefill (and the first sampled token)
        _sync(device)
        t0, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        _sync(device)
        dt = time.perf_counter() - t0
        ctx = PROMPT_LEN + 1 + steps / 2  # average context over the timed steps
        bytes_per_step = decode_step_bytes(s, batch, int(ctx))
        res[f"decode_b{batch}_tok_s"] = round(batch * steps / dt, 1)
        res[f"decode_b{batch}_hbm_pct"] = round(100 * bytes_per_step * steps / dt / 1e9 / limits["hbm_gbps"], 1)

    prompts = _prompts(PREFILL_SEQS, PREFILL_LEN, s["vocab"], 7)
    _sync(device)
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, **greedy))
    _sync(device)
    dt = time.perf_counter() - t0
    tok_s = PREFILL_SEQS * PREFILL_LEN / dt
    res["prefill_tok_s"] = round(tok_s, 1)
    res["prefill_matmul_pct"] = round(100 * tok_s * prefill_flops_per_token(s, PREFILL_LEN) / 1e12 /
                                      limits["bf16_matmul_tflops"], 1)
    del llm, engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES))
    p.add_argument("--backend", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true",
                   help="CPU, 1 layer, tiny prompts: exercises the code path, measures nothing meaningful")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        globals().update(SMOKE)
        limits = {"hbm_gbps": 1.0, "bf16_matmul_tflops": 1.0, "smoke": True}
    elif not torch.cuda.is_available():
        print("gpu.bench: no CUDA GPU on this machine: nothing measured")
        return 0
    else:
        limits = measure_limits()
    out = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)", "torch": torch.__version__, "cuda": torch.version.cuda,
           "limits": limits, "models": []}
    print(f"{out['gpu']}: measured HBM {limits['hbm_gbps']:.0f} GB/s, bf16 matmul {limits['bf16_matmul_tflops']:.0f} "
          f"TFLOP/s", flush=True)
    if device == "cuda":  # the int8 / int4 GEMMs alone first: seconds, and independent of the models below
        from gpu.quant_bench import bench_quant

        try:
            out["quant"] = bench_quant(limits)
        except Exception as e:  # reported, and the model rows still run
            out["quant"] = [{"error": f"{type(e).__name__}: {e}"[:400]}]
    with tempfile.TemporaryDirectory() as root:
        for name in args.models:
            try:
                r = bench_model(name, root, args.backend, limits, device, 1 if args.smoke else None)
            except Exception as e:  # one model failing (e.g. out of memory) must not lose the others
                r = {"model": name, "error": f"{type(e).__name__}: {e}"[:400]}
            out["models"].append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(out, f, indent=1)
    return 0 if all("error" not in r for r in out["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
