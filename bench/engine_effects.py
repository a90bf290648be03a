"""What the engine's scheduling features buy on this CPU, measured on a small model (the 1.6B shape with 4 layers,
random weights, load_format="dummy"):

(a) prefix caching: N requests sharing a long system prefix plus a few distinct tokens each, caching on vs off:
    prompt tokens actually computed (engine.num_prompt_tokens_computed), prefix-cache block hits
    (block_manager.num_hit_blocks) and wall time.
(b) continuous batching: M requests submitted together vs one at a time: output tokens/s.

    python bench/engine_effects.py [--model DIR] [--layers 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="checkpoint folder (default: a 4-layer 1.6B-shaped config, dummy weights, under bench/.cache)")
    p.add_argument("--layers", type=int, default=4, help="layers of the default model")
    p.add_argument("--load-format", default=None, help="default: dummy for the default model, else auto")
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prefix-requests", type=int, default=16)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--prefix-output-len", type=int, default=16)
    p.add_argument("--batch-requests", type=int, default=32)
    p.add_argument("--batch-input-len", type=int, default=64)
    p.add_argument("--batch-output-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def make_llm(args: argparse.Namespace, max_len: int, caching: bool):
    from stablelm_fast import LLM, SamplingParams
    llm = LLM(args.model, dtype=args.dtype, backend=args.backend, load_format=args.load_format,
              max_model_len=max_len, enable_prefix_caching=caching, kv_cache_memory_gb=1.0)
    # warm-up on unrelated tokens (then the counters are read as deltas)
    llm.generate([{"prompt_token_ids": [7] * 8}], SamplingParams(temperature=0.0, max_tokens=2))
    return llm


def prefix_caching(args: argparse.Namespace) -> dict:
    from stablelm_fast import SamplingParams
    prefix = common.random_prompts(args.model, 1, args.prefix_len, seed=11)[0]
    suffixes = common.random_prompts(args.model, args.prefix_requests, args.suffix_len, seed=12)
    prompts = [{"prompt_token_ids": prefix + s} for s in suffixes]
    params = SamplingParams(temperature=0.0, max_tokens=args.prefix_output_len, ignore_eos=True)
    out = {"requests": len(prompts), "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
           "output_len": args.prefix_output_len, "prompt_tokens": len(prompts) * (args.prefix_len + args.suffix_len)}
    for caching in (False, True):
        llm = make_llm(args, args.prefix_len + args.suffix_len + args.prefix_output_len + 16, caching)
        eng = llm.engine
        computed0, hits0 = eng.num_prompt_tokens_computed, eng.block_manager.num_hit_blocks
        t0 = time.perf_counter()
        res = llm.generate(prompts, params)
        wall = time.perf_counter() - t0
        key = "on" if caching else "off"
        out[key] = {"wall_s": wall, "prompt_tokens_computed": eng.num_prompt_tokens_computed - computed0,
                    "hit_blocks": eng.block_manager.num_hit_blocks - hits0,
                    "cached_tokens_reported": sum(r.num_cached_tokens for r in res),
                    "output_tok_s": sum(len(r.outputs[0].token_ids) for r in res) / wall}
        out.setdefault("outputs", {})[key] = [r.outputs[0].token_ids for r in res]
        llm.shutdown()
        del llm
    out["same_outputs"] = out["outputs"]["on"] == out["outputs"]["off"]
    del out["outputs"]
    out["compute_saved"] = 1 - out["on"]["prompt_tokens_computed"] / max(1, out["off"]["prompt_tokens_computed"])
    out["speedup"] = out["off"]["wall_s"] / out["on"]["wall_s"]
    return out


def continuous_batching(args: argparse.Namespace) -> dict:
    from stablelm_fast import SamplingParams
    prompts = [{"prompt_token_ids": p} for p in
               common.random_prompts(args.model, args.batch_requests, args.batch_input_len, seed=21)]
    params = SamplingParams(temperature=0.0, max_tokens=args.batch_output_len, ignore_eos=True)
    llm = make_llm(args, args.batch_input_len + args.batch_output_len + 16, caching=False)
    out = {"requests": len(prompts), "input_len": args.batch_input_len, "output_len": args.batch_output_len}
    t0 = time.perf_counter()
    together = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    steps0 = llm.engine.num_steps
    out["together"] = {"wall_s": wall, "output_tok_s": sum(len(r.outputs[0].token_ids) for r in together) / wall}
    t0 = time.perf_counter()
    one = [llm.generate(p, params)[0] for p in prompts]
    wall = time.perf_counter() - t0
    out["one_at_a_time"] = {"wall_s": wall, "output_tok_s": sum(len(r.outputs[0].token_ids) for r in one) / wall,
                            "engine_steps": llm.engine.num_steps - steps0}
    out["speedup"] = out["together"]["output_tok_s"] / out["one_at_a_time"]["output_tok_s"]
    out["same_outputs"] = [r.outputs[0].token_ids for r in together] == [r.outputs[0].token_ids for r in one]
    llm.shutdown()
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model is None:
        args.model = common.make_checkpoint(os.path.join(common.CACHE_DIR, f"stablelm-2-1_6b-shape-{args.layers}l"),
                                            num_layers=args.layers, weights=False)
        args.load_format = args.load_format or "dummy"
    args.load_format = args.load_format or "auto"
    threads = common.set_threads(args.threads)
    cfg = common.load_config(args.model)
    print(f"# engine effects | {os.path.basename(args.model.rstrip('/'))} ({cfg['num_hidden_layers']} layers, hidden "
          f"{cfg['hidden_size']}, vocab {cfg['vocab_size']}, {args.load_format} weights) {args.dtype} | "
          f"{threads} threads | {common.describe_machine()}")
    a = prefix_caching(args)
    print(f"\n(a) prefix caching: {a['requests']} requests = {a['prefix_len']}-token shared prefix + "
          f"{a['suffix_len']} distinct tokens, {a['output_len']} out")
    common.print_table([[k, a[k]["prompt_tokens_computed"], a[k]["hit_blocks"], a[k]["wall_s"], a[k]["output_tok_s"]]
                        for k in ("off", "on")],
                       ["prefix caching", "prompt tokens computed", "hit blocks", "wall s", "output tok/s"])
    print(f"prompt compute saved: {100 * a['compute_saved']:.1f}% of {a['prompt_tokens']} prompt tokens; "
          f"wall-time speedup {a['speedup']:.2f}x; same greedy outputs: {a['same_outputs']}")
    b = continuous_batching(args)
    print(f"\n(b) continuous batching: {b['requests']} requests of {b['input_len']} in / {b['output_len']} out")
    common.print_table([["together (one generate call)", b["together"]["wall_s"], b["together"]["output_tok_s"]],
                        ["one at a time", b["one_at_a_time"]["wall_s"], b["one_at_a_time"]["output_tok_s"]]],
                       ["mode", "wall s", "output tok/s"])
    print(f"batching speedup: {b['speedup']:.2f}x; same greedy outputs: {b['same_outputs']}")
    if args.json:
        common.write_json(args.json, {"model": args.model, "machine": common.machine_info(), "threads": threads,
                                      "prefix_caching": a, "continuous_batching": b})


if __name__ == "__main__":
    main()
