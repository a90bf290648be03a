"""Resident memory of the engine at default settings, StableLM-2-1.6B shape (dummy bf16 weights, CPU), measured as
VmRSS / VmHWM from /proc/self/status: after load, after one request (512-token prompt, 64 tokens out), and after
writing every KV-cache block (what a long-running server with prefix caching reaches: the most the cache adds). llama.cpp's figure for the same model and a 4096-token context is
in the issue (4.1 GB: weights + a 768 MiB f16 KV cache cleared, i.e. committed, at load).

    python bench/memory.py [--max-model-len N] [--kv-cache-memory-gb G] [--json out.json]

Runs against whatever `stablelm_fast` is on PYTHONPATH (point it at an older checkout for a before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GB = 1e9


def status() -> dict:
    with open("/proc/self/status", encoding="ascii") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 / GB for k in ("VmRSS", "VmHWM")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory-gb", type=float, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    from stablelm_fast import LLM, SamplingParams

    model = common.make_checkpoint(os.path.join(common.CACHE_DIR, "stablelm-2-1_6b-shape-config-only"),
                                   weights=False, quiet=True)
    torch.ones(1).add_(1)
    res = {"python+torch_gb": status()["VmRSS"]}
    t0 = time.perf_counter()
    kw = {k: v for k, v in (("max_model_len", args.max_model_len), ("kv_cache_memory_gb", args.kv_cache_memory_gb))
          if v is not None}
    llm = LLM(model, load_format="dummy", dtype="bfloat16", device="cpu", **kw)
    eng = llm.engine
    res["load_s"] = round(time.perf_counter() - t0, 1)
    s = status()
    res["after_load_gb"], res["peak_at_load_gb"] = s["VmRSS"], s["VmHWM"]
    weights = sum(t.numel() * t.element_size() for t in eng.executor.model.state_dict().values())
    per_block = eng.executor.kv_bytes_per_block(eng.args.block_size)
    blocks = eng.block_manager.num_blocks
    res.update(weights_gb=weights / GB, kv_cache_gb=blocks * per_block / GB, kv_tokens=blocks * eng.args.block_size,
               max_model_len=eng.max_model_len)
    prompt = common.random_prompts(model, 1, 512)[0]
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    s = status()
    res["after_request_gb"], res["peak_gb"] = s["VmRSS"], s["VmHWM"]
    for k, v in getattr(eng.executor, "kv_caches", []):  # every block written: the most the cache can add
        k.fill_(0)
        v.fill_(0)
    res["all_blocks_written_gb"] = status()["VmRSS"]
    res = {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}
    print(json.dumps(res))
    if args.json:
        common.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
