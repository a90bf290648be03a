"""Speculative decoding (n-gram prompt lookup, draft models): acceptance, tokens per step and batch-1 decode
speed-up, plus what verifying k + 1 tokens costs against 1 on the StableLM-2-1.6B shape.

    .venv/bin/python bench/spec_decode.py                       # the built-in trained model, code-rewrite workload
    .venv/bin/python bench/spec_decode.py --model DIR --k 2 4 6 --verify-cost
    .venv/bin/python bench/spec_decode.py --drafts self random DIR --draft-k 2 4   # draft models too

Draft models (--drafts): "self" is the target drafting for itself (every draft accepted: shows what the draft passes
cost), "random" a random-weight draft of half the target's width, MLP and layers, with its tokenizer
(acceptance near zero: the worst case), or the folder of a trained draft sharing the target's tokenizer, e.g.
stablelm_fast/assets/stablelm-pystdlib-1m-draft (1.3M parameters, trained like the built-in model).

Workload ("code rewrite", where the output repeats the prompt): each prompt is a function from the held-out part of
the model's corpus (the Python stdlib), then a comment asking for it again and its first line; greedy decoding of
--max-tokens tokens. Measured: decode tok/s = generated tokens / (wall time - time to first token), per prompt, then
the median, with and without speculation, one after the other in this process; the outputs must be identical
(greedy). acceptance = accepted drafts / proposed drafts; tokens per step = generated tokens / decode steps.
--verify-cost: one forward of 1 + k tokens of one sequence (a verification step) against a 1-token decode step, on
random 1.6B-shaped weights (load_format dummy, bf16, cpu backend): the ratio says how cheap verification is when
decode reads the weights once per step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.common import describe_machine, median, print_table, set_threads  # noqa: E402

BUILTIN_MODEL = os.path.join(ROOT, "stablelm_fast", "assets", "stablelm-pystdlib-4m")


def rewrite_prompts(num: int, max_lines: int = 14) -> list[str]:
    """Functions of the held-out stdlib files, each followed by a request to write it again and its first line."""
    from tools.stdlib_corpus import split

    prompts = []
    for _, text in split()[1]:
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("def ") and len(prompts) < num:
                body = [line]
                for nxt in lines[i + 1: i + max_lines]:
                    if nxt and not nxt.startswith((" ", "\t")):
                        break
                    body.append(nxt)
                if len(body) >= 4:
                    src = "\n".join(body).rstrip()
                    prompts.append(f"{src}\n\n\n# The same function, unchanged:\n{body[0]}\n")
        if len(prompts) >= num:
            break
    return prompts


def run(llm, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], float, int]:
    """-> (token ids per prompt, median decode tok/s, engine steps after the first token, summed)."""
    from stablelm_fast import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs, rates, steps = [], [], 0
    for p in prompts:
        t0 = time.perf_counter()
        n0 = llm.engine.num_steps
        o = llm.generate(p, params)[0]
        wall = time.perf_counter() - t0
        ttft = o.metrics.first_token_time - o.metrics.arrival_time
        n = len(o.outputs[0].token_ids)
        rates.append((n - 1) / max(wall - ttft, 1e-9))
        steps += llm.engine.num_steps - n0 - 1  # minus the prefill step
        outs.append(o.outputs[0].token_ids)
    return outs, median(rates), steps


def verify_cost(ks: list[int], repeats: int = 5) -> list[list]:
    """Step time of 1 + k tokens of one sequence vs 1 token, 1.6B shape, dummy weights, cpu backend, bf16."""
    from bench.common import make_checkpoint
    from stablelm_fast import LLM

    cache = os.path.join(ROOT, "bench", ".cache", "stablelm-2-1_6b-shape-config-only")
    model_dir = make_checkpoint(cache, weights=False, quiet=True)
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", num_kv_blocks=64, max_model_len=1024)
    runner = llm.engine.executor
    from stablelm_fast.engine.scheduler import ScheduledBatch
    from stablelm_fast.engine.sequence import Sequence
    from stablelm_fast.engine.step_input import prepare_step
    from stablelm_fast.sampling_params import SamplingParams

    rows, base = [], None
    for k in [0] + ks:
        seq = Sequence("b", 0, list(range(8, 8 + 200 + k)), SamplingParams(), None, 0.0)
        seq.block_table = list(range(-(-seq.num_tokens // 16)))
        seq.num_computed_tokens = 199
        step = prepare_step(ScheduledBatch([seq], [1 + k]), 16)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.execute(step)
            times.append(time.perf_counter() - t0)
        t = median(times)
        base = base or t
        rows.append([1 + k, f"{t * 1e3:.1f}", f"{t / base:.2f}x"])
    llm.shutdown()
    return rows


def random_draft(model_dir: str) -> str:
    """A random-weight draft: the target's config at half the width (and MLP), half the layers, its tokenizer."""
    import json
    import shutil

    from stablelm_fast.tiny import write_random_weights

    out = os.path.join(ROOT, "bench", ".cache", f"random-draft-of-{os.path.basename(model_dir.rstrip('/'))}")
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        heads = max(1, cfg["num_attention_heads"] // 2)
        cfg.update(hidden_size=cfg["hidden_size"] // 2, intermediate_size=cfg["intermediate_size"] // 2,
                   num_hidden_layers=max(1, cfg["num_hidden_layers"] // 2), num_attention_heads=heads,
                   num_key_value_heads=min(cfg.get("num_key_value_heads", heads), heads))
        for name in os.listdir(model_dir):
            if name.startswith("tokenizer") or name == "generation_config.json":
                shutil.copy(os.path.join(model_dir, name), out)
        with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=1)
        write_random_weights(out, cfg, seed=0)
    return out


def measure(model: str, kw: dict, cfg: dict, prompts: list[str], max_tokens: int, ref: list[list[int]],
            base_rate: float, label: str) -> list:
    """One table row: speculation with cfg against the run without (ref tokens, base_rate tok/s)."""
    from stablelm_fast import LLM

    llm = LLM(model, speculative_config=cfg, **kw)
    run(llm, prompts[:1], 8)
    llm.engine.num_spec_proposed = llm.engine.num_spec_accepted = 0
    outs, rate, steps = run(llm, prompts, max_tokens)
    e = llm.engine
    acc = e.num_spec_accepted / max(e.num_spec_proposed, 1)
    same = "yes" if outs == ref else "NO"
    llm.shutdown()
    return [label, e.num_spec_proposed, f"{acc:.0%}", f"{sum(map(len, outs)) / max(steps, 1):.2f}", f"{rate:.1f}",
            f"{rate / base_rate:.2f}x", same]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=BUILTIN_MODEL)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 6], help="num_speculative_tokens to try")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--drafts", nargs="*", default=[],
                    help='draft models to try: "self", "random" or a folder (default: none, n-gram only)')
    ap.add_argument("--draft-k", type=int, nargs="+", default=[2, 4], help="num_speculative_tokens of the drafts")
    ap.add_argument("--verify-cost", action="store_true", help="also time 1 + k tokens vs 1 on the 1.6B shape")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for the workload (default 1: a 4M-parameter model's steps are overhead-bound and "
                         "two threads on two shared cores only add jitter); the 1.6B verify cost uses every core")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    from stablelm_fast import LLM

    print(f"machine: {describe_machine()} ({threads} threads)")
    prompts = rewrite_prompts(args.prompts)
    kw = dict(dtype=args.dtype, backend=args.backend, num_kv_blocks=256)
    base_llm = LLM(args.model, **kw)
    run(base_llm, prompts[:1], 8)  # warm-up
    ref, base_rate, base_steps = run(base_llm, prompts, args.max_tokens)
    base_llm.shutdown()
    table = [["off", "-", "-", f"{sum(map(len, ref)) / max(base_steps, 1):.2f}", f"{base_rate:.1f}", "1.00x", "-"]]
    for k in args.k:
        cfg = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 4}
        table.append(measure(args.model, kw, cfg, prompts, args.max_tokens, ref, base_rate, f"ngram k={k}"))
    for name in args.drafts:
        path = {"self": args.model, "random": None}.get(name, name) or random_draft(args.model)
        for k in args.draft_k:
            cfg = {"method": "draft_model", "model": path, "num_speculative_tokens": k}
            label = f"draft {os.path.basename(name.rstrip('/'))} k={k}"
            table.append(measure(args.model, kw, cfg, prompts, args.max_tokens, ref, base_rate, label))
    print(f"\ncode-rewrite workload: {len(prompts)} prompts, greedy, {args.max_tokens} tokens each, {args.dtype}, "
          f"model {os.path.basename(args.model.rstrip('/'))}")
    print_table(table, ["speculation", "drafts proposed", "accepted", "tokens/step", "decode tok/s (median)",
                        "speed-up", "same tokens"])
    if args.verify_cost:
        set_threads()
        print("\nverification cost, StableLM-2-1.6B shape (dummy bf16 weights, cpu backend), one sequence at 200 "
              "tokens of context:")
        print_table(verify_cost(args.k), ["tokens in the step", "step ms (median)", "vs 1 token"])


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
