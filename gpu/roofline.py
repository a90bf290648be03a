"""Roofline of decode and prefill for the three StableLM shapes on A100-80GB, H100 SXM and H200 (bf16 weights and
KV cache), and the same arithmetic for measured limits (gpu/bench.py).

Decode step (batch b, context c per sequence): every weight except the embedding table is read once per step (the
embedding is a gather of b rows), plus each sequence's K and V: bytes = W + b * c * kv_bytes_per_token.
Upper bound: b * bandwidth / bytes tokens per second.
Prefill token (prompt length L): 2 flop per weight of the layers (the lm_head runs only on the last token of each
prompt, the embedding is a gather) plus causal attention, 2 * 2 * (L / 2) * Hq * D flop per layer (QK^T and PV at
the average context L/2). Upper bound: peak / flops tokens per second.

    python -m gpu.roofline        # prints the README table
"""

from __future__ import annotations

from gpu.scenarios import MODEL_SHAPES

# Datasheet figures (dense bf16 tensor-core peak, HBM bandwidth).
GPUS = {
    "A100-80GB": dict(hbm_gbps=2039.0, bf16_tflops=312.0),
    "H100 SXM": dict(hbm_gbps=3350.0, bf16_tflops=989.0),
    "H200": dict(hbm_gbps=4800.0, bf16_tflops=989.0),
}
CONTEXT = 1024  # tokens per sequence for the decode and prefill rows
BYTES = 2  # bf16


def layer_params(s: dict) -> int:
    h, d, hq, hkv, inter = s["hidden"], s["d"], s["hq"], s["hkv"], s["inter"]
    qkv = h * (hq + 2 * hkv) * d + ((hq + 2 * hkv) * d if s["qkv_bias"] else 0)
    norms = 4 * h + ((hq + hkv) * d if s["qk_norm"] else 0)
    return qkv + h * h + 3 * inter * h + norms


def params(s: dict) -> dict:
    layers = s["layers"] * layer_params(s)
    embed = s["vocab"] * s["hidden"]
    return {"layers": layers, "embed": embed, "lm_head": embed, "total": layers + 2 * embed + 2 * s["hidden"]}


def kv_bytes_per_token(s: dict) -> int:
    return 2 * s["layers"] * s["hkv"] * s["d"] * BYTES


def decode_step_bytes(s: dict, batch: int, context: int = CONTEXT) -> int:
    p = params(s)
    weights = (p["layers"] + p["lm_head"]) * BYTES + batch * s["hidden"] * BYTES
    return weights + batch * context * kv_bytes_per_token(s)


def prefill_flops_per_token(s: dict, prompt_len: int = CONTEXT) -> float:
    return 2.0 * params(s)["layers"] + s["layers"] * 4.0 * (prompt_len / 2) * s["hq"] * s["d"]


def bounds(s: dict, hbm_gbps: float, bf16_tflops: float) -> dict:
    return {
        "decode_b1_tok_s": 1 * hbm_gbps * 1e9 / decode_step_bytes(s, 1),
        "decode_b32_tok_s": 32 * hbm_gbps * 1e9 / decode_step_bytes(s, 32),
        "prefill_tok_s": bf16_tflops * 1e12 / prefill_flops_per_token(s),
    }


def table() -> list[str]:
    lines = ["| model | params | bytes/decode step b=1 / b=32 (ctx 1024) | prefill flop/token (L=1024) | GPU | "
             "decode b=1 bound tok/s | decode b=32 bound tok/s | prefill bound tok/s | measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in MODEL_SHAPES.items():
        p = params(s)
        for i, (gpu, lim) in enumerate(GPUS.items()):
            b = bounds(s, lim["hbm_gbps"], lim["bf16_tflops"])
            head = (f"| {name} | {p['total'] / 1e9:.2f} B | {decode_step_bytes(s, 1) / 1e9:.2f} / "
                    f"{decode_step_bytes(s, 32) / 1e9:.2f} GB | {prefill_flops_per_token(s) / 1e9:.2f} GFLOP"
                    if i == 0 else "| | | |")
            lines.append(f"{head} | {gpu} ({lim['hbm_gbps'] / 1000:.2f} TB/s, {lim['bf16_tflops']:.0f} TFLOP/s) | "
                         f"{b['decode_b1_tok_s']:,.0f} | {b['decode_b32_tok_s']:,.0f} | {b['prefill_tok_s']:,.0f} | "
                         f"not yet run |")
    return lines


if __name__ == "__main__":
    print("\n".join(table()))
