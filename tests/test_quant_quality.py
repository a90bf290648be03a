"""Quantization error, bounded: the built-in trained model's held-out perplexity and next-token KL (bench/
quality_quant.py's scoring) for int8 and int4 against the unquantized model, fp32 torch backend (weight error only).

Bounds set from measurement (4 windows x 128 tokens, this text; AMD EPYC Zen 4, Dec 2026), each ~4x the measured:
    int8       KL 2.2e-6   perplexity -0.01%
    int4-g32   KL 3.0e-4   perplexity +0.17%
    int4-g128  KL 5.3e-4   perplexity +0.50%  (the int4 default: groups of 128 with zero points)
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.quality import heldout_windows  # noqa: E402
from bench.quality_quant import BUILTIN_MODEL, measure  # noqa: E402
from stablelm_fast.tokenizer import Tokenizer  # noqa: E402

BOUNDS = {"int8": (1e-5, 0.001), "int4-g32": (1.5e-3, 0.01), "int4-g128": (2.5e-3, 0.02)}  # KL mean, |ppl change|


@pytest.mark.xdist_group("builtin_model")
def test_quantization_error_is_bounded():
    windows = heldout_windows(Tokenizer(BUILTIN_MODEL), 128, 4)
    rows = measure(BUILTIN_MODEL, list(BOUNDS), windows, 20, dict(dtype="float32", backend="torch", num_kv_blocks=64))
    ref_ppl = rows[0]["perplexity"]
    kl = {}
    for row in rows[1:]:
        max_kl, max_ppl = BOUNDS[row["mode"]]
        kl[row["mode"]] = row["kl_mean"]
        assert 0 < row["kl_mean"] < max_kl, row
        assert abs(row["perplexity"] / ref_ppl - 1) < max_ppl, row
    assert kl["int8"] < kl["int4-g32"] < kl["int4-g128"]  # finer quantization, smaller error
