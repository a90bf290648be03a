"""One screen out of a `make gpu-check` results folder (detect.txt, steps.txt, build.log, gpu-tests.json,
gpu-bench.json). Exit status 1 if any step failed.

    python -m gpu.summary RESULTS_DIR
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter, defaultdict


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _json(path: str) -> dict | None:
    text = _read(path)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def _backend(test_id: str) -> str:
    m = re.search(r"\[(?:[^\]]*-)?(triton|cuda)(?:-|\])", test_id)
    return m.group(1) if m else "-"


def summarise(res: str) -> tuple[list[str], bool]:
    lines, ok = [], True
    steps = dict(line.split("=", 1) for line in _read(os.path.join(res, "steps.txt")).split() if "=" in line)
    lines.append("gpu-check: " + (_read(os.path.join(res, "detect.txt")).strip() or "?"))
    for name in ("import", "build", "tests", "bench"):
        rc = steps.get(name)
        status = "not run" if rc is None else "ok" if rc == "0" else "TIMEOUT" if rc == "124" else f"FAILED (rc {rc})"
        ok &= rc == "0"
        extra = ""
        if name == "build" and rc not in (None, "0"):
            extra = " | " + " / ".join(_read(os.path.join(res, "build.log")).strip().splitlines()[-2:])[-200:]
        lines.append(f"  {name:<7} {status}{extra}")

    tests = _json(os.path.join(res, "gpu-tests.json"))
    if tests:
        groups: dict[tuple, Counter] = defaultdict(Counter)
        for r in tests["results"]:
            groups[(r["test"], _backend(r["id"]))][r["outcome"]] += 1
        lines.append(f"  tests: {tests['counts']}")
        for (test, backend), c in sorted(groups.items()):
            counts = " ".join(f"{k} {v}" for k, v in sorted(c.items()))
            lines.append(f"    {test:<44} {backend:<7} {counts}")
        fails = [r for r in tests["results"] if r["outcome"] == "failed"]
        for r in fails[:8]:
            lines.append(f"    FAIL {r['id']}: {r['message'][:150]}")
        if len(fails) > 8:
            lines.append(f"    ... {len(fails) - 8} more failures in gpu-tests.json")
        reasons = Counter(r["message"] for r in tests["results"] if r["outcome"] == "skipped")
        for reason, n in reasons.most_common(4):
            lines.append(f"    skipped x{n}: {reason[:120]}")

    bench = _json(os.path.join(res, "gpu-bench.json"))
    if bench:
        lim = bench["limits"]
        lines.append(f"  bench on {bench['gpu']}: measured HBM {lim['hbm_gbps']:.0f} GB/s, bf16 matmul "
                     f"{lim['bf16_matmul_tflops']:.0f} TFLOP/s")
        lines.append(f"    {'model':<6} {'backend':<7} {'decode b=1 tok/s':>20} {'decode b=32 tok/s':>20} "
                     f"{'prefill tok/s':>22}")
        for m in bench["models"]:
            if "error" in m:
                lines.append(f"    {m['model']:<6} ERROR {m['error'][:100]}")
                continue
            lines.append(f"    {m['model']:<6} {m['backend']:<7} "
                         f"{m['decode_b1_tok_s']:>9.0f} ({m['decode_b1_hbm_pct']:>4.0f}% HBM) "
                         f"{m['decode_b32_tok_s']:>9.0f} ({m['decode_b32_hbm_pct']:>4.0f}% HBM) "
                         f"{m['prefill_tok_s']:>9.0f} ({m['prefill_matmul_pct']:>4.0f}% matmul)")
    for q in (bench or {}).get("quant", []):
        if "error" in q:
            lines.append(f"    quant GEMM ERROR {q['error'][:100]}")
            continue
        lines.append(f"    {q['model']:<5} {q['layer']:<8} {q['mode']:<10} decode {q['decode_us']:>7.1f} us "
                     f"({q['decode_hbm_pct']:>4.0f}% HBM)  M=512 {q['prefill_us']:>8.1f} us "
                     f"({q['prefill_matmul_pct']:>4.0f}% matmul)")
    lines.append(f"  files: {res}")
    return lines, ok


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    lines, ok = summarise(argv[0])
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
