"""Ahead-of-time GPU compilation of every Triton kernel in kernels/, for sm_80 (A100) and sm_90 (H100/H200), on
any machine: no GPU is needed (the triton wheel ships ptxas and cuobjdump).

How the configurations are chosen: the real launchers (kernels/*.py) are called with CPU tensors of the three
models' shapes (StableLM-2-1.6B: D=64, 3B: D=80, 12B: D=160 with QK-norm and GQA 4; the 1.6B/3B head sizes are also
run with GQA 4), in bf16 / fp32 (all kernels) and fp16 (the tl.dot kernels), while every @triton.jit kernel of the
kernels package is replaced by a recorder. So each launch records exactly what the launcher would pass on a GPU:
argument types (with Triton's own specialisation: ints divisible by 16, ints equal to 1, 16-byte aligned
pointers), constexprs (tile sizes, GROUP, UPCAST_DOT...) and num_warps. Each distinct launch is then compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, and the cubin's registers, stack frame
(spills: Triton kernels have no local arrays, so any stack is spilled registers) and shared memory are reported.

    python -m gpu.aot_compile [--arch 80 90] [--json out.json] [--quick]

Exit status 1 on a compile error, a stack frame above SPILL_BOUND_BYTES, or a kernel of kernels/ never launched
by the scenarios (a new kernel needs a scenario here). Must run with TRITON_INTERPRET unset (done below, before
triton is imported: under the interpreter @triton.jit makes interpreter objects that cannot be compiled).
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # noqa: E402  (before triton is imported anywhere)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from gpu.scenarios import run_scenarios  # noqa: E402

SPILL_BOUND_BYTES = 0  # any stack frame (= register spills for Triton code) fails the check
ARCHS = (80, 90)


@dataclass
class Launch:
    kernel: str  # module.function
    fn: JITFunction
    args: dict  # parameter name -> value passed
    options: dict  # num_warps, num_stages
    labels: set = field(default_factory=set)  # scenarios that launched it


class _Recorder:
    """Stands in for a JITFunction: `rec[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, fn: JITFunction, name: str, sink: list, label_ref: list) -> None:
        self.fn, self.name, self.sink, self.label_ref = fn, name, sink, label_ref

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = self.fn.arg_names
            bound = dict(zip(names, args))
            options = {k: v for k, v in kwargs.items() if k not in names}
            bound.update({k: v for k, v in kwargs.items() if k in names})
            missing = [n for n in names if n not in bound]
            if missing:
                raise ValueError(f"{self.name}: launch without arguments {missing}")
            self.sink.append(Launch(self.name, self.fn, bound, options, {self.label_ref[0]}))

        return launch


def kernel_functions() -> dict[str, tuple[object, str, JITFunction]]:
    """Every public @triton.jit function defined in the kernels package: name -> (module, attr, fn)."""
    import stablelm_fast.kernels as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for attr, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and not attr.startswith("_") and obj.fn.__module__ == mod.__name__:
                found[f"{info.name}.{attr}"] = (mod, attr, obj)
    return found


def record_launches(quick: bool = False) -> tuple[list[Launch], list[str]]:
    """Run the scenarios with recorders in place; -> distinct launches, and kernels that were never launched."""
    kernels = kernel_functions()
    sink: list[Launch] = []
    label_ref = [""]
    saved = []
    for name, (mod, attr, fn) in kernels.items():
        saved.append((mod, attr, fn))
        setattr(mod, attr, _Recorder(fn, name, sink, label_ref))
    try:
        run_scenarios(label_ref, quick=quick)
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)
    distinct: dict[tuple, Launch] = {}
    for ln in sink:
        sig, consts, attrs = specialise(ln)
        key = (ln.kernel, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
               tuple(sorted(attrs)), tuple(sorted(ln.options.items())))
        if key in distinct:
            distinct[key].labels |= ln.labels
        else:
            distinct[key] = ln
    launched = {ln.kernel for ln in sink}
    return list(distinct.values()), sorted(set(kernels) - launched)


def specialise(ln: Launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's launcher would build them for these argument values."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(ln.fn.params):
        v = ln.args[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
            continue
        ty, attr = native_specialize_impl(CUDABackend, v, False, True, True)
        sig[p.name] = ty
        if ty == "constexpr":  # ints equal to 1, None
            consts[p.name] = v
        elif isinstance(attr, str) and "D" in attr:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def describe(ln: Launch) -> str:
    """Short human label of a launch: dtype of the first tensor + the constexprs that pick the code path."""
    dtype = next((str(v.dtype).replace("torch.", "") for v in ln.args.values() if isinstance(v, torch.Tensor)), "?")
    consts = ",".join(f"{p.name}={ln.args[p.name]}" for p in ln.fn.params if p.is_constexpr)
    return f"{dtype} {consts} warps={ln.options.get('num_warps', 4)}"


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cubin_resources(cubin: bytes) -> dict:
    """Registers / stack / static shared / local bytes of the (single) kernel of a cubin, from cuobjdump."""
    from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401  (same bin/ as cuobjdump)

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = _RES.search(text)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump output: {text[:300]!r}")
    return dict(zip(("regs", "stack", "static_shared", "local"), map(int, m.groups())))


def compile_launch(ln: Launch, arch: int) -> dict:
    sig, consts, attrs = specialise(ln)
    row = {"kernel": ln.kernel, "arch": f"sm_{arch}", "config": describe(ln), "scenarios": sorted(ln.labels)}
    t0 = time.perf_counter()
    try:
        ck = triton.compile(ASTSource(ln.fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                            options=dict(ln.options))
        res = cubin_resources(ck.asm["cubin"])
        row.update(res, shared=int(ck.metadata.shared) + res["static_shared"], num_warps=ck.metadata.num_warps,
                   ok=res["stack"] <= SPILL_BOUND_BYTES, error=None if res["stack"] <= SPILL_BOUND_BYTES else
                   f"stack frame {res['stack']} B > bound {SPILL_BOUND_BYTES} B (register spills)")
    except Exception as e:  # a compile error is a result, reported per launch
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e) else ''}")
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def summarise(rows: list[dict]) -> list[str]:
    """One line per kernel and arch: configs, register range, worst stack, shared-memory range."""
    lines = [f"{'kernel':<52} {'arch':<6} {'cfgs':>4} {'registers':>10} {'stack':>6} {'shared KB':>11}  status"]
    keys = sorted({(r["kernel"], r["arch"]) for r in rows})
    for kernel, arch in keys:
        group = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch]
        good = [r for r in group if "regs" in r]
        bad = [r for r in group if not r["ok"]]
        regs = f"{min(r['regs'] for r in good)}-{max(r['regs'] for r in good)}" if good else "-"
        stack = str(max(r["stack"] for r in good)) if good else "-"
        shared = (f"{min(r['shared'] for r in good) / 1024:.1f}-{max(r['shared'] for r in good) / 1024:.1f}"
                  if good else "-")
        status = "ok" if not bad else f"{len(bad)} FAILED"
        lines.append(f"{kernel:<52} {arch:<6} {len(group):>4} {regs:>10} {stack:>6} {shared:>11}  {status}")
    for r in rows:
        if not r["ok"]:
            lines.append(f"  FAIL {r['kernel']} {r['arch']} [{r['config']}]: {r['error']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--json", default=None, help="write every launch's result here")
    p.add_argument("--quick", action="store_true", help="bf16 only (a smoke run)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    launches, never = record_launches(quick=args.quick)
    rows = [compile_launch(ln, arch) for arch in args.arch for ln in launches]
    lines = summarise(rows)
    print(f"triton {triton.__version__}: {len(launches)} distinct launches x {len(args.arch)} archs compiled in "
          f"{time.perf_counter() - t0:.1f} s (spill bound {SPILL_BOUND_BYTES} B)")
    print("\n".join(lines))
    for k in never:
        print(f"  FAIL {k}: defined in kernels/ but never launched by gpu/scenarios.py")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"triton": triton.__version__, "spill_bound_bytes": SPILL_BOUND_BYTES, "rows": rows,
                       "never_launched": never}, f, indent=1)
    return 0 if all(r["ok"] for r in rows) and not never and rows else 1


if __name__ == "__main__":
    sys.exit(main())
