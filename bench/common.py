"""Shared pieces of the benchmarks: the 1.6B-shaped checkpoint, machine limits (memory bandwidth, GEMM peak),
machine description, weight-bytes accounting and small statistics helpers.

The checkpoint has StableLM-2-1.6B's exact shapes (vocab 100352, hidden 2048, 24 layers, 32 heads of 64, 25% rotary,
qkv bias, untied lm_head) with random bf16 weights, written once as real safetensors under bench/.cache/ so that every
engine (ours, HF transformers, llama.cpp via bench/gguf_convert.py) loads the same bytes. Its tokenizer is the small
one from stablelm_fast.tiny; prompts are random token ids, passed as token ids everywhere.

    python bench/common.py            # make the checkpoint if missing, print machine + measured limits
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

CACHE_DIR = os.path.join(ROOT, "bench", ".cache")
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
DEFAULT_MODEL = os.path.join(CACHE_DIR, "stablelm-2-1_6b-shape-bf16")

# StableLM-2-1.6B (stabilityai/stablelm-2-zephyr-1_6b config.json), minus the tokenizer-dependent ids.
SHAPE_1_6B = dict(vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                  num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.25, use_qkv_bias=True,
                  qk_layernorm=False, use_parallel_residual=False, layer_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=4096, tie_word_embeddings=False, hidden_act="silu")


def num_threads() -> int:
    """Threads every engine uses: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(n: int | None = None) -> int:
    n = n or num_threads()
    torch.set_num_threads(n)
    return n


# ---- checkpoint ----------------------------------------------------------------------------------------------------

def make_checkpoint(out_dir: str = DEFAULT_MODEL, num_layers: int | None = None, seed: int = 0,
                    dtype: torch.dtype = torch.bfloat16, quiet: bool = False, weights: bool = True) -> str:
    """The 1.6B-shaped random checkpoint (optionally with fewer layers), written once; returns its folder.
    weights=False writes only config.json + tokenizer (for load_format="dummy")."""
    from stablelm_fast.tiny import ZEPHYR_TEMPLATE, build_tokenizer, hf_config, write_random_weights

    done = os.path.join(out_dir, ".complete")
    if os.path.isfile(done):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    if not quiet:
        print(f"[bench] writing a StableLM-2-1.6B-shaped random {str(dtype).replace('torch.', '')} checkpoint to "
              f"{out_dir} (once) ...", file=sys.stderr, flush=True)
    tok_size = build_tokenizer(out_dir, ZEPHYR_TEMPLATE, "<|endoftext|>")
    config = hf_config("stablelm-2-1_6b", SHAPE_1_6B["vocab_size"])
    config.update(SHAPE_1_6B)
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    config["bos_token_id"] = config["eos_token_id"] = 0  # <|endoftext|> in the small tokenizer
    if weights:
        write_random_weights(out_dir, config, seed=seed, dtype=dtype)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    with open(done, "w", encoding="utf-8") as f:
        json.dump({"tokenizer_size": tok_size, "seed": seed}, f)
    if not quiet:
        print(f"[bench] checkpoint written in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out_dir


def resolve_model(model: str | None) -> str:
    """--model default: the cached 1.6B-shaped checkpoint (made on first use)."""
    if model:
        return model
    return make_checkpoint(DEFAULT_MODEL)


def tokenizer_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    return max(ids) + 1


def load_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def random_prompts(model_dir: str, num: int, length: int, seed: int = 0, low: int = 8) -> list[list[int]]:
    """`num` prompts of `length` random token ids in [low, tokenizer size): no special token (ids < 6) in them."""
    gen = torch.Generator().manual_seed(seed)
    high = tokenizer_size(model_dir)
    return [torch.randint(low, high, (length,), generator=gen).tolist() for _ in range(num)]


def checkpoint_tensor_bytes(model_dir: str) -> dict[str, int]:
    """name -> bytes of every tensor in the checkpoint's safetensors files (from the headers only)."""
    import glob
    import struct

    sizes: dict[str, int] = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                start, stop = info["data_offsets"]
                sizes[name] = stop - start
    return sizes


def decode_weight_bytes(model_dir: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Weight bytes one decode step must read, in `dtype`: every matrix and vector once, but of the embedding table
    only one row (a gather). With tied embeddings the lm_head reads the whole table."""
    cfg = load_config(model_dir)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, nbytes in checkpoint_tensor_bytes(model_dir).items():
        numel = nbytes // _ckpt_itemsize(cfg)
        if name == "model.embed_tokens.weight":
            numel = cfg["hidden_size"] * (1 + (cfg["vocab_size"] if cfg.get("tie_word_embeddings") else 0))
        total += numel * itemsize
    return total


def quantized_decode_weight_bytes(model_dir: str, quantization: str, quantization_config: str | None = None) -> int:
    """decode_weight_bytes with the linear layers in LLM(quantization=...)'s form (on the CPU): int8 1 byte, int6
    3/4, int4 half a byte per weight, plus fp16 scales (csrc/cpu/quant.h; and uint8 zero points) per group; the lm_head as
    quantization_config's lm_head says (int8 per channel, int6 in groups of 128, as the others, or bf16);
    embeddings in bf16."""
    from stablelm_fast.quantization import resolve_quant_config
    from stablelm_fast.quantization.config import INT6_GROUP

    q = resolve_quant_config(quantization, json.loads(quantization_config) if quantization_config else None,
                             model_dir)
    cfg = load_config(model_dir)
    total = decode_weight_bytes(model_dir)
    for name, nbytes in checkpoint_tensor_bytes(model_dir).items():
        k = cfg["intermediate_size"] if "down_proj" in name else cfg["hidden_size"]
        if name.endswith("_proj.weight"):
            bits, group, sym = q.bits, q.group_for(k), q.sym
        elif name == "lm_head.weight" and q.lm_head:
            bits, group, sym = {"int8": (8, k, True), "int6": (6, INT6_GROUP if k % INT6_GROUP == 0 else k, True)}.get(
                q.lm_head, (q.bits, q.group_for(k), q.sym))
        else:
            continue
        numel = nbytes // _ckpt_itemsize(cfg)
        total += int(numel * bits / 8) + numel // group * (2 + (0 if sym else 1)) - numel * 2
    return total


def rss_bytes() -> int:
    """This process's resident memory (VmRSS)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _ckpt_itemsize(cfg: dict) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.get("torch_dtype", "float32"), 4)


def kv_bytes_per_token(model_dir: str, dtype: torch.dtype = torch.bfloat16) -> int:
    cfg = load_config(model_dir)
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return 2 * cfg["num_hidden_layers"] * kv * d * torch.empty((), dtype=dtype).element_size()


# ---- machine -------------------------------------------------------------------------------------------------------

def machine_info() -> dict:
    info: dict = {"platform": platform.platform(), "python": platform.python_version(),
                  "torch": torch.__version__, "cores": num_threads(), "logical_cpus": os.cpu_count(),
                  "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and "cpu_model" not in info:
                    info["cpu_model"] = info["cpu"] = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    info.pop("cpu_model", None)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["ram_gb"] = round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    info["avx2"] = "avx2" in flags
    info["fma"] = "fma" in flags
    info["avx512f"] = "avx512f" in flags
    info["avx512_bf16"] = "avx512_bf16" in flags
    info["avx512_vnni"] = "avx512_vnni" in flags
    info["amx"] = any(f.startswith("amx") for f in flags)
    # The ISA flags that pick kernels (ours and oneDNN's), as /proc/cpuinfo spells them.
    info["isa_flags"] = " ".join(sorted(f for f in flags if f in ("avx2", "fma", "f16c") or f.startswith(("avx512", "amx"))))
    try:  # the ISA our CPU kernels run with (csrc/cpu/isa.h)
        from stablelm_fast.ops.cpu_linear import cpu_isa

        info["kernels_isa"] = cpu_isa()
    except Exception:  # extension not built: the torch backend benches still run
        info["kernels_isa"] = None
    info["cuda"] = torch.cuda.is_available()
    try:
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:
        pass
    return info


def describe_machine(info: dict | None = None) -> str:
    info = info or machine_info()
    isa = [k for k in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx") if info.get(k)]
    return (f"{info['cpu']}, {info['cores']} cores, {info.get('ram_gb', '?')} GB RAM, ISA: {'/'.join(isa) or 'none'}, "
            f"our CPU kernels: {info.get('kernels_isa') or 'n/a'}, torch {info['torch']}, Python {info['python']}")


def measure_bandwidth(size_gb: float = 1.0, repeats: int = 7) -> dict:
    """DRAM read bandwidth with all threads, best of `repeats`, over data far larger than the caches (the decode
    roofline): torch.sum over a size_gb fp32 vector, and torch.mv of a size_gb fp32 matrix (a GEMV: what decode
    does; BLAS prefetches well and usually reads faster than a reduction). read_gbps is the best of the two."""
    n = int(size_gb * (1 << 30)) // 4
    x = torch.ones(n, dtype=torch.float32)
    x.sum()  # fault the pages in

    def best(fn) -> tuple[float, float]:
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            rates.append(n * 4 / (time.perf_counter() - t0) / 1e9)
        return max(rates), statistics.median(rates)

    sum_best, sum_med = best(x.sum)
    rows = 4096
    w = x[: rows * (n // rows)].view(rows, n // rows)
    v = torch.ones(n // rows)
    torch.mv(w, v)
    mv_best, mv_med = best(lambda: torch.mv(w, v))
    del x, w
    return {"read_gbps": max(sum_best, mv_best), "read_gbps_median": max(sum_med, mv_med),
            "sum_gbps": sum_best, "gemv_fp32_gbps": mv_best, "size_gb": size_gb}


def measure_gemm(dtype: torch.dtype, size: int = 2048, repeats: int = 5, budget_s: float = 5.0) -> float:
    """Best GFLOP/s of torch.matmul [n,n] x [n,n] in dtype. Starts at n=256 and grows to `size` only while a
    multiply stays fast (a dtype without a fast kernel here, e.g. bf16 without AVX-512-BF16, can be 100x slower)."""
    best, n = 0.0, 256
    while True:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        first = time.perf_counter() - t0
        reps = max(1, min(repeats, int(budget_s / max(first, 1e-6))))
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
        if n >= size or first * 8 * reps > budget_s:
            return best
        n *= 2


def measure_limits(quick: bool = False) -> dict:
    """Measured roofline of this machine: DRAM read GB/s and GEMM GFLOP/s (fp32, bf16)."""
    set_threads()
    bw = measure_bandwidth(0.5 if quick else 1.5, 3 if quick else 7)
    out = {**bw, "gemm_fp32_gflops": measure_gemm(torch.float32, repeats=2 if quick else 5),
           "gemm_bf16_gflops": measure_gemm(torch.bfloat16, repeats=2 if quick else 5),
           "threads": torch.get_num_threads()}
    return out


def limits_cached(path: str | None = None, refresh: bool = False) -> dict:
    """measure_limits() once per machine (kept in bench/.cache/limits.json, keyed by CPU and core count)."""
    path = path or os.path.join(CACHE_DIR, "limits.json")
    info = machine_info()
    key = f"{info['cpu']}|{info['cores']}|{info['torch']}"
    if not refresh and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                cached = json.load(f)
            if cached.get("key") == key:
                return cached["limits"]
        except (OSError, ValueError, KeyError):
            pass
    limits = measure_limits()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"key": key, "limits": limits}, f, indent=1)
    return limits


# ---- statistics / output -------------------------------------------------------------------------------------------

def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def print_table(rows: list[list], header: list[str]) -> None:
    cells = [[str(c) for c in header]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    for j, r in enumerate(cells):
        print(" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print(line)


def fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"
    return "n/a" if v is None else str(v)


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)


def main() -> None:
    p = argparse.ArgumentParser(description="make the 1.6B-shaped checkpoint; print machine and measured limits")
    p.add_argument("--model-dir", default=DEFAULT_MODEL)
    p.add_argument("--num-layers", type=int, default=None, help="fewer layers than 24 (a smaller test model)")
    p.add_argument("--refresh", action="store_true", help="re-measure the limits even if cached")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    has_config = os.path.isfile(os.path.join(args.model_dir, "config.json"))
    path = args.model_dir if has_config else make_checkpoint(args.model_dir, num_layers=args.num_layers)
    info = machine_info()
    limits = limits_cached(refresh=args.refresh)
    print(f"machine: {describe_machine(info)}")
    print(f"checkpoint: {path} (decode reads {decode_weight_bytes(path) / 1e9:.2f} GB of bf16 weights per token)")
    print(f"memory read bandwidth: {limits['read_gbps']:.1f} GB/s (median {limits['read_gbps_median']:.1f}); "
          f"GEMM peak: fp32 {limits['gemm_fp32_gflops']:.0f} GFLOP/s, bf16 {limits['gemm_bf16_gflops']:.0f} GFLOP/s")
    if args.json:
        write_json(args.json, {"machine": info, "limits": limits, "model": path})


if __name__ == "__main__":
    main()
