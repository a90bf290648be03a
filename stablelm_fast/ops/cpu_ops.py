"""The `cpu` backend: the C++ extension's CPU kernels (csrc/cpu/), same signatures as ops/reference.py.

Norms, activation, rotary + cache write and attention are the extension's kernels (ops/extension.py wraps them);
`linear`, `gate_up_silu` and `pack_linear_weight` live in ops/cpu_linear.py (the C++ GEMMs on weights packed at
load for the ISA in use); `quant_linear`, `quant_gate_up_silu` and `pack_quant_weight` (weight-only int8 / int4) in
ops/cpu_quant.py.
"""

from __future__ import annotations

import stablelm_fast._C  # noqa: F401  (registers torch.ops.stablelm_fast)
from stablelm_fast.ops.cpu_linear import gate_up_silu, linear, pack_linear_weight  # noqa: F401
from stablelm_fast.ops.cpu_quant import (  # noqa: F401
    pack_quant_weight, quant_bits, quant_gate_up_silu, quant_linear, quantize_weight)
from stablelm_fast.ops.extension import (  # noqa: F401  (this backend's ops: the C++ kernels, wrapped)
    add_layernorm,
    layernorm,
    paged_attention,
    paged_attention_decode,
    qk_norm_rope_cache,
    silu_and_mul,
)
from stablelm_fast.ops.registry import register_fake_impls

register_fake_impls()
