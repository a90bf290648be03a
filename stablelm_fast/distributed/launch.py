"""Tensor parallelism over several processes or hosts, started by torchrun.

    # host 0 (also the master) and host 1, two ranks each: tensor_parallel_size = 2 x 2 = 4
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST0_ADDR --master-port 29500 --nproc-per-node 2 \\
        -m stablelm_fast.distributed.launch /models/stablelm-2-12b --dtype bfloat16 --prompt "Hello"
    torchrun --nnodes 2 --node-rank 1 --master-addr HOST0_ADDR --master-port 29500 --nproc-per-node 2 \\
        -m stablelm_fast.distributed.launch /models/stablelm-2-12b --dtype bfloat16

Every rank parses the same flags (pass the same model flags everywhere) and joins the world torchrun describes
(MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE, `env://`). Global rank 0 is the driver: it builds the `LLM` (whose
TPExecutor attaches to this world instead of spawning processes), runs the scheduler and sampler, and generates for
the --prompt flags and the lines of --prompts-file ('-': stdin). Every other rank loads its shard and runs the worker
loop until the driver sends STOP (or disappears: its collectives then fail and the rank exits). The tensor
parallel size is the world size. On CUDA each rank uses cuda:LOCAL_RANK and the model's collectives use NCCL; the
per-step command broadcast always goes over gloo (CPU tensors), so set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME)
when the hosts have several network interfaces. The model folder must exist at the same path on every host.

To put a server on rank 0 instead, do the same in your own entry point:

    rank = init_from_env(args.device)
    if rank != 0:
        run_worker(args); return
    engine = AsyncLLM(args.model, tensor_parallel_size=dist.get_world_size(), ...)  # then serve
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

from stablelm_fast.config import resolve_device
from stablelm_fast.distributed.comm import local_rank
from stablelm_fast.distributed.worker import run_attached


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stablelm_fast.distributed.launch",
                                description="stablelm-fast tensor parallelism under torchrun (see the module doc)")
    p.add_argument("model", help="HF-format StableLM folder (same path on every host)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantization", default=None, choices=["int8", "int4", "gptq", "awq", "compressed-tensors"])
    p.add_argument("--quantization-config", type=json.loads, default=None, help="JSON, as LLM(quantization_config=)")
    # driver-only flags (ignored on the other ranks)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory-gb", type=float, default=None)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line ('-' = stdin)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--output-json", default=None,
                   help="also write [{prompt, text, token_ids}] of every completion to this file (driver only)")
    return p


def init_from_env(device: str = "auto") -> int:
    """Join the world torchrun set up (env://); -> this process's global rank."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("stablelm_fast.distributed.launch must be started by torchrun (RANK / WORLD_SIZE unset)")
    if not dist.is_initialized():
        dev = resolve_device(device, local_rank())
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # the default group only serves as rendezvous for the executor's own groups (control: gloo; compute:
        # gloo or NCCL), so gloo is enough here
        dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank()


def run_worker(args: argparse.Namespace) -> None:
    run_attached(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
                 backend=args.backend, seed=args.seed, quantization=args.quantization,
                 quantization_config=args.quantization_config)


def run_driver(args: argparse.Namespace) -> None:
    from stablelm_fast import LLM, SamplingParams

    prompts = list(args.prompt)
    if args.prompts_file:
        f = sys.stdin if args.prompts_file == "-" else open(args.prompts_file, encoding="utf-8")
        with f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    llm = LLM(args.model, dtype=args.dtype, device=args.device, tensor_parallel_size=dist.get_world_size(),
              load_format=args.load_format, max_model_len=args.max_model_len, block_size=args.block_size,
              num_kv_blocks=args.num_kv_blocks, kv_cache_memory_gb=args.kv_cache_memory_gb, backend=args.backend,
              seed=args.seed, quantization=args.quantization, quantization_config=args.quantization_config)
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
        outs = llm.generate(prompts, params) if prompts else []
        for out in outs:
            print(f"{out.prompt!r} -> {out.outputs[0].text!r}", flush=True)
        if args.output_json:
            with open(args.output_json, "w", encoding="utf-8") as f:
                json.dump([{"prompt": o.prompt, "text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids)}
                           for o in outs], f)
    finally:
        llm.shutdown()  # STOP to every rank


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    rank = init_from_env(args.device)
    try:
        if rank == 0:
            run_driver(args)
        else:
            run_worker(args)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            pass


if __name__ == "__main__":
    main()
