"""Batch-1 latency (gpt-fast / vLLM benchmark_latency style): prefill tokens/s of one prompt, time to first token,
decode tokens/s, and the weight-read bandwidth decode achieves next to the machine's measured bandwidth.

    python bench/latency.py                                  # ours (backend auto) on the 1.6B-shaped checkpoint
    python bench/latency.py --backend hf                     # HF transformers, same checkpoint
    python bench/latency.py --backend llama.cpp --gguf F     # llama.cpp (llama-cpp-python) on a converted GGUF
    stablelm-fast bench latency MODEL --output-len 64 --json out.json

Each iteration submits one fresh random prompt of --input-len tokens (prefix caching off) and generates
--output-len tokens greedily with ignore_eos. The first step is the prefill (its time is the TTFT); decode figures
are over the remaining steps: tokens/s = 1 / median step time (robust to noise from other processes), also the mean.
Achieved bandwidth = bytes of weights one decode step reads (every matrix once, one embedding row) / step time.
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
    p.add_argument("--backend", default="auto", choices=OURS + ("hf", "llama.cpp"),
                   help="ours: auto/torch/cpu/triton/cuda; or 'hf' (transformers) or 'llama.cpp' (needs --gguf)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--num-iters", type=int, default=3, help="measured iterations (medians are reported)")
    p.add_argument("--num-iters-warmup", type=int, default=1)
    p.add_argument("--prefill-iters", type=int, default=None,
                   help="extra prefill-only iterations (max_tokens=1) on top of --num-iters (default: 2)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--gguf", default=None, help="llama.cpp: the GGUF file (bench/gguf_convert.py makes it)")
    p.add_argument("--one-token-evals", action="store_true",
                   help="llama.cpp: feed the prompt one token per eval (llama-cpp-python 0.3.36 segfaults on "
                        "multi-token evals of Q8_0 / Q4_0 files on AMX machines); prefill figures then are sequential")
    p.add_argument("--quantization", default=None, help="ours: LLM(quantization=...), e.g. int8 / int4")
    p.add_argument("--quantization-config", default=None, help="ours: LLM(quantization_config=JSON)")
    p.add_argument("--no-bandwidth", action="store_true", help="do not measure/load the machine's bandwidth")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    args.model = args.model or args.model_pos
    return args


# ---- engines: each returns (prefill_seconds, [decode step seconds]) for one prompt -------------------------------

class Ours:
    def __init__(self, args: argparse.Namespace) -> None:
        from stablelm_fast import LLM, SamplingParams
        self.SamplingParams = SamplingParams
        max_len = args.input_len + args.output_len + 16
        qconfig = json.loads(args.quantization_config) if args.quantization_config else None
        self.llm = LLM(args.model, dtype=args.dtype, backend=args.backend, load_format=args.load_format,
                       max_model_len=max_len, enable_prefix_caching=False, max_num_seqs=1,
                       num_kv_blocks=-(-max_len // 16) + 2, quantization=args.quantization,
                       quantization_config=qconfig)
        quant = f", {args.quantization}" if args.quantization else ""
        self.name = f"stablelm-fast ({self.llm.engine.backend}{quant})"

    def run(self, prompt: list[int], max_tokens: int) -> tuple[float, list[float]]:
        eng = self.llm.engine
        params = self.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        eng.add_request({"prompt_token_ids": prompt}, params)
        times = []
        while eng.has_unfinished_requests():
            eng.step()
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
        return times[0], times[1:]


class HF:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        from transformers import AutoModelForCausalLM
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
        self.model.eval()
        import transformers
        self.name = f"HF transformers {transformers.__version__}"

    def run(self, prompt: list[int], max_tokens: int) -> tuple[float, list[float]]:
        torch = self.torch
        with torch.inference_mode():
            ids = torch.tensor([prompt])
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            past = out.past_key_values
            prefill = time.perf_counter() - t0
            times = []
            for _ in range(max_tokens - 1):
                t0 = time.perf_counter()
                out = self.model(input_ids=tok, past_key_values=past, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                past = out.past_key_values
                times.append(time.perf_counter() - t0)
        return prefill, times


class LlamaCpp:
    def __init__(self, args: argparse.Namespace) -> None:
        import numpy as np
        import llama_cpp
        if not args.gguf or not os.path.isfile(args.gguf):
            raise SystemExit("--backend llama.cpp needs --gguf FILE (make it with bench/gguf_convert.py)")
        self.np = np
        threads = args.threads or common.num_threads()
        self.llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=args.input_len + args.output_len + 16,
                                   n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.one_token = args.one_token_evals
        self.name = f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, {os.path.basename(args.gguf)})"

    def _next(self) -> int:
        # greedy on the last token's logits (as the engines above: argmax, no sampler overhead). With
        # logits_all=False llama-cpp-python does not copy them to .scores: read llama.cpp's buffer directly.
        return int(self.np.argmax(self.np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))))

    def run(self, prompt: list[int], max_tokens: int) -> tuple[float, list[float]]:
        self.llm.reset()
        self.llm._ctx.memory_clear(True) if hasattr(self.llm._ctx, "memory_clear") else None
        t0 = time.perf_counter()
        for chunk in ([[t] for t in prompt] if self.one_token else [prompt]):
            self.llm.eval(chunk)
        tok = self._next()
        prefill = time.perf_counter() - t0
        times = []
        for _ in range(max_tokens - 1):
            t0 = time.perf_counter()
            self.llm.eval([tok])
            tok = self._next()
            times.append(time.perf_counter() - t0)
        return prefill, times


def make_engine(args: argparse.Namespace):
    if args.backend == "hf":
        return HF(args)
    if args.backend == "llama.cpp":
        return LlamaCpp(args)
    return Ours(args)


def run(args: argparse.Namespace) -> dict:
    args.model = common.resolve_model(args.model)
    threads = common.set_threads(args.threads)
    limits = None if args.no_bandwidth else common.limits_cached()
    engine = make_engine(args)
    rss_after_load = common.rss_bytes()
    n_prompts = args.num_iters_warmup + args.num_iters + (2 if args.prefill_iters is None else args.prefill_iters)
    prompts = common.random_prompts(args.model, n_prompts, args.input_len, seed=1234)
    for i in range(args.num_iters_warmup):
        engine.run(prompts.pop(), min(8, args.output_len))
    prefills, steps_all, step_medians, step_means = [], [], [], []
    for i in range(args.num_iters):
        prefill, steps = engine.run(prompts.pop(), args.output_len)
        prefills.append(prefill)
        if steps:
            steps_all.extend(steps)
            step_medians.append(common.median(steps))
            step_means.append(sum(steps) / len(steps))
    while prompts:  # prefill-only iterations: more samples of the (short) prefill
        prefill, _ = engine.run(prompts.pop(), 1)
        prefills.append(prefill)
    ttft = common.median(prefills)
    step = common.median(steps_all) if steps_all else float("nan")
    import torch
    if args.backend == "llama.cpp":
        from gguf_quantize import gguf_decode_bytes
        weight_bytes = gguf_decode_bytes(args.gguf)
    elif args.quantization:
        weight_bytes = common.quantized_decode_weight_bytes(args.model, args.quantization, args.quantization_config)
    else:
        weight_bytes = common.decode_weight_bytes(args.model, getattr(torch, args.dtype))
    res = {
        "engine": engine.name, "backend": args.backend, "model": args.model, "dtype": args.dtype,
        "input_len": args.input_len, "output_len": args.output_len, "threads": threads,
        "ttft_s": ttft, "ttft_all_s": prefills,
        "prefill_tok_s": args.input_len / ttft,
        "decode_step_s_median": step,
        "decode_tok_s": 1.0 / step,
        "decode_tok_s_mean": (len(step_means) and 1.0 / common.median(step_means)) or float("nan"),
        "decode_tok_s_per_iter": [1.0 / s for s in step_medians],
        "decode_weight_bytes": weight_bytes,
        "decode_weight_gbps": weight_bytes / step / 1e9,
        "rss_after_load_bytes": rss_after_load, "quantization": args.quantization,
        "one_token_evals": args.one_token_evals,
        "machine": common.machine_info(),
    }
    if limits:
        res["machine_read_gbps"] = limits["read_gbps"]
        res["bandwidth_fraction"] = res["decode_weight_gbps"] / limits["read_gbps"]
    return res


def print_results(res: dict) -> None:
    bw = res.get("machine_read_gbps")
    print(f"# {res['engine']} | {os.path.basename(res['model'].rstrip('/'))} {res['dtype']} | "
          f"{res['input_len']} in / {res['output_len']} out | {res['threads']} threads")
    common.print_table([[res["engine"], res["prefill_tok_s"], res["ttft_s"] * 1e3, res["decode_tok_s"],
                         res["decode_tok_s_mean"], res["decode_step_s_median"] * 1e3, res["decode_weight_gbps"],
                         bw, None if bw is None else f"{100 * res['bandwidth_fraction']:.0f}%"]],
                       ["engine", f"prefill tok/s ({res['input_len']})", "TTFT ms", "decode tok/s",
                        "decode tok/s (mean)", "ms/token", "weights GB/s", "machine GB/s", "% of bw"])
    print(f"(decode reads {res['decode_weight_bytes'] / 1e9:.2f} GB of weights per token)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    res = run(args)
    print_results(res)
    if args.json:
        common.write_json(args.json, res)


if __name__ == "__main__":
    main()
