"""`make gpu-check` on a CPU machine, up to where a GPU is needed: the driver imports the package with the server
packages blocked, reports the build's CUDA detection and exits 0; the GPU tests are collected (by pytest itself
when this file's neighbours in tests/gpu/ are collected, and by gpu/minitest.py without pytest, as on a bare GPU
machine) and skip with the reason; the summary reads a results folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TESTS = ["tests/gpu/test_gpu_kernels.py", "tests/gpu/test_gpu_quant.py", "tests/gpu/test_gpu_engine.py"]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: gpu-check would run for real")
def test_gpu_check_on_cpu_says_so_and_exits_0():
    r = subprocess.run(["bash", "gpu/check.sh"], cwd=ROOT, env=dict(_env(), PY=sys.executable), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "import ok" in r.stdout  # stablelm_fast, LLM, triton backend, CUDA graphs: no fastapi/openai needed
    assert "CUDA kernels will NOT be built" in r.stdout and "GPU: none" in r.stdout
    assert "no CUDA GPU on this machine" in r.stdout


def test_gpu_tests_collect_and_skip_without_pytest(tmp_path):
    """gpu/minitest.py with pytest blocked (its shim in place) runs every GPU test id; on CPU all skip."""
    blocker = ("import sys\n"
               "class B:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('pytest', 'fastapi', 'uvicorn', 'openai'):\n"
               "            raise ImportError(name + ' blocked')\n"
               "sys.meta_path.insert(0, B())\n"
               "from gpu import minitest\n"
               "sys.exit(minitest.main(sys.argv[1:]))\n")
    out = tmp_path / "t.json"
    env = _env()
    env["STABLELM_FAST_TEST_DEVICE"] = "cuda"
    r = subprocess.run([sys.executable, "-c", blocker, *GPU_TESTS, "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    data = json.loads(out.read_text())
    ids = [t["id"] for t in data["results"]]
    assert len(ids) > 150 and len(set(ids)) == len(ids), r.stdout + r.stderr
    for needle in ("triton", "cuda", "float16", "bfloat16", "float32", "160-32-8", "stablelm-2-12b", "eager",
                   "test_quant_linear_real_sizes", "test_quant_gate_up_silu_real_sizes"):
        assert any(needle in i for i in ids), needle
    if torch.cuda.is_available():
        pytest.skip("GPU present: the tests ran for real above")
    assert r.returncode == 0, r.stdout + r.stderr
    assert {t["outcome"] for t in data["results"]} == {"skipped"}
    assert all("needs a CUDA GPU" in t["message"] for t in data["results"])


def test_summary_reads_a_results_folder(tmp_path):
    (tmp_path / "detect.txt").write_text("torch 2.11 (CUDA 13.0); GPU: NVIDIA H200 sm_90\n")
    (tmp_path / "steps.txt").write_text("import=0\nbuild=0\ntests=1\nbench=124\n")
    (tmp_path / "gpu-tests.json").write_text(json.dumps({"counts": {"passed": 1, "failed": 1}, "results": [
        {"id": "k.py::test_decode_attention[triton-float16-64-8-8]", "test": "test_decode_attention",
         "outcome": "passed", "message": ""},
        {"id": "k.py::test_decode_attention[cuda-float16-64-8-8]", "test": "test_decode_attention",
         "outcome": "failed", "message": "AssertionError: mismatch"}]}))
    r = subprocess.run([sys.executable, "-m", "gpu.summary", str(tmp_path)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1  # a failed test and a timed-out bench
    assert "tests   FAILED (rc 1)" in r.stdout and "bench   TIMEOUT" in r.stdout
    assert "FAIL k.py::test_decode_attention[cuda-float16-64-8-8]: AssertionError: mismatch" in r.stdout
    assert "test_decode_attention                        cuda    failed 1" in r.stdout


def test_minitest_collects_the_per_op_tests_like_pytest(tmp_path):
    """gpu-check also runs tests/ops/ through minitest (pytest.param ids, helpers beside the tests): the same
    number of cases per test function as pytest collects (the ids are spelled differently)."""
    import glob
    from collections import Counter

    paths = sorted(glob.glob(os.path.join(ROOT, "tests", "ops", "test_op_*.py")))
    out = tmp_path / "c.json"
    subprocess.run([sys.executable, "-m", "gpu.minitest", *paths, "--collect-only", "--json", str(out)], cwd=ROOT,
                   env=_env(), capture_output=True, text=True, timeout=120, check=True)
    ours = Counter(t["id"].split("::", 1)[1].split("[")[0] for t in json.loads(out.read_text())["results"])
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    theirs = Counter(line.split("::", 1)[1].split("[")[0] for line in r.stdout.splitlines() if "::" in line)
    assert sum(ours.values()) > 100 and ours == theirs
