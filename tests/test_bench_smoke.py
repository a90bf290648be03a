"""Smoke test of bench/latency.py and bench/throughput.py: they run end to end on a tiny checkpoint (tiny lengths,
in a subprocess as a user runs them) and print/write parseable results. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stablelm_fast.tiny import make_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("bench-tiny")))


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def table_row(stdout: str, header_start: str) -> dict[str, str]:
    lines = stdout.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[i].split("|")]
    row = [c.strip() for c in lines[i + 2].split("|")]
    return dict(zip(header, row))


def test_latency_runs(tiny, tmp_path):
    out = tmp_path / "lat.json"
    stdout = run("latency.py", tiny, "--dtype", "float32", "--input-len", "8", "--output-len", "4", "--num-iters", "1",
                 "--num-iters-warmup", "0", "--prefill-iters", "0", "--threads", "1", "--no-bandwidth",
                 "--json", str(out))
    row = table_row(stdout, "engine")
    assert float(row["decode tok/s"].replace(",", "")) > 0
    assert float(row["prefill tok/s (8)"].replace(",", "")) > 0
    res = json.loads(out.read_text())
    assert res["input_len"] == 8 and res["decode_tok_s"] > 0 and res["decode_weight_bytes"] > 0


def test_throughput_runs(tiny, tmp_path):
    out = tmp_path / "tp.json"
    stdout = run("throughput.py", tiny, "--dtype", "float32", "--num-prompts", "3", "--input-len", "8",
                 "--output-len", "4", "--threads", "1", "--json", str(out))
    row = table_row(stdout, "engine")
    assert float(row["output tok/s"].replace(",", "")) > 0
    res = json.loads(out.read_text())
    assert res["output_tokens"] == 3 * 4 and res["requests_s"] > 0
