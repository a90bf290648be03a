"""`make run`: continue Python prompts with the small StableLM shipped in the package, through the full engine.

The model (stablelm_fast/assets/stablelm-pystdlib-4m, README "The built-in model") is a 12B-shaped StableLM with
~4 M parameters trained on the Python standard library's source by tools/train_small_model.py, so it writes
Python-looking code. Any HF StableLM folder can be given instead: `python -m stablelm_fast.demo PATH`.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from stablelm_fast import LLM, SamplingParams

BUILTIN_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "stablelm-pystdlib-4m")
PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\n\ndef read_lines(path):"]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    model_dir = argv[0] if argv else BUILTIN_MODEL
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise SystemExit(f"no model at {model_dir!r} (expected an HF StableLM folder)")
    if model_dir == BUILTIN_MODEL:
        # a 4 M-parameter model's matrices are too small to split across threads: one thread is faster, and it does
        # not stall waiting for a busy second core (2 threads on 2 shared cores measured 3-18 s here, 1 thread 0.3 s)
        torch.set_num_threads(1)
    llm = LLM(model_dir)
    # low temperature, seeded (the same text every run): greedy decoding of a model this small loops on one line
    params = SamplingParams(temperature=0.4, top_p=0.9, repetition_penalty=1.1, max_tokens=64, seed=0)
    llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2))  # warm-up: first-call costs not timed
    start = time.perf_counter()
    outs = llm.generate(PROMPTS, params)
    elapsed = time.perf_counter() - start
    print(f"model: {model_dir}  dtype={llm.engine.dtype}  backend={llm.engine.backend}  threads="
          f"{torch.get_num_threads()}  (temperature 0.4, seed 0, 64 tokens max)")
    for out in outs:
        print("-" * 72)
        print(out.prompt + out.outputs[0].text)
    print("-" * 72)
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"{len(outs)} prompts, {n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tokens/s, one batch)")


if __name__ == "__main__":
    main()
