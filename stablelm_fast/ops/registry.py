"""The op interface, declared once: every op's name, signature, torch reference and whether the C++ extension
registers it (`torch.ops.stablelm_fast.<name>`, out-parameter schema, fake kernel from here).

A backend is a module (`stablelm_fast.ops.<backend>_ops`) defining some of these ops under their names. `OpTable`
binds each declared op to the first implementation along the backend's fallback chain, once, when the engine loads:
the model then calls `ops.<name>(...)` with no further dispatch in Python. Decisions that depend on shapes or dtypes
(which GEMM kernel for which M, which attention path) live inside each implementation.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from stablelm_fast.ops import quant_reference, reference


@dataclass(frozen=True)
class OpDef:
    name: str
    signature: str  # shapes and meaning; the reference's docstring has the details
    reference: Callable
    cpp: bool = True  # torch.ops.stablelm_fast.<name> exists in the C++ extension (writes only its out-params)


def _identity_pack(weight: torch.Tensor, halves: bool = False) -> torch.Tensor:
    """Load-time repacking of a linear weight [N, K] into a backend's own layout; the reference keeps it as is."""
    return weight


OPS: dict[str, OpDef] = {op.name: op for op in (
    OpDef("linear", "linear(x [M, K], weight [N, K] or packed, bias [N] | None) -> [M, N]", reference.linear),
    OpDef("gate_up_silu", "gate_up_silu(x [M, H], gate_up_weight [2I, H] or packed) -> silu(x Wg^T) * (x Wu^T) [M, I]",
          reference.gate_up_silu),
    OpDef("pack_linear_weight", "pack_linear_weight(weight [N, K], halves=False) -> the backend's layout, read by "
          "linear / gate_up_silu (halves: a gate_up weight whose two halves stay apart)", _identity_pack),
    OpDef("quant_linear", "quant_linear(x [M, K], qweight, scales, zeros | None, bias [N] | None, bits, group_size) "
          "-> [M, N]: weight-only int8 / int6 / int4 (canonical form in ops/quant_reference.py, or packed)",
          quant_reference.quant_linear, cpp=False),
    OpDef("quant_gate_up_silu", "quant_gate_up_silu(x [M, H], qweight, scales, zeros | None, bits, group_size) -> "
          "[M, I]: gate_up_silu on a quantized [Wg; Wu]", quant_reference.quant_gate_up_silu, cpp=False),
    OpDef("pack_quant_weight", "pack_quant_weight(qweight, scales, zeros | None, bits, group_size, halves=False) -> "
          "(qweight, scales, zeros) in the backend's layout, read by quant_linear / quant_gate_up_silu",
          quant_reference.pack_quant_weight, cpp=False),
    OpDef("quantize_weight", "quantize_weight(weight [N, K], bits, group_size, symmetric=True) -> (qweight, scales, "
          "zeros | None) in the canonical form: round to nearest, scales on the fp16 grid (load-time quantization)",
          quant_reference.quantize_weight, cpp=False),
    OpDef("quant_bits", "quant_bits() -> the weight bit widths (of 8, 6, 4) that this backend's quant_linear runs "
          "with its own kernels", quant_reference.quant_bits, cpp=False),
    OpDef("layernorm", "layernorm(x [T, H], weight [H], bias [H] | None, eps) -> [T, H]", reference.layernorm),
    OpDef("add_layernorm", "add_layernorm(x, residual | None, weight, bias | None, eps) -> (normed, new_residual)",
          reference.add_layernorm),
    OpDef("silu_and_mul", "silu_and_mul(gate_up [T, 2I]) -> [T, I]", reference.silu_and_mul),
    OpDef("qk_norm_rope_cache", "qk_norm_rope_cache(qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, "
          "k_cache, v_cache, slot_mapping, num_q_heads, num_kv_heads, head_dim) -> q [T, Hq, D]; writes K/V",
          reference.qk_norm_rope_cache),
    OpDef("paged_attention", "paged_attention(q [T, Hq, D], k_cache, v_cache, block_tables, cu_seqlens_q, "
          "context_lens, scale, max_q_len=None) -> [T, Hq, D] (causal varlen: prefill, chunks, prefix extend)",
          reference.paged_attention),
    OpDef("paged_attention_decode", "paged_attention_decode(q [B, Hq, D], k_cache, v_cache, block_tables, "
          "context_lens, scale) -> [B, Hq, D]", reference.paged_attention_decode),
)}

BACKENDS = ("torch", "cpu", "triton", "cuda")
# Where an op a backend does not implement comes from: the first module along the chain that defines it.
FALLBACK = {"torch": ("torch",), "cpu": ("cpu", "torch"), "triton": ("triton", "torch"),
            "cuda": ("cuda", "triton", "torch")}


def backend_module(backend: str) -> ModuleType:
    return importlib.import_module(f"stablelm_fast.ops.{backend}_ops")


class OpTable:
    """One backend's ops, bound once: `table.linear(...)`, ...; `table.source[name]` says which backend serves it."""

    def __init__(self, backend: str) -> None:
        if backend not in FALLBACK:
            raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")
        self.backend = backend
        self.source: dict[str, str] = {}
        modules = [(b, backend_module(b)) for b in FALLBACK[backend]]
        for name, op in OPS.items():
            for b, module in modules:
                impl = getattr(module, name, None)
                if impl is not None:
                    break
            else:
                b, impl = "reference", op.reference
            setattr(self, name, impl)
            self.source[name] = b

    def __repr__(self) -> str:
        return f"OpTable({self.backend!r}: {self.source})"


def register_fake_impls() -> None:
    """Fake (meta) kernels for every C++ op, so torch.compile / FakeTensor tracing and torch.library.opcheck see
    them. Each writes only its out-parameters (Tensor! in the schema) and returns nothing."""

    def _none(*args, **kwargs):
        return None

    for op in OPS.values():
        if not op.cpp:
            continue
        try:
            torch.library.register_fake(f"stablelm_fast::{op.name}")(_none)
        except RuntimeError:  # already registered (module re-imported)
            pass
