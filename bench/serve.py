"""Serving benchmark: requests/s and time to first token under concurrent streaming clients.

Starts a real uvicorn on 127.0.0.1 (a free port) serving the model, then C clients (default 16) each send streaming
/v1/completions requests back to back through httpx until N requests (default 64) are done. Without MODEL a tiny
random checkpoint is made locally (the figures then measure the serving stack plus a very small model).

    .venv/bin/python bench/serve.py [MODEL] [--concurrency 16] [--num-requests 64] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from stablelm_fast import AsyncLLM  # noqa: E402
from stablelm_fast.server import create_app  # noqa: E402
from stablelm_fast.tiny import make_tiny_checkpoint  # noqa: E402

PROMPTS = ["The quick brown fox", "A paged KV cache stores keys and values", "Once upon a time there was",
           "What is the capital of France?", "Continuous batching lets new requests", "Hello, world! How are you"]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def start_server(app) -> tuple[uvicorn.Server, threading.Thread, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, sock.getsockname()[1]


async def run_clients(url: str, args: argparse.Namespace) -> tuple[list[float], list[float], int, float]:
    ttfts: list[float] = []
    latencies: list[float] = []
    tokens = 0
    counter = iter(range(args.num_requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in counter:
            body = {"model": "bench", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
                    "temperature": 0.8, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            start = time.perf_counter()
            first = None
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - start)
            ttfts.append(first if first is not None else latencies[-1])

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
    return ttfts, latencies, tokens, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="checkpoint folder (default: a tiny local checkpoint)")
    ap.add_argument("--variant", default="stablelm-2-1_6b", help="tiny checkpoint variant when MODEL is not given")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent streaming clients (default 16)")
    ap.add_argument("--num-requests", type=int, default=64, help="total requests (default 64)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--max-model-len", type=int, default=None)
    args = ap.parse_args()

    model = args.model
    if model is None:
        model = os.path.join(tempfile.gettempdir(), f"stablelm-fast-bench-serve-{args.variant}")
        if not os.path.isfile(os.path.join(model, "model.safetensors")):
            make_tiny_checkpoint(model, args.variant, seed=0)
    engine = AsyncLLM(model, dtype=args.dtype, backend=args.backend, load_format=args.load_format,
                      max_model_len=args.max_model_len)
    server, thread, port = start_server(create_app(engine, served_model_name="bench"))
    url = f"http://127.0.0.1:{port}"
    try:
        warm = argparse.Namespace(**{**vars(args), "num_requests": 2, "concurrency": 2, "max_tokens": 4})
        asyncio.run(run_clients(url, warm))
        ttfts, latencies, tokens, wall = asyncio.run(run_clients(url, args))
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        engine.shutdown()

    print(f"model: {model} (backend={engine.engine.backend}, dtype={args.dtype}), {os.cpu_count()} CPU cores")
    print(f"{args.num_requests} streaming requests, {args.concurrency} concurrent clients, "
          f"{args.max_tokens} tokens each, in {wall:.2f} s")
    print(f"requests/s:           {args.num_requests / wall:8.2f}")
    print(f"output tokens/s:      {tokens / wall:8.1f}")
    print(f"TTFT p50 / p99:       {1000 * statistics.median(ttfts):8.1f} / {1000 * percentile(ttfts, 0.99):.1f} ms")
    print(f"latency p50 / p99:    {1000 * statistics.median(latencies):8.1f} / "
          f"{1000 * percentile(latencies, 0.99):.1f} ms")


if __name__ == "__main__":
    main()
