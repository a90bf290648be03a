"""The cpu backend's ops under every ISA below the one this machine runs: each re-runs the cpu cases of tests/ops/
in a subprocess with STABLELM_FAST_ISA forced (an AVX-512 machine also checks its AVX2 and scalar paths, an AVX2
machine its scalar paths; the attention tiles, GEMMs and quantized GEMMs pick their kernels from that ISA)."""

import os
import subprocess
import sys

import pytest

from stablelm_fast.ops import extension_available

ISAS = ["scalar", "avx2", "avx512bf16", "amx"]  # each implies the ones before it
HERE = os.path.dirname(os.path.abspath(__file__))


def _isa() -> str:
    from stablelm_fast.ops.cpu_linear import cpu_isa
    return cpu_isa()


@pytest.mark.parametrize("isa", ISAS[:-1])
def test_cpu_ops_under_lower_isa(isa):
    if not extension_available():
        pytest.skip("the C++ extension is not built")
    if os.environ.get("STABLELM_FAST_ISA"):
        pytest.skip("already in a subprocess with a forced ISA")
    if ISAS.index(isa) >= ISAS.index(_isa()):
        pytest.skip(f"{isa} is not below this process's ISA ({_isa()}): the op tests ran it")
    env = dict(os.environ, STABLELM_FAST_ISA=isa)
    # NOTE: 1031-token cases are left to the process's own ISA (the scalar attention is slow there).
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", HERE,
           "-k", "cpu and not lower_isa and not 1031 and not opcheck"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=HERE)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout
