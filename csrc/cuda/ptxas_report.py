"""Per-kernel resource table from `nvcc -Xptxas -v` logs (csrc/cuda/check.sh): registers, stack frame, spill
stores/loads and static shared memory of every kernel instantiation, per arch. Exit status 1 on any spill.

    python3 csrc/cuda/ptxas_report.py LOG...
"""

import re
import subprocess
import sys

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def parse(text):
    rows, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "stack": 0, "spill_st": 0, "spill_ld": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = _USED.search(line)
        if m:
            cur["regs"], cur["smem"] = int(m.group(1)), int(m.group(2) or 0)
    return rows


def short(name):
    """`void slf::cuda::(anon)::paged_attention_decode_kernel<__half>(...)` -> paged_attention_decode_kernel<__half>"""
    name = name.replace("(anonymous namespace)::", "").split("(")[0].replace("void ", "")
    return name.split("::")[-1]


def main(paths):
    rows = []
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            rows += parse(f.read())
    for r, d in zip(rows, demangle([r["kernel"] for r in rows])):
        r["kernel"] = short(d)
    rows.sort(key=lambda r: (r["kernel"], r["arch"]))
    print(f"  {'kernel':<58} {'arch':<7} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'smem B':>7}")
    bad = 0
    for r in rows:
        spill = r["spill_st"] + r["spill_ld"]
        bad += spill > 0
        print(f"  {r['kernel']:<58} {r['arch']:<7} {r.get('regs', 0):>4} {r['stack']:>5} "
              f"{r['spill_st']:>5}/{r['spill_ld']:<5} {r['smem']:>7}{'  SPILLS' if spill else ''}")
    if not rows:
        print("  (no kernel entries found in the ptxas logs)")
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
