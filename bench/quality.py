"""Model quality of an engine configuration: held-out perplexity and next-token KL against a reference run.

    python bench/quality.py                                  # built-in model: bf16 `cpu` backend vs fp32 `torch`
    python bench/quality.py MODEL --dtype bfloat16 --backend cpu --ref-dtype float32 --ref-backend torch
    python bench/quality.py --engine-arg quantization='"int4"'   # any LLM(...) kwarg, value parsed as JSON
    python bench/quality.py --save-ref ref.safetensors ...   # store the reference run; --load-ref reuses it

Text: the held-out files of the built-in model's corpus (tools/stdlib_corpus.py: the Python stdlib, split by file),
tokenized by MODEL's tokenizer, each file ended by <|endoftext|>, cut into windows of --window + 1 tokens that step
by --window (the training script scores its held-out loss the same way). Each window is one prompt with
`SamplingParams(max_tokens=1, prompt_logprobs=k)`; `RequestOutput.prompt_logprobs` gives, per prompt token after
the first, {token_id: logprob} with the top k and the actual token.

Figures: perplexity = exp(mean -logprob of the actual tokens) for both runs; KL(ref || run) per position over the
reference's top k tokens plus one bucket for the rest of the vocabulary (a token of the reference's top k missing
from the run's top k gets at most the run's k-th probability and at most its leftover mass), averaged over
positions, with its 99th percentile; top-1 agreement = how often both runs rank the same token first. Bucketing can
only lower the KL, so it reads as a lower bound of the full-vocabulary KL; identical runs give exactly 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tools.stdlib_corpus import split  # noqa: E402

BUILTIN_MODEL = os.path.join(ROOT, "stablelm_fast", "assets", "stablelm-pystdlib-4m")


def heldout_windows(tokenizer, window: int, max_windows: int | None) -> list[list[int]]:
    """Token windows of window + 1 tokens (stepping by window) over the held-out files, in file order."""
    eot = tokenizer.token_to_id("<|endoftext|>")
    stream: list[int] = []
    for _, text in split()[1]:
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
        if eot is not None:
            stream.append(eot)
    out = []
    for start in range(0, len(stream) - 1, window):
        chunk = stream[start:start + window + 1]
        if len(chunk) >= 2:
            out.append(chunk)
        if max_windows is not None and len(out) == max_windows:
            break
    return out


def _as_float(value) -> float:
    return float(getattr(value, "logprob", value))  # a float, or vLLM's Logprob object


def records_from_outputs(windows: list[list[int]], outputs, k: int) -> dict[str, torch.Tensor]:
    """Per scored position: the actual token's logprob, and the top-k (ids, logprobs) sorted by logprob."""
    actual, ids, lps, tokens = [], [], [], []
    for win, out in zip(windows, outputs):
        plp = out.prompt_logprobs
        if plp is None or len(plp) != len(win):
            raise ValueError(f"prompt_logprobs must have one entry per prompt token ({len(win)}), got "
                             f"{None if plp is None else len(plp)}")
        for pos in range(1, len(win)):
            entry = {int(t): _as_float(v) for t, v in plp[pos].items()}
            if win[pos] not in entry:
                raise ValueError(f"prompt_logprobs[{pos}] lacks the actual token {win[pos]}")
            actual.append(entry[win[pos]])
            tokens.append(win[pos])
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            top += [(-1, -math.inf)] * (k - len(top))  # the actual token may be the only entry when k is 0
            ids.append([t for t, _ in top])
            lps.append([v for _, v in top])
    return {"actual": torch.tensor(actual, dtype=torch.float64), "top_ids": torch.tensor(ids, dtype=torch.int64),
            "top_logprobs": torch.tensor(lps, dtype=torch.float64), "tokens": torch.tensor(tokens, dtype=torch.int64)}


def perplexity(records: dict[str, torch.Tensor]) -> float:
    return math.exp(-records["actual"].mean().item())


def topk_kl(ref: dict[str, torch.Tensor], run: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-position KL(ref || run) over the reference's top k tokens plus one bucket for the rest (docstring)."""
    ref_ids, ref_lp = ref["top_ids"], ref["top_logprobs"]
    run_ids, run_lp = run["top_ids"], run["top_logprobs"]
    p = ref_lp.exp()                                                    # [N, k] (0 for padding)
    run_sorted, order = run_ids.sort(-1)                                # look each ref token up in run's top k
    at = torch.searchsorted(run_sorted, ref_ids).clamp_max(run_ids.shape[-1] - 1)
    found = (run_sorted.gather(-1, at) == ref_ids) & (ref_ids >= 0)
    q_found = run_lp.gather(-1, order.gather(-1, at)).exp()
    run_mass = run_lp.exp().sum(-1, keepdim=True)
    leftover = (1 - run_mass).clamp_min(0)
    kth = run_lp.exp().min(-1, keepdim=True).values
    q_missing = torch.minimum(kth, leftover / (~found).sum(-1, keepdim=True).clamp_min(1))
    q = torch.where(found, q_found, q_missing)
    valid = ref_ids >= 0
    eps = 1e-12
    terms = torch.where(valid & (p > 0), p * (p.clamp_min(eps).log() - q.clamp_min(eps).log()), torch.zeros(()))
    p_rest = (1 - (p * valid).sum(-1)).clamp_min(0)
    q_rest = (1 - (q * valid).sum(-1)).clamp_min(0)
    rest = torch.where(p_rest > eps, p_rest * (p_rest.clamp_min(eps).log() - q_rest.clamp_min(eps).log()),
                       torch.zeros(()))
    return (terms.sum(-1) + rest).clamp_min(0)


def run_engine(model: str, windows: list[list[int]], k: int, engine_kwargs: dict) -> tuple[dict, float]:
    """Score every window in one generate() call; engine_kwargs["resolved"] is set to the dtype/backend used."""
    from stablelm_fast import LLM, SamplingParams

    llm = LLM(model, **engine_kwargs)
    engine_kwargs["resolved"] = f"{str(llm.engine.dtype).replace('torch.', '')}/{llm.engine.backend}"
    try:
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": w} for w in windows], params)
        elapsed = time.perf_counter() - start
    finally:
        llm.shutdown()
    return records_from_outputs(windows, outs, k), elapsed


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_engine_args(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-arg expects KEY=JSON_VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=BUILTIN_MODEL)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--engine-arg", action="append", default=[], help="KEY=JSON for LLM(...) of the run")
    ap.add_argument("--ref-dtype", default="float32")
    ap.add_argument("--ref-backend", default="torch")
    ap.add_argument("--ref-engine-arg", action="append", default=[], help="KEY=JSON for LLM(...) of the reference")
    ap.add_argument("--save-ref", help="write the reference run's records here (safetensors)")
    ap.add_argument("--load-ref", help="reuse a reference run written by --save-ref instead of running it")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=64, help="0: every held-out window")
    ap.add_argument("--top-k", type=int, default=20, help="prompt_logprobs k")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from stablelm_fast.tokenizer import Tokenizer

    windows = heldout_windows(Tokenizer(args.model), args.window, args.max_windows or None)
    n_pos = sum(len(w) - 1 for w in windows)
    run_kwargs = dict(dtype=args.dtype, backend=args.backend, **parse_engine_args(args.engine_arg))
    ref_kwargs = dict(dtype=args.ref_dtype, backend=args.ref_backend, **parse_engine_args(args.ref_engine_arg))
    if args.load_ref:
        from safetensors.torch import load_file
        ref, ref_s = load_file(args.load_ref), float("nan")
        ref_kwargs = {"loaded": args.load_ref}
        scored = torch.tensor([t for w in windows for t in w[1:]], dtype=torch.int64)
        if not torch.equal(ref["tokens"], scored):
            raise ValueError(f"{args.load_ref} scored other tokens than this text ({ref['tokens'].numel()} vs "
                             f"{scored.numel()}): use the same model, --window and --max-windows")
    else:
        ref, ref_s = run_engine(args.model, windows, args.top_k, ref_kwargs)  # adds ref_kwargs["resolved"]
    if args.save_ref:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in ref.items()}, args.save_ref)
    run, run_s = run_engine(args.model, windows, args.top_k, run_kwargs)  # adds run_kwargs["resolved"]
    kl = topk_kl(ref, run)
    top1 = (ref["top_ids"][:, 0] == run["top_ids"][:, 0]).double().mean().item()
    res = {"model": args.model, "windows": len(windows), "positions": n_pos, "top_k": args.top_k,
           "ref": ref_kwargs, "run": run_kwargs, "ref_perplexity": perplexity(ref), "run_perplexity": perplexity(run),
           "kl_mean": kl.mean().item(), "kl_p99": kl.quantile(0.99).item() if kl.numel() else 0.0,
           "top1_agreement": top1, "ref_s": ref_s, "run_s": run_s, "machine": cpu_name(),
           "threads": torch.get_num_threads()}
    print(f"held-out text: {len(windows)} windows, {n_pos} scored tokens, prompt_logprobs k={args.top_k}; "
          f"{res['threads']} threads, {res['machine']}")
    print("| run | perplexity | KL(ref, run) mean | KL p99 | top-1 agreement | time s |")
    print("|---|---|---|---|---|---|")
    print(f"| reference {ref_kwargs} | {res['ref_perplexity']:.4f} | 0 | 0 | 1 | {ref_s:.2f} |")
    print(f"| run {run_kwargs} | {res['run_perplexity']:.4f} | {res['kl_mean']:.3e} | {res['kl_p99']:.3e} | "
          f"{top1:.4f} | {run_s:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
