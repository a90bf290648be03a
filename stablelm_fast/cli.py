"""The `stablelm-fast` command: generate, chat, serve, bench.

    stablelm-fast generate MODEL --prompt "Once upon a time" --max-tokens 64
    stablelm-fast chat MODEL
    stablelm-fast serve MODEL --host 127.0.0.1 --port 8000 [--api-key KEY] [--served-model-name NAME]
    stablelm-fast bench {latency,throughput,serve} MODEL ...

Engine flags mirror LLM(...) and are accepted by every subcommand that loads a model.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

ENGINE_FLAGS = ("dtype", "device", "tensor_parallel_size", "load_format", "max_model_len", "block_size",
                "num_kv_blocks", "kv_cache_memory_gb", "enable_prefix_caching", "max_num_seqs",
                "max_num_batched_tokens", "backend", "seed", "speculative_config", "quantization",
                "quantization_config")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="HF-format checkpoint folder (config.json, *.safetensors, "
                                                  "tokenizer.json, tokenizer_config.json)")
    g = p.add_argument_group("engine (mirrors LLM(...))")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weight and activation dtype (default: auto, from the checkpoint and device)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (default: auto, cuda if available)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="shard the model over N processes (NCCL on CUDA, gloo on CPU; default 1)")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="how to load weights; 'dummy' = random weights from config.json (benchmarks)")
    g.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="context length (prompt + output) in tokens (default: max_position_embeddings)")
    g.add_argument("--block-size", type=int, default=16, metavar="N", help="tokens per KV-cache block (default 16)")
    g.add_argument("--num-kv-blocks", type=int, default=None, metavar="N",
                   help="explicit KV-cache size in blocks (default: sized from --kv-cache-memory-gb / free memory)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=None, metavar="GB",
                   help="memory for the KV cache in GB (default: sized automatically)")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="disable reuse of cached KV blocks across prompts sharing a prefix")
    g.add_argument("--max-num-seqs", type=int, default=256, metavar="N",
                   help="most sequences in one batch (default 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="most tokens in one engine step (default: max(max_model_len, 2048))")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "triton", "cuda"],
                   help="kernel backend: torch (reference), cpu (C++ extension), triton, cuda (default: auto)")
    g.add_argument("--seed", type=int, default=0, help="engine random seed (default 0)")
    g.add_argument("--speculative-config", type=_json_dict, default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s spelling, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\' (default: off)')
    g.add_argument("--quantization", "-q", default=None,
                   choices=["int8", "int4", "gptq", "awq", "compressed-tensors"],
                   help="weight-only quantization: int8 / int4 quantize a full-precision checkpoint at load; gptq / "
                        "awq / compressed-tensors load pre-quantized checkpoints (default: what config.json says, "
                        "else none)")
    g.add_argument("--quantization-config", type=_json_dict, default=None, metavar="JSON",
                   help='int8 / int4 settings, e.g. \'{"group_size": 64, "sym": true, "lm_head": false}\' '
                        '(default int4: group_size 128 with zero points, an int6 lm_head; int8: per output channel, '
                        'an int8 lm_head; lm_head: "int8", "int6", true or false)')


def _json_dict(text: str) -> dict:
    import json
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling (mirrors SamplingParams)")
    g.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N",
                   help=f"most tokens to generate (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    g.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens (-1: all; default)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * p(best) (default 0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty > 1 discourages repeats")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--sampling-seed", type=int, default=None, metavar="N",
                   help="per-request sampling seed (reproducible samples)")


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ENGINE_FLAGS}


def _sampling_params(args: argparse.Namespace, n: int = 1):
    from stablelm_fast.sampling_params import SamplingParams
    return SamplingParams(n=n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, stop=args.stop,
                          seed=args.sampling_seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stablelm-fast", description="Run StableLM models: generate text, chat, serve the OpenAI API, "
                                          "benchmark.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("generate", help="complete one or more prompts and print the text",
                       description="Complete prompts with the full engine and print each completion.")
    _add_engine_args(p)
    p.add_argument("--prompt", "-p", action="append", required=True, help="prompt text (repeatable: a batch)")
    p.add_argument("--n", type=int, default=1, help="completions per prompt (default 1)")
    _add_sampling_args(p, max_tokens=64)

    p = sub.add_parser("chat", help="interactive chat with the checkpoint's chat template (streaming)",
                       description="Chat in the terminal; history is kept. Type 'exit' (or Ctrl-D) to quit, "
                                   "'/reset' to clear the history.")
    _add_engine_args(p)
    p.add_argument("--system", default=None, help="a system prompt for the conversation")
    _add_sampling_args(p, max_tokens=512)

    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                       description="Serve /v1/completions, /v1/chat/completions, /v1/models and /health.")
    _add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("STABLELM_FAST_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $STABLELM_FAST_API_KEY, else open)")
    p.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="model name clients must send (repeatable; default: the MODEL path)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                   help="larger request bodies get 413 (default 8 MiB)")
    p.add_argument("--max-queued-requests", type=int, default=None, metavar="N",
                   help="sequences that may wait beyond --max-num-seqs; past it requests get 503 with Retry-After "
                        "(default: no limit)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="abort a request (freeing its KV cache) that has not finished this long after it arrived; "
                        "the client gets 504 (default: none; a request may ask for less with 'request_timeout')")
    p.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGIN",
                   help="browser origin allowed to call the API (CORS; repeatable; '*': any; default: no CORS)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info)")

    p = sub.add_parser("bench", help="benchmarks: latency, throughput, serve (scripts in bench/)",
                       description="Run bench/<KIND>.py of the source tree with MODEL and any further arguments.")
    p.add_argument("kind", choices=["latency", "throughput", "serve"], help="which benchmark")
    p.add_argument("model", metavar="MODEL", help="checkpoint folder passed to the benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="further arguments for the benchmark script")
    return parser


# ---- subcommands -------------------------------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from stablelm_fast.llm import LLM
    params = _sampling_params(args, n=args.n)  # bad values fail before the model is loaded
    llm = LLM(args.model, **_engine_kwargs(args))
    try:
        outs = llm.generate(args.prompt, params, use_tqdm=len(args.prompt) > 1)
        for out in outs:
            for c in out.outputs:
                header = f"--- prompt {out.prompt!r}" + (f" [{c.index}]" if args.n > 1 else "")
                print(header, f"({len(c.token_ids)} tokens, {c.finish_reason})")
                print(f"{out.prompt}{c.text}")
    finally:
        llm.shutdown()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from stablelm_fast.llm import LLM
    params = _sampling_params(args)
    llm = LLM(args.model, **_engine_kwargs(args))
    engine, tok = llm.engine, llm.tokenizer
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    print("stablelm-fast chat: type 'exit' or Ctrl-D to quit, '/reset' to clear the history.", file=sys.stderr)
    turn = 0
    try:
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            text = line.strip()
            if text in ("exit", "quit", "/exit", "/quit"):
                break
            if not text:
                continue
            if text == "/reset":
                history = history[:1] if args.system else []
                continue
            history.append({"role": "user", "content": line})
            prompt = tok.apply_chat_template(history, add_generation_prompt=True)
            ids = tok.encode(prompt, add_special_tokens=False)
            rid = f"chat-{turn}"
            turn += 1
            try:
                engine.add_request({"prompt": prompt, "prompt_token_ids": ids}, params, request_id=rid)
            except ValueError as e:  # e.g. the conversation no longer fits the context
                print(f"error: {e}", file=sys.stderr)
                history.pop()
                continue
            printed, reply = 0, ""
            try:
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.request_id != rid:
                            continue
                        reply = out.outputs[0].text
                        sys.stdout.write(reply[printed:])
                        sys.stdout.flush()
                        printed = max(printed, len(reply))
            except KeyboardInterrupt:
                engine.abort_request(rid)
                print(" [interrupted]", end="")
            print()
            history.append({"role": "assistant", "content": reply})
    except KeyboardInterrupt:
        print()
    finally:
        llm.shutdown()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from stablelm_fast.async_llm import AsyncLLM
    from stablelm_fast.server import create_app
    engine = AsyncLLM(args.model, **_engine_kwargs(args))
    names = args.served_model_name
    app = create_app(engine, served_model_name=names if names and len(names) > 1 else (names or [None])[0],
                     api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     max_pending_seqs=(None if args.max_queued_requests is None
                                       else args.max_num_seqs + args.max_queued_requests),
                     allowed_origins=args.allowed_origins, request_timeout=args.request_timeout)
    print(f"stablelm-fast: serving {args.model} as {app.state.served_model_names} on http://{args.host}:{args.port}"
          + (" (API key required)" if args.api_key else ""), file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0


def _find_bench_script(kind: str) -> str | None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (here, os.getcwd()):
        path = os.path.join(root, "bench", f"{kind}.py")
        if os.path.isfile(path):
            return path
    return None


def _model_argv(path: str, model: str) -> list[str]:
    """How the script takes the model: a positional MODEL (default), or its --model-dir / --model option."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    if re.search(r"add_argument\(\s*[\"']model[\"']", source):
        return [model]
    for flag in ("--model-dir", "--model"):
        if re.search(rf"[\"']{flag}[\"']", source):
            return [flag, model]
    return [model]


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy
    path = _find_bench_script(args.kind)
    if path is None:
        print(f"stablelm-fast bench {args.kind}: bench/{args.kind}.py was not found (it ships with the source tree; "
              f"run from a checkout of stablelm-fast).", file=sys.stderr)
        return 2
    rest = [a for a in args.rest if a != "--"]
    saved = sys.argv
    sys.argv = [path, *_model_argv(path, args.model), *rest]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "bench": cmd_bench}[args.command]
    try:
        return handler(args)
    except ValueError as e:  # bad flags or inputs: a message, not a traceback
        print(f"stablelm-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
