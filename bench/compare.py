"""One command: ours vs HF transformers vs llama.cpp on the same StableLM-2-1.6B-shaped bf16 checkpoint.

    python bench/compare.py                     # everything (several minutes on a small CPU)
    python bench/compare.py --no-install        # do not try `pip install llama-cpp-python` when it is missing
    python bench/compare.py --quick             # short lengths, to check that it runs
    python bench/compare.py --rounds 3          # every engine 3 times, interleaved: medians (noisy machines)

Quantized rows: ours with LLM(quantization='int8' / 'int4') against llama.cpp Q8_0 / Q4_0 files made from the same
bf16 GGUF by llama.cpp's own quantizer (bench/gguf_quantize.py); llama.cpp's quantized rows get their prompts one
token per eval (llama-cpp-python 0.3.36 segfaults on multi-token evals of Q8_0 / Q4_0 on AMX machines), so their
prefill figures are sequential ones. Every row also reports the engine process's resident memory after load (RSS).

Measures, each engine in a fresh subprocess run one after another (no memory or thread interference; threads =
cores): batch-1 decode tokens/s and 128-token prefill tokens/s (bench/latency.py), and throughput of 32 requests of
128 in / 64 out (bench/throughput.py; llama.cpp: batch-1 figures only). Prints a table with ratios vs HF and vs
llama.cpp and the issue's targets, the machine it ran on and its measured memory bandwidth; writes
bench/results/compare-<date>.json and a bar chart bench/results/compare-<date>.png (matplotlib). Needs the bench
extras: `pip install .[bench]` (transformers, gguf, matplotlib); llama-cpp-python is installed on demand.

--rounds N runs the whole engine list N times, one round after another (ours and its peer minutes apart, not a
round apart): the table shows each figure's median over rounds, the ratios are medians of the per-round ratios, and
each round's decode figures are printed. On the shared VMs here a figure moved by up to 1.6x between runs minutes
apart (the same code, int4 decode 36.4 then 22.4 tok/s): single-round ratios can mislead.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

TARGETS = {  # the issues' targets: (metric, baseline, minimum ratio, our row)
    "decode vs llama.cpp": ("decode_tok_s", "llama.cpp", 1.0, "ours"),
    "prefill vs HF": ("prefill_tok_s", "hf", 1.25, "ours"),
    "throughput vs HF": ("throughput_tok_s", "hf", 1.5, "ours"),  # stretch: 2x
    "int8 decode vs Q8_0": ("decode_tok_s", "llama.cpp-Q8_0", 1.0, "ours-int8"),
    "int4 decode vs Q4_0": ("decode_tok_s", "llama.cpp-Q4_0", 1.0, "ours-int4"),
}
ALL_ENGINES = "ours,hf,llama.cpp,ours-int8,ours-int4,llama.cpp-Q8_0,llama.cpp-Q4_0"
PAIRS = [("ours", "hf"), ("ours", "llama.cpp"), ("ours-int8", "llama.cpp-Q8_0"), ("ours-int4", "llama.cpp-Q4_0")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the cached 1.6B-shaped checkpoint)")
    p.add_argument("--backend", default="auto", help="our backend")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64,
                   help="decode tokens per latency iteration (decode tok/s = 1 / median step time)")
    p.add_argument("--num-iters", type=int, default=1, help="latency iterations per engine (after a warm-up)")
    p.add_argument("--prefill-iters", type=int, default=1, help="extra prefill-only latency iterations")
    p.add_argument("--hf-dtype", default="auto",
                   help="HF transformers dtype; auto: its faster of bfloat16 and float32 on this machine, measured "
                        "first by a short prefill run of each (compute-bound, as the metrics compared with HF)")
    p.add_argument("--tp-prompts", type=int, default=32)
    p.add_argument("--tp-input-len", type=int, default=128)
    p.add_argument("--tp-output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="run the engine list this many times, interleaved "
                   "(medians; see the module doc)")
    p.add_argument("--engines", default=ALL_ENGINES, help=f"comma-separated subset of {ALL_ENGINES}")
    p.add_argument("--no-install", action="store_true", help="never pip-install llama-cpp-python")
    p.add_argument("--quick", action="store_true", help="tiny lengths: check that everything runs")
    p.add_argument("--out-dir", default=common.RESULTS_DIR)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.input_len, args.output_len, args.num_iters, args.prefill_iters = 32, 8, 1, 1
        args.tp_prompts, args.tp_input_len, args.tp_output_len = 4, 32, 8
    return args


def py(script: str, *argv: str) -> int:
    """Run a bench script in a fresh interpreter, streaming its output; returns the exit code."""
    cmd = [sys.executable, os.path.join(HERE, script), *argv]
    print(f"\n$ {' '.join(os.path.relpath(c) if c.startswith(HERE) else c for c in cmd[1:])}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(common.num_threads()))
    return subprocess.call(cmd, env=env)


def run_json(script: str, *argv: str) -> dict | None:
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        rc = py(script, *argv, "--json", path)
        if rc != 0:
            print(f"[compare] {script} {' '.join(argv[:2])} failed with exit code {rc}", flush=True)
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
    finally:
        os.unlink(path)


def ensure_llama_cpp(no_install: bool) -> tuple[bool, str]:
    if importlib.util.find_spec("llama_cpp") is not None:
        try:
            import llama_cpp
            return True, "llama-cpp-python " + getattr(llama_cpp, "__version__", "?")
        except Exception as e:  # installed but its shared library does not load
            return False, f"llama_cpp does not import ({type(e).__name__}: {e}): llama.cpp skipped"
    if no_install:
        return False, "llama-cpp-python is not installed (--no-install): llama.cpp skipped"
    log = os.path.join(common.RESULTS_DIR, "llama-cpp-install.log")
    os.makedirs(common.RESULTS_DIR, exist_ok=True)
    print(f"[compare] llama-cpp-python is missing: pip install llama-cpp-python (builds llama.cpp from source, "
          f"several minutes; log: {log})", flush=True)
    # only the library: no llava/mtmd (half of the build), native CPU flags
    env = dict(os.environ, CMAKE_ARGS=os.environ.get("CMAKE_ARGS", "-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON"),
               CMAKE_BUILD_PARALLEL_LEVEL=str(common.num_threads()))
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.call([sys.executable, "-m", "pip", "install", "llama-cpp-python"], stdout=f,
                             stderr=subprocess.STDOUT, env=env)
    importlib.invalidate_caches()
    if rc != 0 or importlib.util.find_spec("llama_cpp") is None:
        return False, f"pip install llama-cpp-python failed (see {log}): llama.cpp skipped"
    return True, "llama-cpp-python (installed now)"


def ensure_bench_deps() -> None:
    missing = [m for m in ("transformers", "gguf", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"[compare] installing the bench extras {missing} (pip install .[bench] does the same)", flush=True)
        subprocess.call([sys.executable, "-m", "pip", "install", "-q", *missing])
        importlib.invalidate_caches()


def pick_hf_dtype(model: str, args: argparse.Namespace) -> tuple[str, dict]:
    """HF transformers' faster dtype here: a short latency run (prefill of --input-len, 4 decode steps) in bfloat16
    and in float32; the higher prefill tok/s wins (AMX / AVX512-BF16 CPUs: bf16; AVX2-only ones: fp32)."""
    probe = {}
    for dtype in ("bfloat16", "float32"):
        r = run_json("latency.py", "--backend", "hf", "--model", model, "--dtype", dtype, "--input-len",
                     str(args.input_len), "--output-len", "4", "--num-iters", "1", "--prefill-iters", "1",
                     "--no-bandwidth") or {}
        probe[dtype] = {"prefill_tok_s": r.get("prefill_tok_s"), "decode_tok_s": r.get("decode_tok_s")}
    best = max(probe, key=lambda d: probe[d]["prefill_tok_s"] or 0.0)
    print(f"[compare] HF transformers dtype probe: " + ", ".join(
        f"{d} prefill {v['prefill_tok_s'] or 0:.1f} / decode {v['decode_tok_s'] or 0:.2f} tok/s"
        for d, v in probe.items()) + f": HF runs in {best}", flush=True)
    return best, probe


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    ensure_bench_deps()
    model = common.resolve_model(args.model)
    info = common.machine_info()
    print(f"[compare] machine: {common.describe_machine(info)}")
    print(f"[compare] checkpoint: {model}")

    # the roofline, measured fresh in its own process
    limits = run_json("common.py", "--model-dir", model, "--refresh") or {}
    limits = limits.get("limits", {})
    bw = limits.get("read_gbps")

    llama_note = None
    ggufs: dict[str, str] = {}  # "bf16" / "Q8_0" / "Q4_0" -> file
    if any(e.startswith("llama.cpp") for e in engines):
        ok, llama_note = ensure_llama_cpp(args.no_install)
        print(f"[compare] {llama_note}", flush=True)
        if ok:
            from gguf_convert import default_out
            ggufs["bf16"] = default_out(model, "bf16")
            if py("gguf_convert.py", "--model", model, "--out", ggufs["bf16"], "--check") != 0:
                llama_note, ggufs = "GGUF conversion or llama.cpp load failed: llama.cpp skipped", {}
                print(f"[compare] {llama_note}")
            for kind in ("Q8_0", "Q4_0"):
                out = default_out(model, kind)
                if f"llama.cpp-{kind}" in engines and ggufs and \
                        py("gguf_quantize.py", ggufs["bf16"], out, "--type", kind) == 0:
                    ggufs[kind] = out
        engines = [e for e in engines if not e.startswith("llama.cpp") or ggufs.get(e.partition("-")[2] or "bf16")]

    hf_dtype, hf_probe = args.hf_dtype, None
    if hf_dtype == "auto" and "hf" in engines:
        hf_dtype, hf_probe = pick_hf_dtype(model, args)
    lat_args = ["--model", model, "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                "--num-iters", str(args.num_iters), "--prefill-iters", str(args.prefill_iters)]
    tp_args = ["--model", model, "--num-prompts", str(args.tp_prompts),
               "--input-len", str(args.tp_input_len), "--output-len", str(args.tp_output_len)]
    results: dict[str, list[dict]] = {eng: [] for eng in engines}  # per engine, one entry per round
    for rnd in range(max(1, args.rounds)):
        for eng in engines:
            kind = eng.partition("-")[2]  # int8 / int4 / Q8_0 / Q4_0, "" for the unquantized rows
            backend = "hf" if eng == "hf" else "llama.cpp" if eng.startswith("llama.cpp") else args.backend
            extra = ["--dtype", hf_dtype if eng == "hf" else args.dtype]
            if backend == "llama.cpp":
                extra += ["--gguf", ggufs[kind or "bf16"]] + (["--one-token-evals"] if kind else [])
            lat = run_json("latency.py", "--backend", backend, *lat_args, *extra,
                           *(["--quantization", kind] if eng.startswith("ours-") else []))
            tp = None
            if backend != "llama.cpp":
                tp = run_json("throughput.py", "--backend", backend, *tp_args, *extra,
                              *(["--quantization", kind] if eng.startswith("ours-") else []))
            results[eng].append({"latency": lat, "throughput": tp})
        if args.rounds > 1:
            print(f"[compare] round {rnd + 1}: decode tok/s " + ", ".join(
                f"{eng} {(results[eng][-1]['latency'] or {}).get('decode_tok_s') or 0:.1f}" for eng in engines),
                flush=True)

    per_round = {eng: [row_of(r, eng, bw) for r in runs] for eng, runs in results.items()}
    rows = {eng: median_row(rs) for eng, rs in per_round.items()}

    metrics = ["decode_tok_s", "prefill_tok_s", "throughput_tok_s"]
    print(f"\n== stablelm-fast vs HF transformers vs llama.cpp | {os.path.basename(model)} {args.dtype} | "
          f"{info['cores']} threads ==")
    print(f"machine: {common.describe_machine(info)}")
    print(f"CPU ISA flags: {info.get('isa_flags') or 'n/a'}; HF transformers dtype: {hf_dtype}")
    if bw:
        print(f"measured memory read bandwidth {bw:.1f} GB/s; GEMM peak fp32 {limits.get('gemm_fp32_gflops', 0):.0f} "
              f"/ bf16 {limits.get('gemm_bf16_gflops', 0):.0f} GFLOP/s; decode reads "
              f"{common.decode_weight_bytes(model) / 1e9:.2f} GB of weights per token")
    table = []
    for eng, row in rows.items():
        table.append([row["name"], row["decode_tok_s"], row["prefill_tok_s"], row["ttft_ms"],
                      row["throughput_tok_s"], row["weight_gbps"],
                      None if row["bw_pct"] is None else f"{row['bw_pct']:.0f}%", row["rss_gb"]])
    common.print_table(table, ["engine", "decode tok/s (bs1)", f"prefill tok/s ({args.input_len})", "TTFT ms",
                               f"throughput out tok/s ({args.tp_prompts}x{args.tp_input_len}/{args.tp_output_len})",
                               "weights GB/s", "% of bw", "RSS after load GB"])
    ratios = {}
    for mine, base in PAIRS:
        if base in rows and mine in rows:  # the median of the per-round ratios (one round: the ratio)
            ratios[base] = {m: median([ratio(a.get(m), b.get(m)) for a, b in zip(per_round[mine], per_round[base])])
                            for m in metrics}
            print(f"{mine} / {base}: " + ", ".join(f"{m.replace('_tok_s', '')} {v:.2f}x" if v else f"{m} n/a"
                                                   for m, v in ratios[base].items()))
    verdicts = {}
    print("targets:")
    for label, (metric, base, need, _mine) in TARGETS.items():
        got = ratios.get(base, {}).get(metric)
        verdicts[label] = {"ratio": got, "target": need,
                           "met": None if got is None else got >= need}
        status = "n/a (not measured)" if got is None else ("MET" if got >= need else "NOT MET")
        print(f"  {label:<22} >= {need:.2f}x : {'n/a' if got is None else f'{got:.2f}x'}  {status}")
    if llama_note and "skipped" in llama_note:
        print(f"note: {llama_note}")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out_dir, exist_ok=True)
    out_json = os.path.join(args.out_dir, f"compare-{stamp}.json")
    common.write_json(out_json, {
        "date": stamp, "machine": info, "limits": limits, "model": model, "dtype": args.dtype,
        "settings": {k: getattr(args, k) for k in ("input_len", "output_len", "num_iters", "tp_prompts",
                                                   "tp_input_len", "tp_output_len", "backend", "quick", "rounds")},
        "hf_dtype": hf_dtype, "hf_dtype_probe": hf_probe, "summary": rows, "ratios": ratios, "targets": verdicts, "llama_cpp": llama_note,
        "raw": results, "seconds": time.time() - t_start})
    print(f"wrote {out_json}")
    if not args.no_plot:
        try:
            out_png = plot(rows, metrics, os.path.join(args.out_dir, f"compare-{stamp}.png"), info, args)
            print(f"wrote {out_png}")
        except Exception as e:  # the figures above are the result; a plotting problem must not lose them
            print(f"[compare] no chart: {type(e).__name__}: {e}")


def row_of(run: dict, eng: str, bw: float | None) -> dict:
    """One round of one engine -> its table row."""
    lat, tp = run["latency"] or {}, run["throughput"] or {}
    return {"name": f"{lat.get('engine') or tp.get('engine') or eng} {lat.get('dtype') or tp.get('dtype')}",
            "decode_tok_s": lat.get("decode_tok_s"), "prefill_tok_s": lat.get("prefill_tok_s"),
            "ttft_ms": lat["ttft_s"] * 1e3 if lat.get("ttft_s") else None,
            "throughput_tok_s": tp.get("output_tok_s"), "weight_gbps": lat.get("decode_weight_gbps"),
            "rss_gb": lat["rss_after_load_bytes"] / 1e9 if lat.get("rss_after_load_bytes") else None,
            "bw_pct": 100 * lat["decode_weight_gbps"] / bw if bw and lat.get("decode_weight_gbps") else None}


def median(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def median_row(rows: list[dict]) -> dict:
    """Rounds of one engine -> one row: each figure's median over the rounds that measured it."""
    return {k: rows[0][k] if k == "name" else median([r[k] for r in rows]) for k in rows[0]}


def plot(rows: dict, metrics: list[str], path: str, info: dict, args: argparse.Namespace) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"decode_tok_s": "decode tok/s (batch 1)", "prefill_tok_s": f"prefill tok/s ({args.input_len} tokens)",
              "throughput_tok_s": f"throughput out tok/s ({args.tp_prompts}x{args.tp_input_len}/{args.tp_output_len})"}
    colors = {"ours": "#2b6cb0", "hf": "#dd6b20", "llama.cpp": "#38a169"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8))
    for ax, m in zip(axes, metrics):
        names = [e for e in rows if rows[e].get(m)]
        vals = [rows[e][m] for e in names]
        bars = ax.bar(names, vals, color=[colors.get(e, "gray") for e in names])
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=9)
        ax.set_title(titles[m], fontsize=10)
        ax.set_ylim(0, max(vals or [1]) * 1.2)
    fig.suptitle(f"StableLM-2-1.6B shape, {args.dtype}, {info['cpu']} ({info['cores']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
