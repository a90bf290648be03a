"""Every Triton kernel of kernels/ compiles ahead of time for sm_80 (A100) and sm_90 (H100/H200), without a GPU,
at the configurations its launcher picks for the three models' shapes and bf16 / fp16 / fp32, with no register
spills (gpu/aot_compile.py; the triton wheel ships ptxas and cuobjdump). The per-kernel table of registers, stack
and shared memory is printed (pytest -s, or the failure message).

Runs in a subprocess because this process runs Triton in interpreter mode (conftest.py sets TRITON_INTERPRET=1 on
CPU machines, and @triton.jit then makes interpreter objects that cannot be compiled for a GPU). Compiled kernels
land in Triton's usual cache (~/.triton/cache), so a second run mostly reads the cache.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_triton_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "gpu.aot_compile", "--arch", "80", "90", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(r.stdout)
    assert r.returncode == 0, f"AOT compile failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    data = json.loads(out.read_text())
    rows = data["rows"]
    kernels = {r["kernel"] for r in rows}
    # the six kernel files, nine launched kernels (the int8 / int4 GEMM and its split-K reduction among them), both
    # archs, all three dtypes
    assert len(kernels) >= 9 and not data["never_launched"]
    assert {"quant_matmul.quant_matmul_kernel", "quant_matmul.quant_splitk_reduce_kernel"} <= kernels
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["config"].split()[0] for r in rows} == {"bfloat16", "float16", "float32"}
    for row in rows:
        assert row["ok"] and row["stack"] <= data["spill_bound_bytes"], row
        assert 0 < row["regs"] <= 255, row
        assert row["shared"] <= 160 * 1024, row  # fits an A100's 164 KB per SM (and an H100's 227 KB)
    heads = {int(m) for r in rows for m in re.findall(r"BLOCK_D=(\d+)", r["config"])}
    assert {64, 128, 256} <= heads  # D = 64, 80 (padded to 128), 160 (padded to 256)
