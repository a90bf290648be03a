"""Quantize a GGUF with llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`): the Q8_0 / Q4_0 files
the quantized compare rows run, made from the same bf16 GGUF bench/gguf_convert.py writes.

    python bench/gguf_quantize.py IN.gguf OUT.gguf --type Q4_0
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

FTYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def quantize(src: str, out: str, kind: str, threads: int | None = None) -> str:
    """src GGUF -> out GGUF of llama.cpp type `kind` (Q8_0 / Q4_0); written once (kept if already there)."""
    import llama_cpp

    if kind not in FTYPES:
        raise ValueError(f"type must be one of {', '.join(FTYPES)}; got {kind!r}")
    if os.path.isfile(out) and os.path.getmtime(out) >= os.path.getmtime(src):
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[kind])
    params.nthread = threads or common.num_threads()
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), (out + ".part").encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src}, {kind}) failed with {rc}")
    os.replace(out + ".part", out)
    print(f"[gguf_quantize] {os.path.basename(out)}: {os.path.getsize(out) / 1e9:.2f} GB in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return out


def gguf_decode_bytes(path: str) -> int:
    """Bytes one decode step reads from a GGUF: every tensor once, one row of the token embedding (all of it when
    there is no separate output matrix)."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    total = 0
    for t in tensors:
        if t.name == "token_embd.weight" and not tied:
            total += int(t.n_bytes) // int(t.shape[-1])
        else:
            total += int(t.n_bytes)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--type", default="Q4_0", choices=sorted(FTYPES))
    args = p.parse_args()
    quantize(args.src, args.out, args.type)


if __name__ == "__main__":
    main()
