"""`make run`: build a small StableLM checkpoint locally and generate text through the full engine."""

from __future__ import annotations

import os
import tempfile
import time

from stablelm_fast import LLM, SamplingParams
from stablelm_fast.tiny import make_tiny_checkpoint


def main() -> None:
    model_dir = os.path.join(tempfile.gettempdir(), "stablelm-fast-demo-v2")
    if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        make_tiny_checkpoint(model_dir, "stablelm-2-1_6b", seed=0, readable=True)
    llm = LLM(model_dir, dtype="float32")
    prompts = ["The quick brown fox", "Hello, world! How are", "A paged KV cache stores"]
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, seed=1))
    elapsed = time.perf_counter() - start
    chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(temperature=0, max_tokens=16))
    print(f"model: {model_dir} (random weights, so the words are random too), backend={llm.engine.backend}")
    for out in outs:
        print(f"{out.prompt!r} -> {out.outputs[0].text!r} [{out.outputs[0].finish_reason}]")
    print(f"chat -> {chat[0].outputs[0].text!r}")
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"{n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tokens/s)")


if __name__ == "__main__":
    main()
