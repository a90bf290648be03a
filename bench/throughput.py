"""Offline throughput (vLLM benchmark_throughput style): N requests submitted at once, output tokens/s and requests/s.

    python bench/throughput.py                                    # ours: 64 random prompts of 128 tokens, 128 out
    python bench/throughput.py --backend hf                       # HF transformers generate() on the same batch
    python bench/throughput.py --num-prompts 32 --output-len 64 --json out.json
    python bench/throughput.py --dataset prompts.jsonl            # {"prompt": "..."} per line (optional "output_len")

Ours: every request goes to LLM.generate in one call (continuous batching does the rest), greedy, ignore_eos, so every
request produces exactly its output length. HF: one left-padded batch (or --hf-batch-size chunks) through
model.generate(do_sample=False, min_new_tokens=max_new_tokens): the same token counts. Prompts are token ids for both
(dataset prompts are tokenized once with the checkpoint's tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

OURS = ("auto", "torch", "cpu", "triton", "cuda")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL", help="checkpoint folder (same as --model)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the cached 1.6B-shaped checkpoint)")
    p.add_argument("--backend", default="auto", choices=OURS + ("hf",))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--dataset", default=None, help='JSONL file of {"prompt": ...} lines (optional "output_len")')
    p.add_argument("--load-format", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--hf-batch-size", type=int, default=None, help="HF: requests per generate() (default: all)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantization", default=None, help="ours: LLM(quantization=...), e.g. int8 / int4")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.model = args.model or args.model_pos
    return args


def load_requests(args: argparse.Namespace) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request."""
    if args.dataset is None:
        prompts = common.random_prompts(args.model, args.num_prompts, args.input_len, seed=args.seed)
        return [(p, args.output_len) for p in prompts]
    from stablelm_fast.config import ModelConfig
    from stablelm_fast.tokenizer import Tokenizer
    tok = Tokenizer(args.model, ModelConfig.from_pretrained(args.model).eos_token_id)
    reqs = []
    with open(args.dataset, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                reqs.append((tok.encode(row["prompt"]), int(row.get("output_len", args.output_len))))
            if len(reqs) == args.num_prompts:
                break
    if not reqs:
        raise SystemExit(f"no prompts in {args.dataset}")
    return reqs


def run_ours(args: argparse.Namespace, reqs: list[tuple[list[int], int]]) -> tuple[float, int, str]:
    from stablelm_fast import LLM, SamplingParams
    max_len = max(len(p) + o for p, o in reqs) + 16
    llm = LLM(args.model, dtype=args.dtype, backend=args.backend, load_format=args.load_format,
              max_model_len=max_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=not args.no_prefix_caching, quantization=args.quantization)
    # warm-up: a couple of short requests (first-call allocations, thread pools)
    warm = common.random_prompts(args.model, 2, 16, seed=99999)
    llm.generate([{"prompt_token_ids": p} for p in warm], SamplingParams(temperature=0.0, max_tokens=4))
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in reqs], params)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    name = f"stablelm-fast ({llm.engine.backend})"
    llm.shutdown()
    return elapsed, n_out, name


def run_hf(args: argparse.Namespace, reqs: list[tuple[list[int], int]]) -> tuple[float, int, str]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    pad = 0

    def batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return ids, mask

    def generate(chunk: list[tuple[list[int], int]]) -> int:
        ids, mask = batch([p for p, _ in chunk])
        n = max(o for _, o in chunk)  # one generate() call: a chunk shares its length
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=pad, eos_token_id=None)
        return int((out.shape[1] - ids.shape[1]) * out.shape[0])

    warm = common.random_prompts(args.model, 2, 16, seed=99999)
    generate([(p, 4) for p in warm])
    size = args.hf_batch_size or len(reqs)
    t0 = time.perf_counter()
    n_out = 0
    for i in range(0, len(reqs), size):
        n_out += generate(reqs[i: i + size])
    elapsed = time.perf_counter() - t0
    return elapsed, n_out, f"HF transformers {transformers.__version__}"


def run(args: argparse.Namespace) -> dict:
    args.model = common.resolve_model(args.model)
    threads = common.set_threads(args.threads)
    reqs = load_requests(args)
    elapsed, n_out, name = (run_hf if args.backend == "hf" else run_ours)(args, reqs)
    n_in = sum(len(p) for p, _ in reqs)
    return {"engine": name, "backend": args.backend, "model": args.model, "dtype": args.dtype,
            "num_prompts": len(reqs), "input_len": args.input_len if args.dataset is None else None,
            "output_len": args.output_len if args.dataset is None else None, "dataset": args.dataset,
            "threads": threads, "elapsed_s": elapsed, "prompt_tokens": n_in, "output_tokens": n_out,
            "output_tok_s": n_out / elapsed, "total_tok_s": (n_in + n_out) / elapsed,
            "requests_s": len(reqs) / elapsed, "machine": common.machine_info()}


def print_results(res: dict) -> None:
    shape = (f"{res['num_prompts']} x {res['input_len']} in / {res['output_len']} out" if res["dataset"] is None
             else f"{res['num_prompts']} requests from {res['dataset']}")
    print(f"# {res['engine']} | {os.path.basename(res['model'].rstrip('/'))} {res['dtype']} | {shape} | "
          f"{res['threads']} threads")
    common.print_table([[res["engine"], res["elapsed_s"], res["output_tok_s"], res["total_tok_s"],
                         res["requests_s"]]],
                       ["engine", "seconds", "output tok/s", "total tok/s", "requests/s"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    res = run(args)
    print_results(res)
    if args.json:
        common.write_json(args.json, res)


if __name__ == "__main__":
    main()
