"""Where one engine step's time goes: a per-op profile (torch.profiler) of a prefill step and of decode steps at
batch 1 and batch 32, on the 1.6B-shaped checkpoint.

    python bench/profile_step.py                   # prefill 128 tokens, decode b=1 and b=32 (ctx ~128)
    python bench/profile_step.py --input-len 512 --batch 32 --top 12

For each phase: wall time of the step (median of --iters), and per op (our C++ kernels are torch.ops.stablelm_fast.*,
the rest are aten ops) its self CPU time as a share of the step's wall time; "outside ops" is the wall time no op
accounts for (Python: scheduling, step preparation, sampling, output processing). The CPU model and ISA are printed
with the figures. Weights are random (load_format "dummy" unless --model names a real checkpoint).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the 1.6B-shaped config, dummy weights)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="sequences of the batched decode phase")
    p.add_argument("--iters", type=int, default=3, help="profiled steps per phase (medians)")
    p.add_argument("--top", type=int, default=10, help="ops listed per phase")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quantization", default=None, help="as LLM(quantization=...), if this build has it")
    return p.parse_args(argv)


def profile_steps(engine, n: int):
    """Run n engine steps under torch.profiler; returns (wall seconds per step, {op: self cpu seconds per step})."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    walls, per_op = [], collections.Counter()
    for _ in range(n):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t0)
        for e in prof.key_averages():
            per_op[e.key] += e.self_cpu_time_total / 1e6
    del torch
    return walls, {k: v / n for k, v in per_op.items()}


def report(name: str, walls: list[float], ops: dict[str, float], top: int, tokens: int) -> None:
    wall = statistics.median(walls)
    in_ops = sum(ops.values())
    print(f"\n{name}: step {wall * 1e3:.1f} ms (median of {len(walls)}; {tokens / wall:.1f} tok/s), "
          f"ops {in_ops * 1e3:.1f} ms, outside ops {(wall - in_ops) * 1e3:.1f} ms ({(wall - in_ops) / wall:.0%})")
    for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {v * 1e3:9.2f} ms  {v / wall:6.1%}  {k}")


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    from stablelm_fast import LLM, SamplingParams
    from stablelm_fast.ops.cpu_linear import cpu_isa

    if args.model:
        model, load_format = args.model, "auto"
    else:
        model, load_format = common.make_checkpoint(common.DEFAULT_MODEL + "-config-only", weights=False), "dummy"
    info = common.machine_info()
    print(f"CPU: {info.get('cpu_model')} ({threads} threads), ISA of our kernels: {cpu_isa()}; "
          f"load {os.getloadavg()[0]:.1f}")
    max_len = args.input_len + 64
    kwargs = dict(quantization=args.quantization) if args.quantization else {}
    llm = LLM(model, dtype="bfloat16", load_format=load_format, max_model_len=max_len, enable_prefix_caching=False,
              max_num_seqs=args.batch, num_kv_blocks=args.batch * (-(-max_len // 16)) + 4,
              max_num_batched_tokens=max(args.input_len, 2048), **kwargs)
    eng = llm.engine
    prompts = common.random_prompts(model, args.batch + 1, args.input_len)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)

    # prefill: one prompt per step (each step prefills a fresh request, then the request is dropped)
    walls, ops = [], collections.Counter()
    for i in range(args.iters + 1):
        eng.add_request({"prompt_token_ids": prompts[i % len(prompts)]}, SamplingParams(max_tokens=1))
        w, o = profile_steps(eng, 1)
        if i:  # the first is a warm-up
            walls += w
            ops.update(o)
        while eng.has_unfinished_requests():
            eng.step()
    report(f"prefill, {args.input_len} tokens", walls, {k: v / args.iters for k, v in ops.items()}, args.top,
           args.input_len)

    for batch in (1, args.batch):
        for p in prompts[:batch]:
            eng.add_request({"prompt_token_ids": p}, params)
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running) or \
                eng.scheduler.waiting:
            eng.step()
        eng.step()  # warm-up decode step
        walls, ops = profile_steps(eng, args.iters)
        report(f"decode, batch {batch} (ctx ~{args.input_len})", walls, ops, args.top, batch)
        for r in list(eng.requests):
            eng.abort_request(r)
        while eng.has_unfinished_requests():
            eng.step()


if __name__ == "__main__":
    main()
